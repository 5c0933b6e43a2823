"""The command line of the test cluster (tests/kube/cluster.py), which keeps a cluster running in
the background for trying the operator by hand, its state (kubeconfig, pid files, logs, etcd data,
certificates) in .kube/ unless `--state-dir` says otherwise:

    python -m tests.kube.cluster up       # or `make kube-up`; writes .kube/config, installs the CRDs
    python -m tests.kube.cluster status   # exit status 0 when every process runs
    python -m tests.kube.cluster down     # or `make kube-down`: no process, namespace, link,
                                          # iptables rule or mount is left behind

`up --trainer` also runs JobSet and Kubeflow Trainer v2; `--nodes` and `--gpus-per-node` shape the
nodes; `--kubelet-nodes N` adds N nodes that run pods in containers, and their registry
(tests/kube/kubelet.py). `down` and `status` find the processes through their pid files (`down`
also removes the kubelet nodes, through their records).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tests.kube import cluster as cluster_module
from tests.kube.binaries import crd_files
from tests.kube.cluster import (
    DEFAULT_NODES,
    ORDER,
    REPO,
    Cluster,
    NodeSpec,
)
from tests.kube.controllers import install_crds
from tests.kube.host import ControlPlaneError, Network, _owner, cleanup_network, pods_unsupported, stop_pid

STATE_DIR = REPO / ".kube"  # what `up` writes: config, pid files, logs, etcd data, certificates


def _pid_files(state: Path) -> dict[str, Path]:
    return {
        f.stem.replace("node-", "node/", 1) if f.stem.startswith("node-") else f.stem: f
        for f in state.glob("*.pid")
    }


def _running_pids(state: Path) -> dict[str, int]:
    """Pids from <state>/*.pid that are still alive and still run our binaries."""
    pids = {}
    for name, path in _pid_files(state).items():
        try:
            pid = int(path.read_text())
            exe = Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()).name
        except (FileNotFoundError, ValueError, IndexError):
            continue
        if exe == name.split("/")[0] or (name.startswith("node/") and exe == "hollow-node"):
            pids[name] = pid
    return pids


def up(
    state: Path, nodes: tuple[NodeSpec, ...] = DEFAULT_NODES, trainer: bool = False, kubelet_nodes: int = 0
) -> int:
    running = _running_pids(state)
    if running and len(running) == len(_pid_files(state)):
        print(f"already running ({state / 'config'}); `make kube-down` stops it")
        return 0
    if running:  # part of a cluster (a process died): start over
        down(state)
    cluster = Cluster(state, detach=True, nodes=nodes, trainer=trainer, kubelet_nodes=kubelet_nodes)
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
        f"{len(nodes)} nodes Ready, CoreDNS serving"
        if cluster.pods
        else f"no pod network: {cluster.pods_unsupported}"
    )
    print(
        f"cluster up in {ready - started:.1f} s ({pods}); API server {cluster.server}; "
        f"CRDs established {time.monotonic() - ready:.1f} s later\n"
        f"  export KUBECONFIG={cluster.kubeconfig_path}\n"
        f"  export PATH={cluster.bin_dir}:$PATH    # kubectl, helm"
        + (
            f"\n  kubelet nodes pull from http://{cluster.registry.address} (podman push --tls-verify=false)"
            if cluster.registry
            else ""
        )
    )
    return 0


def down(state: Path) -> int:
    pids = _running_pids(state)
    names = [n for n in pids if n.startswith("node/")] + [n for n in reversed(ORDER) if n in pids]
    for name in names:
        stop_pid(pids[name], timeout=30 if name.startswith("node/") else 10)
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
    parser.add_argument("--nodes", type=int, default=len(DEFAULT_NODES), help="number of nodes (default 2)")
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, help="nvidia.com/gpu each node declares (default 8)"
    )
    parser.add_argument(
        "--trainer", action="store_true", help="also run JobSet and Kubeflow Trainer v2 (TrainJob)"
    )
    parser.add_argument(
        "--kubelet-nodes",
        type=int,
        default=0,
        help="nodes that run pods in containers (kubelet, containerd, runc), with a registry (default 0)",
    )
    args = parser.parse_args(argv)
    state = args.state_dir.resolve()
    try:
        if args.command == "up":
            base = NodeSpec("node")
            nodes = tuple(
                NodeSpec(
                    f"node-{i}",
                    capacity={**base.capacity, "nvidia.com/gpu": str(args.gpus_per_node)},
                    labels={**base.labels, "nvidia.com/gpu.count": str(args.gpus_per_node)},
                )
                for i in range(1, args.nodes + 1)
            )
            return up(state, nodes, trainer=args.trainer, kubelet_nodes=args.kubelet_nodes)
        return {"down": down, "status": status}[args.command](state)
    except ControlPlaneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
