"""Pods run on the test cluster's nodes: the real scheduler places them, the controller-manager's
controllers (ReplicaSet, garbage collector, namespace, endpoints) act on them, kube-proxy and CoreDNS
connect them, and the kubelet nodes run them in containers (tests/kube/kubelet.py); nothing here sets
a status. tests/kube/test_kubelet.py covers what a container itself gives.
Run: .venv/bin/pytest tests/kube/test_pods.py -q   (needs root for the pod network)
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.kube import HOLLOW_NODES, deploy_s3, wait_until
from tests.images.containers import image_ref
from tests.kube.cluster import GPU_LABELS, GPU_TAINT, GPU_TOLERATIONS, GPUS, REPO

pytestmark = pytest.mark.kube

PYTHON = image_ref("operator")  # the smallest of nanorun's images with Python


def pod(name: str, script: str, **spec) -> dict:
    """A pod running a Python script in the operator image."""
    container = {"name": "main", "image": PYTHON, "command": ["python", "-c", textwrap.dedent(script)]}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": spec.pop("labels", {"app": name})},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


wait_for = wait_until


def wait_phase(kube, ns: str, name: str, phases: set[str], timeout: float = 60.0) -> dict:
    return wait_for(
        lambda: kube.get(ns, "pod", name), lambda p: p.get("status", {}).get("phase") in phases, timeout
    )


def events(kube, ns: str, name: str) -> list[dict]:
    out = kube.kubectl(
        "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json"
    )
    return json.loads(out.stdout)["items"]


def test_nodes_are_ready_with_the_declared_capacity(kube_pods):
    every = json.loads(kube_pods.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    for node in every:
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready[0]["status"] == "True"
    # The kubelet nodes on containerd; beside them, the session's hollow nodes (tests/kube/hollow.py).
    nodes = [
        n for n in every if n["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://2.")
    ]
    assert sorted(n["metadata"]["name"] for n in nodes) == ["node-1", "node-2"]
    hollow = sorted(n["metadata"]["name"] for n in every if n not in nodes)
    assert hollow == sorted(n.name for n in HOLLOW_NODES)
    # node-2, the GPU node, advertises its GPUs (the kubelet keeps an admin's extended resource).
    gpu = {n["metadata"]["name"]: n for n in nodes}["node-2"]
    assert gpu["status"]["allocatable"]["nvidia.com/gpu"] == GPUS
    assert GPU_LABELS.items() <= gpu["metadata"]["labels"].items()
    assert "nvidia.com/gpu" not in {n["metadata"]["name"]: n for n in nodes}["node-1"]["status"]["capacity"]
    # The node leases are renewed (the node lifecycle controller would taint a silent node).
    leases = kube_pods.kubectl("get", "leases", "-n", "kube-node-lease", "-o", "name").stdout.split()
    assert sorted(leases) == sorted(f"lease.coordination.k8s.io/{n['metadata']['name']}" for n in every)


def test_a_pod_runs_to_success_and_its_logs_reach_kubectl(kube_pods, kube_namespace):
    ns = kube_namespace
    kube_pods.apply(
        ns,
        pod(
            "hello",
            """
        import os, socket, sys
        print("hello from", socket.gethostname(), os.getcwd())
        print("on stderr", file=sys.stderr)
    """,
        ),
    )
    done = wait_phase(kube_pods, ns, "hello", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded", done["status"]
    state = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (state["exitCode"], state["reason"]) == (0, "Completed")
    assert ipaddress.ip_address(done["status"]["podIP"]) in ipaddress.ip_network(
        kube_pods.cluster.network.pod_network
    )
    logs = kube_pods.kubectl("logs", "hello", "-n", ns).stdout
    # The pod's own hostname (UTS namespace) and the image's working directory.
    assert "hello from hello /\n" in logs
    assert "on stderr\n" in logs


def test_deployment_replicas_are_replaced_scaled_and_collected(kube_pods, kube_namespace):
    ns = kube_namespace
    template = pod("web", "import time; time.sleep(3600)")
    template["spec"]["restartPolicy"] = "Always"
    template["spec"]["terminationGracePeriodSeconds"] = 2
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": template["spec"]},
        },
    }
    kube_pods.apply(ns, deployment)

    def running():
        items = json.loads(kube_pods.kubectl("get", "pods", "-n", ns, "-l", "app=web", "-o", "json").stdout)[
            "items"
        ]
        return sorted(
            p["metadata"]["name"]
            for p in items
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        )

    first = wait_for(running, lambda names: len(names) == 2)
    # Spread over the nodes is the scheduler's choice; both pods are bound to a real node.
    nodes = {kube_pods.get(ns, "pod", n)["spec"]["nodeName"] for n in first}
    assert nodes <= {"node-1", "node-2"}
    kube_pods.kubectl("delete", "pod", first[0], "-n", ns, "--wait=false")
    replaced = wait_for(running, lambda names: len(names) == 2 and first[0] not in names)
    assert first[1] in replaced

    kube_pods.kubectl("scale", "deployment", "web", "-n", ns, "--replicas=0")
    wait_for(
        lambda: kube_pods.kubectl("get", "pods", "-n", ns, "-l", "app=web", "-o", "name").stdout.split(),
        lambda names: names == [],
    )

    # Owner references cascade: deleting the Deployment takes its ReplicaSet (garbage collector).
    assert kube_pods.kubectl("get", "replicasets", "-n", ns, "-o", "name").stdout.split()
    kube_pods.kubectl("delete", "deployment", "web", "-n", ns)
    wait_for(
        lambda: kube_pods.kubectl("get", "replicasets", "-n", ns, "-o", "name").stdout.split(),
        lambda names: names == [],
    )


def test_a_deleted_namespace_goes_away_with_its_pods(kube_pods):
    ns = f"gone-{time.monotonic_ns() % 100000}"
    kube_pods.kubectl("create", "namespace", ns)
    wait_for(
        lambda: kube_pods.kubectl("get", "sa", "default", "-n", ns, check=False).returncode,
        lambda rc: rc == 0,
    )
    kube_pods.apply(ns, pod("sleeper", "import time; time.sleep(3600)", terminationGracePeriodSeconds=1))
    wait_phase(kube_pods, ns, "sleeper", {"Running"})
    kube_pods.kubectl("delete", "namespace", ns, "--wait=false")
    wait_for(
        lambda: kube_pods.kubectl("get", "namespace", ns, check=False).returncode,
        lambda rc: rc != 0,
        timeout=90,
    )


def test_unschedulable_pods_stay_pending_with_the_schedulers_reason(kube_pods, kube_namespace):
    ns = kube_namespace
    too_many = pod(
        "nine-gpus",
        "pass",
        container={"resources": {"limits": {"nvidia.com/gpu": "9"}}},
        tolerations=GPU_TOLERATIONS,
    )
    nowhere = pod("no-such-pool", "pass", nodeSelector={"cloud.google.com/gke-nodepool": "tpu"})
    kube_pods.apply(ns, too_many, nowhere)
    for name, words in (
        ("nine-gpus", "Insufficient nvidia.com/gpu"),
        ("no-such-pool", "didn't match Pod's node affinity/selector"),
    ):
        found = wait_for(
            lambda name=name: events(kube_pods, ns, name),
            lambda evs: any(e["reason"] == "FailedScheduling" for e in evs),
        )
        message = next(e["message"] for e in found if e["reason"] == "FailedScheduling")
        assert words in message and f"0/{2 + len(HOLLOW_NODES)} nodes are available" in message
        status = kube_pods.get(ns, "pod", name)
        assert status["status"]["phase"] == "Pending" and not status["spec"].get("nodeName")


def test_a_toleration_lets_a_pod_onto_a_tainted_node(kube_pods, kube_namespace):
    ns = kube_namespace
    # node-2, the GPU node, carries this taint already; node-1 gets it for this test.
    kube_pods.kubectl("taint", "nodes", "node-1", GPU_TAINT)
    try:
        plain = pod("plain", "pass")
        tolerant = pod(
            "tolerant",
            "pass",
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        )
        kube_pods.apply(ns, plain, tolerant)
        assert wait_phase(kube_pods, ns, "tolerant", {"Succeeded"})["spec"]["nodeName"] in (
            "node-1",
            "node-2",
        )
        found = wait_for(
            lambda: events(kube_pods, ns, "plain"),
            lambda evs: any(e["reason"] == "FailedScheduling" for e in evs),
        )
        assert "untolerated taint" in next(e["message"] for e in found if e["reason"] == "FailedScheduling")
    finally:
        kube_pods.kubectl("taint", "nodes", "node-1", f"{GPU_TAINT}-", check=False)


SERVER = """
import http.server, socket
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"pod {socket.gethostname()}".encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
http.server.HTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""


