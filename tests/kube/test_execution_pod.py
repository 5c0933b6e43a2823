"""Model-written code run by the HumanEval sandbox inside a training pod finds none of the run's
credentials (environment, /proc, the Secret volume, the service-account token) and cannot open a
socket, in the pod as it is, in a pod that cannot create namespaces, and where Landlock is missing
the sandbox refuses to run the code at all. A fork bomb, processes in new sessions or process groups,
daemons and a grandchild holding the output open leave no process behind and do not hold the result.
Run: .venv/bin/pytest tests/kube/test_execution_pod.py -q   (needs root for the pod network)
"""

from __future__ import annotations

import errno
import textwrap

import pytest

from tests.fixtures.kube import deploy_s3
from tests.kube.test_pods import pod, wait_phase
from tests.trainer.test_execution import (
    ATTACK,
    ESCAPES,
    FORK_BOUND,
    POD_PROGRAMS,
    REFUSAL,
    SECRET,
    assert_nothing_leaked,
    deny_prelude,
)

pytestmark = [pytest.mark.kube, pytest.mark.slow]

# (name, syscalls the pod's seccomp profile fails, what runs)
SCENARIOS = [
    ("as the pod allows", {}, ATTACK),
    ("no namespaces", {"unshare": errno.EPERM}, ATTACK),  # no CAP_SYS_ADMIN, no user namespaces
    ("no landlock", {"landlock_create_ruleset": errno.ENOSYS}, REFUSAL),  # an old kernel or profile
    ("escapes", {}, ESCAPES),
]


def pod_script() -> str:
    """Resolve and reach S3 from the pod, then run each scenario in a process of its own."""
    runs = [(name, deny_prelude(deny) + script) for name, deny, script in SCENARIOS]
    return textwrap.dedent(f"""
        import os, socket, subprocess, sys
        from urllib.parse import urlparse
        endpoint = urlparse(os.environ["S3_ENDPOINT"])
        host = socket.gethostbyname(endpoint.hostname)
        socket.create_connection((host, endpoint.port), timeout=10).close()
        print("the pod reaches S3 at", host, flush=True)
        env = {{**os.environ, "S3_HOST": host}}
        for name, script in {runs!r}:
            proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
            print("=== " + name, proc.returncode)
            print(proc.stdout, proc.stderr, flush=True)
    """)


def parse_escapes(section: str) -> dict[str, dict[str, str]]:
    """{program: {field: value}} from the `ESCAPE <program> timed_out=... ...` lines of ESCAPES."""
    escapes = {}
    for line in section.splitlines():
        if line.startswith("ESCAPE "):
            name, fields = line.removeprefix("ESCAPE ").split(" timed_out=", 1)
            escapes[name] = dict(field.split("=", 1) for field in f"timed_out={fields}".split())
    return escapes


def test_model_code_in_a_training_pod_gets_no_credentials_and_no_network(kube_pods, kube_namespace):
    ns = kube_namespace
    endpoint = deploy_s3(kube_pods, ns)
    kube_pods.kubectl(
        "create",
        "secret",
        "generic",
        "run-creds",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={SECRET}",
        "--from-literal=AWS_ACCESS_KEY_ID=run-key-id",
        "-n",
        ns,
    )
    container = {
        "envFrom": [{"secretRef": {"name": "run-creds"}}],
        "env": [
            {"name": "S3_ENDPOINT", "value": endpoint},
            {"name": "SECRET_FILE", "value": "/etc/creds/AWS_SECRET_ACCESS_KEY"},
        ],
        "volumeMounts": [{"name": "creds", "mountPath": "/etc/creds", "readOnly": True}],
    }
    volumes = [{"name": "creds", "secret": {"secretName": "run-creds"}}]  # files mode 0644, as by default
    kube_pods.apply(ns, pod("humaneval", pod_script(), container=container, volumes=volumes))
    done = wait_phase(kube_pods, ns, "humaneval", {"Succeeded", "Failed"}, timeout=180)
    logs = kube_pods.kubectl("logs", "humaneval", "-n", ns).stdout
    assert done["status"]["phase"] == "Succeeded", logs
    assert "the pod reaches S3 at" in logs, logs  # the network and the key are there for the pod itself
    sections = {part.split("\n", 1)[0].rsplit(" ", 1)[0]: part for part in logs.split("=== ")[1:]}
    assert set(sections) == {name for name, _, _ in SCENARIOS}, logs
    for name in ("as the pod allows", "no namespaces"):
        assert_nothing_leaked(sections[name])
        assert "denied /etc/creds/AWS_SECRET_ACCESS_KEY PermissionError" in sections[name], sections[name]
        assert "denied /proc/1/environ PermissionError" in sections[name], sections[name]
    assert "netns" not in sections["no namespaces"].split("LAYERS", 1)[1].splitlines()[0]
    refused = sections["no landlock"]
    assert (
        "REFUSED model-written code is not run: Landlock is not available" in refused
        and "\nran\n" not in refused
    )
    escapes = parse_escapes(sections["escapes"])
    assert set(escapes) == {name for name, _, _, _ in POD_PROGRAMS}, sections["escapes"]
    for name, _, _, timeout in POD_PROGRAMS:
        fields = escapes[name]
        assert fields["survivors"] == "0" and float(fields["seconds"]) < timeout + 30, (name, fields)
    assert escapes["fork bomb"]["timed_out"] == "True" and escapes["holder"]["timed_out"] == "False", escapes
    # Tasks of the pod's uid in other pods, which its /proc does not show, leave the programs less room
    # (possibly no fork at all), never more.
    assert 0 < int(escapes["fork bomb"]["announced"]) <= FORK_BOUND, escapes["fork bomb"]
