"""What a container gives, on the session cluster's kubelet nodes (tests/kube/kubelet.py: the upstream
kubelet, containerd, runc), from an image pushed to the cluster's registry.

The image is made here from this machine's own programs (sh, id, touch, cat, sleep, tail and the
libraries they load), with USER 1000:1000, and pushed with `podman push --tls-verify=false` (podman
with a storage of its own in the test's folder). A pod from it runs as that user under runAsNonRoot,
cannot write its read-only root filesystem, and has its emptyDir and Secret volumes; `kubectl logs`
and `kubectl exec` reach it; a container over its memory limit ends OOMKilled; runAsUser 0 under
runAsNonRoot is refused; an image the registry lacks fails to pull; a pod without a command runs the
image's CMD in its WORKDIR with its ENV, with a ConfigMap volume, the projected ServiceAccount token,
a memory-backed /dev/shm, and turns Ready through a readiness probe.
Run: .venv/bin/pytest tests/kube/test_kubelet.py -q   (needs root)
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.fixtures.kube import KubeEnv, wait_until

pytestmark = [pytest.mark.kube, pytest.mark.slow]

PROGRAMS = ("sh", "id", "touch", "cat", "sleep", "tail", "grep")
SECRET_VALUE = "s3cr3t-for-the-kubelet-node"
GREETING = "hello-from-the-image"
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# The image's CMD: where it runs, its ENV, a ConfigMap volume, the projected ServiceAccount token and
# /dev/shm; then it turns ready (the readiness probe reads /tmp/ready) and stays up.
IMAGE_CMD = (
    'pwd; echo "$GREETING"; cat /config/greeting; echo; cat ' + SERVICE_ACCOUNT + "/namespace; echo; "
    "if [ -s " + SERVICE_ACCOUNT + "/token ]; then echo token; fi; grep -c ' /dev/shm tmpfs ' /proc/mounts; "
    "touch /tmp/ready; exec sleep 3600"
)


def _rootfs(path: Path) -> None:
    """A root filesystem tar of PROGRAMS (in /bin) and the shared libraries ldd says they load."""
    files: dict[str, Path] = {}
    for name in PROGRAMS:
        program = Path(shutil.which(name) or pytest.fail(f"{name} not found"))
        files[f"bin/{name}"] = program.resolve()
        for line in subprocess.run(["ldd", str(program)], capture_output=True, text=True).stdout.splitlines():
            lib = line.split("=>")[-1].split("(")[0].strip()
            if lib.startswith("/"):
                files[lib.lstrip("/")] = Path(lib).resolve()
    with tarfile.open(path, "w") as tar:
        for member, source in sorted(files.items()):
            tar.add(source, arcname=member)
        work = tarfile.TarInfo("work")
        work.type, work.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(work)
        for member, text in {
            "etc/passwd": "root:x:0:0::/:/bin/sh\napp:x:1000:1000::/:/bin/sh\n",
            "etc/group": "root:x:0:\napp:x:1000:\n",
        }.items():
            info = tarfile.TarInfo(member)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))


@pytest.fixture(scope="module")
def image(kube: KubeEnv, tmp_path_factory) -> str:
    """The test image, pushed to the cluster's registry; returns its reference there."""
    work = tmp_path_factory.mktemp("image")
    _rootfs(work / "rootfs.tar")
    ref = f"{kube.cluster.registry.address}/nanorun/probe:1"
    podman = [
        "podman",
        f"--root={work / 'storage'}",
        f"--runroot={work / 'run'}",
        "--storage-driver=vfs",
        "--cgroup-manager=cgroupfs",
        "--events-backend=none",
    ]
    for args in (
        [
            "import",
            *(
                "--change",
                "USER 1000:1000",
                "--change",
                "ENV PATH=/bin",
                "--change",
                f"ENV GREETING={GREETING}",
            ),
            *("--change", "WORKDIR /work", "--change", f"CMD {json.dumps(['sh', '-c', IMAGE_CMD])}"),
            str(work / "rootfs.tar"),
            ref,
        ],
        ["push", "--tls-verify=false", ref],
    ):
        out = subprocess.run([*podman, *args], capture_output=True, text=True)
        assert out.returncode == 0, f"podman {args[0]} failed: {out.stderr}"
    return ref