def test_pods_reach_each_other_through_services_by_dns_name(kube_pods, kube_namespace):
    ns = kube_namespace
    server = pod(
        "backend",
        SERVER,
        labels={"app": "backend"},
        container={
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        },
    )
    server["spec"]["terminationGracePeriodSeconds"] = 1
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "backend"},
        "spec": {"selector": {"app": "backend"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "backend-headless"},
        "spec": {"clusterIP": "None", "selector": {"app": "backend"}, "ports": [{"port": 8080}]},
    }
    kube_pods.apply(ns, server, service, headless)
    wait_for(
        lambda: kube_pods.get(ns, "pod", "backend"),
        lambda p: any(
            c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", [])
        ),
    )
    urls = [
        "http://backend/",
        f"http://backend.{ns}/",
        f"http://backend.{ns}.svc.cluster.local/",
        f"http://backend-headless.{ns}.svc.cluster.local:8080/",
    ]
    # Endpoints reach kube-proxy's rules a moment after the pod turns Ready: retry like a client would.
    client = pod(
        "client",
        f"""
        import socket, time, urllib.request
        for url in {urls!r}:
            for attempt in range(40):
                try:
                    print(url, "->", urllib.request.urlopen(url, timeout=10).read().decode())
                    break
                except OSError as err:
                    print(url, "not yet:", err)
                    time.sleep(0.5)
        print("headless resolves to", socket.gethostbyname("backend-headless"))
    """,
    )
    kube_pods.apply(ns, client)
    done = wait_phase(kube_pods, ns, "client", {"Succeeded", "Failed"})
    logs = kube_pods.kubectl("logs", "client", "-n", ns).stdout
    assert done["status"]["phase"] == "Succeeded", logs
    for url in urls:
        assert f"{url} -> pod backend" in logs
    backend_ip = kube_pods.get(ns, "pod", "backend")["status"]["podIP"]
    assert f"headless resolves to {backend_ip}" in logs
    service_ip = kube_pods.get(ns, "service", "backend")["spec"]["clusterIP"]
    assert ipaddress.ip_address(service_ip) in ipaddress.ip_network(kube_pods.cluster.network.service_cidr)


