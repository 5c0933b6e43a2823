"""The binaries the test cluster runs and the CRDs it installs, all built by tests/kube/build.sh
(`make setup-kube`) into a cache folder named after the pinned versions (tests/kube/versions.env,
tests/kube/bin-dir.sh): Kubernetes, etcd, CoreDNS, kubectl, helm, the upstream controllers,
the hollow node (kubemark's hollow kubelet), and the nodes' kubelet, containerd, registry and pause.

    folder = require_binaries()   # the bin/ folder, or a ControlPlaneError saying how to build it
    files = crd_files()           # the repository's CRDs, then the upstream controllers'
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.kube.host import ControlPlaneError

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BINARIES = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "etcd",
    "kubectl",
    "helm",
    "hollow-node",
    "coredns",
    "training-operator.v1",
    "ray-operator",
    "kueue",
    "trainer-controller-manager",
    "jobset",
    "kube-network-policies",
    "kubelet",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "registry",
    "pause",
)


def bin_dir() -> Path:
    """The cache folder holding the binaries for the pinned versions (it may not exist yet)."""
    out = subprocess.run([str(HERE / "bin-dir.sh")], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def require_binaries() -> Path:
    """The binary folder, or a ControlPlaneError telling how to build it."""
    folder = bin_dir()
    missing = [name for name in BINARIES if not (folder / name).is_file()]
    if missing or not (folder.parent / "complete").exists():
        raise ControlPlaneError(
            f"the test Kubernetes binaries are not built ({', '.join(missing) or 'incomplete build'} "
            f"missing in {folder}); run `make setup-kube` (builds Kubernetes, etcd, CoreDNS, the node "
            "agent, kubectl and helm from Go modules, about 20-30 minutes the first time)"
        )
    os.utime(folder.parent)  # in use: tests/kube/build.sh keeps builds used within the hour
    return folder


def crd_files() -> list[Path]:
    """Every CRD to install: the repository's own (manifests/crd/*.yaml) and the upstream ones."""
    ours = sorted((REPO / "manifests/crd").glob("*.yaml"))
    upstream = sorted((bin_dir().parent / "crds").glob("*.yaml"))
    return ours + upstream
