"""The command line of the test cluster (tests/kube/cluster.py), which keeps a cluster running in
the background for trying the operator by hand, its state (kubeconfig, pid files, logs, etcd data,
certificates) in .kube/ unless `--state-dir` says otherwise:

    python -m tests.kube.cluster up       # or `make kube-up`; writes .kube/config, installs the CRDs
    python -m tests.kube.cluster status   # exit status 0 when every process runs
    python -m tests.kube.cluster down     # or `make kube-down`: no process, namespace, link,
                                          # iptables rule or mount is left behind

`up --trainer` also runs JobSet and Kubeflow Trainer v2; `--nodes N` sets the number of kubelet
nodes (default 2; the last is the GPU node). `up` pushes nanorun's images that `make images` built
to the cluster's registry, which every node pulls from (tests/kube/registry.py). `down` and `status`
find the processes through their pid files (`down` also removes the kubelet nodes, through their
records).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from tests.images.containers import NAMES, TEST_NAMES, image_ref
from tests.kube import cluster as cluster_module
from tests.kube.binaries import crd_files
from tests.kube.cluster import ORDER, REPO, Cluster
from tests.kube.controllers import install_crds
from tests.kube.host import ControlPlaneError, Network, _owner, cleanup_network, pods_unsupported, stop_pid

STATE_DIR = REPO / ".kube"  # what `up` writes: config, pid files, logs, etcd data, certificates


def _pid_files(state: Path) -> dict[str, Path]:
    return {f.stem: f for f in state.glob("*.pid")}


def _running_pids(state: Path) -> dict[str, int]:
    """Pids from <state>/*.pid that are still alive and still run our binaries."""
    pids = {}
    for name, path in _pid_files(state).items():
        try:
            pid = int(path.read_text())
            exe = Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()).name
        except (FileNotFoundError, ValueError, IndexError):
            continue
        if exe == name:
            pids[name] = pid
    return pids


def built_images() -> tuple[str, ...]:
    """nanorun's images and the test images that the image builder's storage holds (`make images`,
    `make test-images`)."""
    found = []
    for ref in map(image_ref, (*NAMES, *TEST_NAMES)):
        if subprocess.run(["podman", "image", "exists", ref], capture_output=True).returncode == 0:
            found.append(ref)
    return tuple(found)


def up(state: Path, nodes: int = 2, trainer: bool = False) -> int:
    running = _running_pids(state)
    if running and len(running) == len(_pid_files(state)):
        print(f"already running ({state / 'config'}); `make kube-down` stops it")
        return 0
    if running:  # part of a cluster (a process died): start over
        down(state)
    images = built_images()
    cluster = Cluster(state, detach=True, trainer=trainer, kubelet_nodes=nodes, local_images=images)
    started = time.monotonic()
    try:
        cluster.start()
        for name, proc in cluster.processes.items():
            (state / f"{name.replace('/', '-')}.pid").write_text(f"{proc.pid}\n")
        ready = time.monotonic()
        install_crds(crd_files(), cluster.env())
    except BaseException:
        cluster.stop()
        raise
    pods = (
        f"{nodes} nodes Ready (GPU node: {cluster.gpu_node}), CoreDNS serving"
        if cluster.pods
        else f"no pod network: {cluster.pods_unsupported}"
    )
    print(
        f"cluster up in {ready - started:.1f} s ({pods}); API server {cluster.server}; "
        f"CRDs established {time.monotonic() - ready:.1f} s later\n"
        f"  export KUBECONFIG={cluster.kubeconfig_path}\n"
        f"  export PATH={cluster.bin_dir}:$PATH    # kubectl, helm"
        + (
            f"\n  the nodes pull every image from http://{cluster.registry.address}"
            f" (podman push --tls-verify=false); pushed: {', '.join(images) or 'none (make images)'}"
            if cluster.registry
            else ""
        )
    )
    return 0


def down(state: Path) -> int:
    pids = _running_pids(state)
    names = [n for n in reversed(ORDER) if n in pids]
    for name in names:
        stop_pid(pids[name], timeout=10)
    for path in _pid_files(state).values():
        path.unlink(missing_ok=True)
    removed = []
    slot_file = state / "network-slot"
    if slot_file.exists() and pods_unsupported() is None:
        network = Network(int(slot_file.read_text()))
        owner = _owner(network)
        if owner is None or owner.get("workdir") == str(state):
            removed = cleanup_network(network)
        slot_file.unlink()
    print(
        f"stopped {', '.join(names) or 'nothing (not running)'}"
        + (f"; removed {', '.join(removed)}" if removed else "")
    )
    return 0


def status(state: Path) -> int:
    pids = _running_pids(state)
    files = _pid_files(state)
    for name in sorted(files):
        print(f"{name}: {f'running (pid {pids[name]})' if name in pids else 'not running'}")
    return 0 if files and len(pids) == len(files) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.kube.cluster", description=cluster_module.__doc__.splitlines()[0]
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=STATE_DIR,
        help="where the kubeconfig, pid files, logs and etcd data live (default: .kube/)",
    )
    parser.add_argument(
        "--nodes", type=int, default=2, help="kubelet nodes; the last one is the GPU node (default 2)"
    )
    parser.add_argument(
        "--trainer", action="store_true", help="also run JobSet and Kubeflow Trainer v2 (TrainJob)"
    )
    args = parser.parse_args(argv)
    state = args.state_dir.resolve()
    try:
        if args.command == "up":
            return up(state, args.nodes, trainer=args.trainer)
        return {"down": down, "status": status}[args.command](state)
    except ControlPlaneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