def test_a_pod_uses_the_api_with_its_service_account_and_rbac_decides(kube_pods, kube_namespace):
    ns = kube_namespace
    kube_pods.kubectl("create", "serviceaccount", "reader", "-n", ns)
    kube_pods.kubectl(
        "create", "role", "read-configmaps", "--verb=get,list", "--resource=configmaps", "-n", ns
    )
    kube_pods.kubectl(
        "create", "rolebinding", "reader", "--role=read-configmaps", f"--serviceaccount={ns}:reader", "-n", ns
    )
    kube_pods.kubectl("create", "configmap", "settings", "--from-literal=depth=20", "-n", ns)
    script = f"""
        from kubernetes import client, config
        from kubernetes.client.rest import ApiException
        config.load_incluster_config()
        core = client.CoreV1Api()
        print("configmap depth", core.read_namespaced_config_map("settings", "{ns}").data["depth"])
        try:
            core.list_namespaced_secret("{ns}")
        except ApiException as err:
            print("secrets", err.status)
    """
    kube_pods.apply(ns, pod("incluster", script, serviceAccountName="reader"))
    done = wait_phase(kube_pods, ns, "incluster", {"Succeeded", "Failed"})
    logs = kube_pods.kubectl("logs", "incluster", "-n", ns).stdout
    assert done["status"]["phase"] == "Succeeded", logs
    assert "configmap depth 20" in logs
    assert "secrets 403" in logs


