"""The cluster's lifecycle: a clear error without binaries, `up`/`down` (make kube-up/kube-down)
leave nothing running or configured, and servers started for a test run die with it even when it
is killed.
Run: .venv/bin/pytest tests/kube/test_cluster.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.fixtures.kube import require_pods
from tests.kube import binaries, cluster, host


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(host.alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if host.alive(p)]


def test_missing_binaries_name_the_setup_target(monkeypatch, tmp_path):
    monkeypatch.setattr(binaries, "bin_dir", lambda: tmp_path / "bin")
    with pytest.raises(cluster.ControlPlaneError, match=r"run `make setup-kube`"):
        binaries.require_binaries()


def test_a_cluster_without_the_disk_its_images_need_refuses_to_start(monkeypatch, tmp_path):
    usage = shutil.disk_usage(tmp_path)._replace(free=5 * 2**30)
    monkeypatch.setattr(cluster.shutil, "disk_usage", lambda path: usage)
    plane = cluster.Cluster(tmp_path / "cluster", bin_dir=tmp_path, local_images=("trainer",))
    with pytest.raises(cluster.ControlPlaneError, match=r"need about 12 GB free .*; 5\.0 GB is free"):
        plane.start()
    assert not (tmp_path / "cluster" / "network-slot").exists()  # nothing was started


def leftovers(network: cluster.Network) -> list[str]:
    """What of a cluster's network slot is still on this machine."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines() if line.startswith(network.netns)]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {network.host_link}" for line in links.splitlines() if f" {network.host_link}@" in line]
    routes = subprocess.run(["ip", "route", "show"], capture_output=True, text=True).stdout
    found += [
        f"route {line}"
        for line in routes.splitlines()
        if line.startswith((network.pod_network, network.service_cidr))
    ]
    mounts = Path("/proc/mounts").read_text()
    found += [f"mount {line}" for line in mounts.splitlines() if network.netns in line]
    if network.cgroup is not None and network.cgroup.exists():
        found.append(f"cgroup {network.cgroup}")
    return found


@pytest.mark.kube
@pytest.mark.slow
def test_up_then_down_runs_pods_and_leaves_nothing_behind():
    """`make kube-up` / `make kube-down`: nodes Ready and a pod runs, a second `up` says it is already
    running; down leaves no process, network namespace, link, route, iptables rule (they live in the
    cluster's namespace), mount or cgroup. It needs no session cluster, so `make test` runs it beside
    the one the cluster's tests use: the two take network slots of their own."""
    require_pods(host.pods_unsupported())
    # A short folder: the kubelet's sockets below it must fit a Unix socket path (108 bytes), which a
    # test's tmp_path (pytest-NNN/<test name>/) may not leave room for.
    state = Path(tempfile.mkdtemp(prefix="kube-up-"))
    run = [sys.executable, "-m", "tests.kube.cluster"]
    up = subprocess.run(
        [*run, "up", "--state-dir", str(state)], cwd=cluster.REPO, capture_output=True, text=True
    )
    assert up.returncode == 0, up.stderr
    network = cluster.Network(int((state / "network-slot").read_text()))
    pids = [int(f.read_text()) for f in state.glob("*.pid")]
    assert len(pids) == 6  # etcd, apiserver, controller-manager, scheduler, kube-proxy, kube-network-policies
    try:
        assert subprocess.run([*run, "status", "--state-dir", str(state)], cwd=cluster.REPO).returncode == 0
        env = {
            **os.environ,
            "KUBECONFIG": str(state / "config"),
            "PATH": f"{binaries.bin_dir()}{os.pathsep}{os.environ['PATH']}",
            "KUBECACHEDIR": str(state / "cache"),
        }
        kubectl = ["kubectl", "--request-timeout=20s"]
        nodes = subprocess.run(
            [*kubectl, "get", "nodes", "--no-headers"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert [line.split()[1] for line in nodes.splitlines()] == ["Ready", "Ready"]
        subprocess.run(
            [
                *kubectl,
                "run",
                "hello",
                "--image=busybox:1.36",
                "--restart=Never",
                "--command",
                "--",
                "sh",
                "-c",
                "echo up $((2 + 2))",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + 60
        phase = ""
        while phase != "Succeeded" and time.monotonic() < deadline:
            phase = subprocess.run(
                [*kubectl, "get", "pod", "hello", "-o", "jsonpath={.status.phase}"],
                env=env,
                capture_output=True,
                text=True,
            ).stdout
            time.sleep(0.3)
        logs = subprocess.run([*kubectl, "logs", "hello"], env=env, capture_output=True, text=True).stdout
        assert (phase, logs) == ("Succeeded", "up 4\n")
        again = subprocess.run(
            [*run, "up", "--state-dir", str(state)], cwd=cluster.REPO, capture_output=True, text=True
        )
        assert "already running" in again.stdout
    finally:
        down = subprocess.run(
            [*run, "down", "--state-dir", str(state)], cwd=cluster.REPO, capture_output=True, text=True
        )
    assert down.returncode == 0, down.stderr
    assert wait_gone(pids) == []
    assert leftovers(network) == []
    assert not list(state.glob("*.pid"))
    assert subprocess.run([*run, "status", "--state-dir", str(state)], cwd=cluster.REPO).returncode == 1
    shutil.rmtree(state)


STARTER = """
import json, sys, time
from pathlib import Path
from tests.kube.cluster import Cluster
plane = Cluster(Path(sys.argv[1]), pods=False)
plane.start()
print(json.dumps([p.pid for p in plane.processes.values()]), flush=True)
time.sleep(600)
"""


@pytest.mark.kube
def test_servers_die_with_a_killed_test_process(kube, tmp_path):
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path)], cwd=cluster.REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        pids = json.loads(starter.stdout.readline())
        assert len(pids) == 4 and all(host.alive(p) for p in pids)
    finally:
        os.kill(starter.pid, signal.SIGKILL)  # no cleanup code gets to run
        starter.wait()
    assert wait_gone(pids) == []