def _pod(name: str, image: str, command: list[str], **spec) -> dict:
    container = {"name": "main", "image": image, "command": command, **spec.pop("container", {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "containers": [container],
            **spec,
        },
    }


def _status(kube: KubeEnv, name: str) -> dict:
    return kube.get("default", "pod", name).get("status", {})


def _container(status: dict) -> dict:
    return (status.get("containerStatuses") or [{}])[0]


def test_pods_run_in_containers(kube_pods: KubeEnv, image: str) -> None:
    kube = kube_pods
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "probe"},
        "stringData": {"token": SECRET_VALUE},
    }
    script = (
        "id -u; id -g; "
        "if touch /written 2>/dev/null; then echo rootfs-writable; else echo rootfs-read-only; fi; "
        "echo scratch > /scratch/file && cat /scratch/file; cat /secret/token; echo; exec sleep 3600"
    )
    probe = _pod(
        "probe",
        image,
        ["sh", "-c", script],
        securityContext={"runAsNonRoot": True},
        volumes=[{"name": "scratch", "emptyDir": {}}, {"name": "secret", "secret": {"secretName": "probe"}}],
        container={
            "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False},
            "volumeMounts": [
                {"name": "scratch", "mountPath": "/scratch"},
                {"name": "secret", "mountPath": "/secret", "readOnly": True},
            ],
        },
    )
    as_root = _pod(
        "as-root",
        image,
        ["sleep", "3600"],
        securityContext={"runAsNonRoot": True, "runAsUser": 0},
    )
    oom = _pod(
        "oom",
        image,
        ["tail", "/dev/zero"],  # keeps the one endless line it reads in memory
        container={"resources": {"limits": {"memory": "32Mi", "cpu": "500m"}}},
    )
    missing = _pod("missing", image.replace("/probe:1", "/absent:1"), ["sleep", "1"])
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "greeting"},
        "data": {"greeting": "hello-from-a-configmap"},
    }
    defaults = _pod("defaults", image, [])
    container = defaults["spec"]["containers"][0]
    del container["command"]  # the image's CMD, WORKDIR and ENV
    container["volumeMounts"] = [
        {"name": "config", "mountPath": "/config"},
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    container["readinessProbe"] = {"exec": {"command": ["cat", "/tmp/ready"]}, "periodSeconds": 1}
    defaults["spec"]["volumes"] = [
        {"name": "config", "configMap": {"name": "greeting"}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    kube.apply("default", secret, config, probe, as_root, oom, missing, defaults)

    status = wait_until(
        lambda: _status(kube, "probe"), lambda s: s.get("phase") in ("Running", "Failed"), timeout=60
    )
    assert status["phase"] == "Running", json.dumps(status, indent=1)
    assert _container(status)["imageID"].startswith(image.rsplit(":", 1)[0] + "@sha256:")
    logs = wait_until(
        lambda: kube.kubectl("logs", "probe", check=False).stdout, lambda out: SECRET_VALUE in out, timeout=30
    )
    assert logs.split() == ["1000", "1000", "rootfs-read-only", "scratch", SECRET_VALUE]
    assert kube.kubectl("exec", "probe", "--", "id", "-u").stdout.strip() == "1000"
    write = kube.kubectl("exec", "probe", "--", "touch", "/written", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    assert kube.kubectl("exec", "probe", "--", "cat", "/scratch/file").stdout == "scratch\n"

    refused = wait_until(
        lambda: _container(_status(kube, "as-root")).get("state", {}).get("waiting", {}),
        lambda w: w.get("reason") == "CreateContainerConfigError",
        timeout=60,
    )
    assert "non-root" in refused["message"]

    terminated = wait_until(
        lambda: _container(_status(kube, "oom")).get("state", {}).get("terminated"),
        lambda t: t is not None,
        timeout=60,
    )
    assert terminated["reason"] == "OOMKilled" and terminated["exitCode"] == 137, terminated

    waiting = wait_until(
        lambda: _container(_status(kube, "missing")).get("state", {}).get("waiting", {}),
        lambda w: w.get("reason") in ("ErrImagePull", "ImagePullBackOff"),
        timeout=60,
    )
    events = kube.kubectl(
        "get", "events", "--field-selector=involvedObject.name=missing", "-o", "jsonpath={.items[*].message}"
    ).stdout
    assert "not found" in events, (waiting, events)

    ready = wait_until(
        lambda: _status(kube, "defaults"),
        lambda s: any(c["type"] == "Ready" and c["status"] == "True" for c in s.get("conditions", [])),
        timeout=60,
    )
    assert _container(ready)["ready"], ready
    assert kube.kubectl("logs", "defaults").stdout.split() == [
        "/work",
        GREETING,
        "hello-from-a-configmap",
        "default",
        "token",
        "1",
    ]