def test_env_and_volumes_are_resolved_as_by_a_kubelet(kube_pods, kube_namespace):
    ns = kube_namespace
    kube_pods.kubectl(
        "create",
        "secret",
        "generic",
        "s3-creds",
        "--from-literal=AWS_ACCESS_KEY_ID=key-id",
        "--from-literal=AWS_SECRET_ACCESS_KEY=secret",
        "-n",
        ns,
    )
    kube_pods.kubectl(
        "create", "configmap", "settings", "--from-literal=depth=20", "--from-literal=Corefile=. {}", "-n", ns
    )
    script = """
        import os, pathlib, subprocess, sys
        print("argv", sys.argv[1:])
        for key in ("AWS_ACCESS_KEY_ID", "CFG_depth", "DEPTH", "POD_NAME", "POD_NS", "NODE", "POD_IP", "MEM_MI",
                    "CPU", "DERIVED", "KUBERNETES_SERVICE_HOST"):
            print(f"{key}={os.environ.get(key)}")
        sa = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")
        print("token", len((sa / "token").read_text()) > 100, "ns", (sa / "namespace").read_text())
        print("ca", (sa / "ca.crt").read_text().startswith("-----BEGIN CERTIFICATE"))
        print("config", pathlib.Path("/etc/settings/depth").read_text())
        print("secret", pathlib.Path("/etc/creds/AWS_SECRET_ACCESS_KEY").read_text())
        print("shm", [l.split()[2] for l in open("/proc/mounts") if l.split()[1] == "/dev/shm"][-1])
        print("scratch writable", pathlib.Path("/scratch/x").write_text("ok"))
    """
    container = {
        "envFrom": [
            {"secretRef": {"name": "s3-creds"}},
            {"configMapRef": {"name": "settings"}, "prefix": "CFG_"},
        ],
        "env": [
            {"name": "DEPTH", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "depth"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {
                "name": "MEM_MI",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
            },
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu"}}},
            {"name": "DERIVED", "value": "$(POD_NAME)-$(DEPTH)"},
        ],
        "args": ["$(POD_NAME)-$(DEPTH)", "$$(DEPTH)", "$(NOT_SET)"],  # expanded from the env, as in command
        "resources": {"requests": {"cpu": "250m"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [
            {"name": "settings", "mountPath": "/etc/settings"},
            {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "scratch", "mountPath": "/scratch"},
        ],
    }
    volumes = [
        {"name": "settings", "configMap": {"name": "settings"}},
        {"name": "creds", "secret": {"secretName": "s3-creds"}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
        {"name": "scratch", "emptyDir": {}},
    ]
    kube_pods.apply(ns, pod("env", script, container=container, volumes=volumes))
    done = wait_phase(kube_pods, ns, "env", {"Succeeded", "Failed"})
    logs = kube_pods.kubectl("logs", "env", "-n", ns).stdout
    assert done["status"]["phase"] == "Succeeded", logs
    expected = [
        "argv ['env-20', '$(DEPTH)', '$(NOT_SET)']",
        "AWS_ACCESS_KEY_ID=key-id",
        "CFG_depth=20",
        "DEPTH=20",
        "POD_NAME=env",
        f"POD_NS={ns}",
        f"NODE={done['spec']['nodeName']}",
        f"POD_IP={done['status']['podIP']}",
        "MEM_MI=2048",
        "CPU=1",  # a quarter CPU, rounded up by the default divisor of 1
        "DERIVED=env-20",
        f"KUBERNETES_SERVICE_HOST={kube_pods.cluster.network.kubernetes_ip}",
        f"token True ns {ns}",
        "ca True",
        "config 20",
        "secret secret",
        "shm tmpfs",
        "scratch writable 2",
    ]
    for line in expected:
        assert line in logs.splitlines(), f"{line!r} not in:\n{logs}"


def test_probes_restarts_and_previous_logs(kube_pods, kube_namespace):
    ns = kube_namespace
    # A server whose liveness endpoint fails from its third probe on in its first run (an emptyDir
    # remembers the run across restarts): the kubelet restarts it, `kubectl logs --previous` shows
    # the first run, and the exec readiness probe marks the second run Ready.
    script = """
        import http.server, os, pathlib
        first = not pathlib.Path("/state/ran").exists()
        pathlib.Path("/state/ran").write_text("1")
        hits = {"n": 0}
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def do_GET(self):
                hits["n"] += 1
                self.send_response(500 if first and hits["n"] >= 3 else 200); self.end_headers()
        print("run started, first:", first, flush=True)
        http.server.HTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
    """
    container = {
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": 8080},
            "periodSeconds": 1,
            "failureThreshold": 2,
            "initialDelaySeconds": 1,
        },
        "readinessProbe": {
            "exec": {
                "command": ["python", "-c", "import pathlib; assert pathlib.Path('/state/ran').exists()"]
            },
            "periodSeconds": 1,
        },
        "volumeMounts": [{"name": "state", "mountPath": "/state"}],
    }
    kube_pods.apply(
        ns,
        pod(
            "flaky",
            script,
            restartPolicy="Always",
            terminationGracePeriodSeconds=1,
            container=container,
            volumes=[{"name": "state", "emptyDir": {}}],
        ),
    )
    restarted = wait_for(
        lambda: kube_pods.get(ns, "pod", "flaky"),
        lambda p: (
            (p["status"].get("containerStatuses") or [{}])[0].get("restartCount", 0) >= 1
            and "running" in p["status"]["containerStatuses"][0]["state"]
        ),
        timeout=90,
    )
    status = restarted["status"]["containerStatuses"][0]
    assert status["lastState"]["terminated"]["exitCode"] in (137, 143)
    assert any(
        e["reason"] == "Unhealthy" and "Liveness" in e["message"] for e in events(kube_pods, ns, "flaky")
    )
    assert "run started, first: True" in kube_pods.kubectl("logs", "flaky", "-n", ns, "--previous").stdout
    ready = wait_for(
        lambda: kube_pods.get(ns, "pod", "flaky")["status"]["containerStatuses"][0], lambda c: c["ready"]
    )
    assert ready["restartCount"] == 1
    assert "run started, first: False" in kube_pods.kubectl("logs", "flaky", "-n", ns).stdout


GRACEFUL = """
import signal, sys, time
def on_term(*_):
    print("got SIGTERM, saving", flush=True)
    sys.exit(7)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(3600)
"""
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(3600)
"""


@pytest.mark.parametrize(
    ("script", "grace", "code"), [(GRACEFUL, 600, 7), (STUBBORN, 3, 137)], ids=["handles", "ignores"]
)
def test_deleting_a_pod_sends_sigterm_then_sigkill_after_the_grace_period(
    kube_pods, kube_namespace, script, grace, code
):
    from kubernetes import client, watch

    ns = kube_namespace
    kube_pods.apply(ns, pod("victim", script, terminationGracePeriodSeconds=grace))
    wait_for(
        lambda: kube_pods.kubectl("logs", "victim", "-n", ns, check=False).stdout, lambda out: "ready" in out
    )
    core = client.CoreV1Api(kube_pods.api_client())
    stream = watch.Watch()
    started = time.monotonic()
    kube_pods.kubectl("delete", "pod", "victim", "-n", ns, "--wait=false")
    terminated = None
    for event in stream.stream(
        core.list_namespaced_pod, ns, field_selector="metadata.name=victim", timeout_seconds=60
    ):
        statuses = event["object"].status.container_statuses or []
        if statuses and statuses[0].state.terminated:
            terminated = statuses[0].state.terminated
            stream.stop()
    elapsed = time.monotonic() - started
    assert terminated is not None, "no terminated status was reported before the pod went away"
    assert terminated.exit_code == code
    if code == 137:
        assert elapsed >= grace  # SIGKILL only after the grace period
    if code == 7:
        # The object goes once its containers have stopped, not a grace period (10 minutes) later.
        wait_for(
            lambda: kube_pods.kubectl("get", "pod", "victim", "-n", ns, check=False).returncode,
            lambda rc: rc != 0,
            timeout=120,
        )


def test_helm_installs_the_operator_as_a_pod_that_reconciles(kube_pods, kube_namespace):
    """The chart's Deployment runs `nanorun operator` as a pod under the chart's ServiceAccount,
    talking to the API server in-cluster and to an S3 server through its Service; an LLMRun
    applied afterwards gets its first PyTorchJob from that pod."""
    ns = kube_namespace
    endpoint = deploy_s3(kube_pods, ns)
    release = "nr"
    kube_pods.helm(
        "install",
        release,
        str(REPO / "charts" / "nanorun"),
        "-n",
        ns,
        "--set",
        f"operator.watchNamespaces={{{ns}}}",
        "--set",
        f"operator.storage.endpoint={endpoint}",
        "--set",
        "operator.storage.credentialsSecret=s3-creds",
        "--wait",
        "--timeout",
        "180s",
    )
    pods = json.loads(
        kube_pods.kubectl(
            "get", "pods", "-n", ns, "-l", "app.kubernetes.io/name=nanorun", "-o", "json"
        ).stdout
    )["items"]
    assert [p["status"]["phase"] for p in pods] == ["Running"]
    assert pods[0]["spec"]["serviceAccountName"] == f"{release}-nanorun"
    assert pods[0]["spec"]["containers"][0]["command"] == ["nanorun", "operator"]
    # The chart's default image, pulled from the registry, under the chart's securityContext.
    name, operator = pods[0]["metadata"]["name"], image_ref("operator")
    assert pods[0]["status"]["containerStatuses"][0]["image"] == operator
    assert kube_pods.kubectl("exec", "-n", ns, name, "--", "id", "-u").stdout.strip() == "10001"
    write = kube_pods.kubectl("exec", "-n", ns, name, "--", "touch", "/opt/venv/written", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr

    run = yaml.safe_load((REPO / "manifests/examples/tiny-cpu.yaml").read_text())
    run["spec"]["storage"]["endpoint"] = endpoint
    run["spec"]["image"] = image_ref("fake-stage")  # the job runs a fake stage, not training
    run["spec"]["compute"]["launcher"] = "PyTorchJob"  # what `auto` means without Trainer v2
    kube_pods.apply(ns, run)
    jobs = wait_for(
        lambda: json.loads(kube_pods.kubectl("get", "pytorchjobs", "-n", ns, "-o", "json").stdout)["items"],
        lambda items: len(items) >= 1,
        timeout=120,
    )
    owner = jobs[0]["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("LLMRun", "tiny-cpu")
    logs = kube_pods.kubectl("logs", f"deploy/{release}-nanorun", "-n", ns).stdout
    assert "Activity 'configure' succeeded" in logs, logs  # kopf's start-up, from inside the pod
    kube_pods.helm("uninstall", release, "-n", ns, "--wait")


def test_a_restarted_registry_collects_the_layers_only_untagged_images_used(kube_pods, tmp_path):
    """A rebuilt image pushed under its old tag leaves the old manifest untagged; the registry's next
    start deletes it and the layers only it used, and keeps every tagged image whole."""
    from tests.kube.registry import Registry, layer

    registry = Registry(
        tmp_path / "state",
        kube_pods.cluster.network,
        Path(kube_pods.bin_dir),
        storage=tmp_path / "storage",
        port=5099,
    )
    old, new, other = (layer({f"{name}.txt": name.encode()}) for name in ("old", "new", "other"))
    registry.start()
    try:
        registry.push("nanorun/app:1", [old], {})
        registry.push("nanorun/app:1", [new], {})
        registry.push("nanorun/other:1", [other, old], {})
    finally:
        registry.stop()
    blobs = tmp_path / "storage/docker/registry/v2/blobs"
    count = sum(1 for _ in blobs.rglob("data"))
    registry.start()
    try:
        digest = {
            n: "sha256:" + hashlib.sha256(b).hexdigest()
            for n, b in (("old", old), ("new", new), ("other", other))
        }
        for path, name in (("nanorun/app", "new"), ("nanorun/other", "other"), ("nanorun/other", "old")):
            assert registry.has_blob(path, digest[name]), (path, name)
        # The first app:1 manifest (untagged) and its config are gone; the `old` layer stays for other:1.
        assert sum(1 for _ in blobs.rglob("data")) == count - 2
    finally:
        registry.stop()
