"""The control-plane lifecycle: a clear error without binaries, `up`/`down` (make kube-up/kube-down)
leave nothing running, and servers started for a test run die with it even when it is killed.
Run: .venv/bin/pytest tests/kube/test_cluster.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.kube import cluster


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(cluster.alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if cluster.alive(p)]


def test_missing_binaries_name_the_setup_target(monkeypatch, tmp_path):
    monkeypatch.setattr(cluster, "bin_dir", lambda: tmp_path / "bin")
    with pytest.raises(cluster.ControlPlaneError, match=r"run `make setup-kube`"):
        cluster.require_binaries()


@pytest.mark.kube
def test_up_then_down_serves_the_api_and_leaves_no_process(kube, tmp_path):
    state = tmp_path / "state"
    run = [sys.executable, "-m", "tests.kube.cluster"]
    up = subprocess.run([*run, "up", "--state-dir", str(state)], cwd=cluster.REPO, capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    pids = [int((state / f"{name}.pid").read_text()) for name in ("etcd", "kube-apiserver")]
    try:
        assert subprocess.run([*run, "status", "--state-dir", str(state)], cwd=cluster.REPO).returncode == 0
        env = {**kube.env, "KUBECONFIG": str(state / "config")}
        crds = subprocess.run(["kubectl", "get", "crd", "-o", "name"], env=env, capture_output=True, text=True, check=True)
        assert "customresourcedefinition.apiextensions.k8s.io/pytorchjobs.kubeflow.org" in crds.stdout.split()
        again = subprocess.run([*run, "up", "--state-dir", str(state)], cwd=cluster.REPO, capture_output=True, text=True)
        assert "already running" in again.stdout
    finally:
        down = subprocess.run([*run, "down", "--state-dir", str(state)], cwd=cluster.REPO, capture_output=True, text=True)
    assert down.returncode == 0
    assert wait_gone(pids) == []
    assert not list(state.glob("*.pid"))
    assert subprocess.run([*run, "status", "--state-dir", str(state)], cwd=cluster.REPO).returncode == 1


STARTER = """
import json, sys, time
from pathlib import Path
from tests.kube.cluster import ControlPlane
plane = ControlPlane(Path(sys.argv[1]))
plane.start()
print(json.dumps([p.pid for p in plane.processes.values()]), flush=True)
time.sleep(600)
"""


@pytest.mark.kube
def test_servers_die_with_a_killed_test_process(kube, tmp_path):
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path)], cwd=cluster.REPO,
                               stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(starter.stdout.readline())
        assert len(pids) == 2 and all(cluster.alive(p) for p in pids)
    finally:
        os.kill(starter.pid, signal.SIGKILL)  # no cleanup code gets to run
        starter.wait()
    assert wait_gone(pids) == []
