"""Hollow nodes: Nodes shaped like big GPU machines for tests of where pods are *placed*, on a
machine that has a couple of cores.

A `HollowNode` is one `hollow-node` process (tests/kube/cmd/hollow-node, built by
tests/kube/build.sh): a kubemark hollow kubelet, the tool Kubernetes uses for its own scale tests
(https://github.com/kubernetes/community/blob/master/contributors/devel/sig-scalability/kubemark-guide.md;
k8s.io/kubernetes cmd/kubemark and pkg/kubemark). It is the upstream kubelet code with a fake
container runtime and image service (k8s.io/cri-client/pkg/fake), the stub container manager and a
fake cadvisor: it registers its Node, keeps the Node's status and Lease, and drives the pods bound to
it through the kubelet's sync loop, so the scheduler, the controllers and the API see an ordinary
node. **Pods on a hollow node never run**: the fake runtime reports every container Running (every
image "pulls", every probe passes) without running anything, and every pod gets the same fake IP.
Hollow nodes are for placement only: that each pod of a job fits and lands where it should.

The Node declares what the `NodeSpec` says (tests/kube/cluster.py): cpu and memory through the fake
cadvisor's machine info, ephemeral-storage through the container manager, pods as the kubelet's
maxPods, and extended resources (`nvidia.com/gpu`, `rdma/ib`, ...) the way a cluster admin
advertises them on a real cluster, a PATCH of the Node's status capacity
(https://kubernetes.io/docs/tasks/administer-cluster/extended-resource-node/):
`advertise_extended_resources`. The kubelet keeps such resources across its status updates (it
starts each update from the Node the API holds) and copies them into allocatable, which is what the
scheduler reads; `advertise_extended_resources` waits for that.

Every hollow node is tainted `nanorun.dev/hollow=true:NoSchedule` and
`nanorun.dev/hollow=true:NoExecute` (`TAINTS`), so that only pods which tolerate them (`TOLERATION`)
land there: any other pod would be reported Running and do nothing. The NoExecute one keeps off the
pods that tolerate every NoSchedule taint, as add-ons do (CoreDNS's manifest: `operator: Exists,
effect: NoSchedule`), so that cluster DNS cannot end up on a node that only pretends to run it.

Its state (kubelet root, pod logs, container log links, the fake runtime's socket) is in its own
folder; it mounts nothing and touches no host path outside that folder.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.kube.host import ControlPlaneError, _log_tail, _spawn, wait_or_kill

TAINTS = ("nanorun.dev/hollow=true:NoSchedule", "nanorun.dev/hollow=true:NoExecute")
TOLERATION = {"key": "nanorun.dev/hollow", "operator": "Exists"}  # both effects
# NodeSpec capacity keys the hollow kubelet itself reports; the rest are extended resources.
KUBELET_RESOURCES = ("cpu", "memory", "ephemeral-storage", "pods")
# The machine of an 8-GPU InfiniBand node (an H100 server), for the placement tests' GPU nodes.
GPU_MACHINE = {
    "cpu": "192",
    "memory": "2Ti",
    "pods": "110",
    "nvidia.com/gpu": "8",
    "rdma/ib": "1",
    "ephemeral-storage": "1Ti",
}
STATUS_UPDATE_S = 2  # how often the hollow kubelet computes its Node's status, posting changes
STATUS_REPORT_S = 10  # how often it posts the status when nothing changed (a kubelet's default: 5 min)


def extended_resources(capacity: Mapping[str, str]) -> dict[str, str]:
    """The extended resources (`domain/name`) of a capacity; a name that is neither one nor one of
    KUBELET_RESOURCES is refused."""
    other = {k: v for k, v in capacity.items() if k not in KUBELET_RESOURCES}
    unknown = [k for k in other if "/" not in k or k.startswith("kubernetes.io/")]
    if unknown:
        raise ValueError(f"a hollow node cannot declare {', '.join(unknown)}")
    return other


def advertise_extended_resources(
    kubectl: Callable[..., subprocess.CompletedProcess],
    nodes: Mapping[str, Mapping[str, str]],
    timeout_s: float = 60.0,
) -> None:
    """Advertises extended resources on Nodes (node name -> resource -> quantity) as a cluster admin
    does on a real cluster: a JSON patch that adds them to each Node's status capacity (once the Node
    has registered). Then waits until each node's kubelet has copied them into allocatable, which is
    what the scheduler reads. `kubectl` runs kubectl against the cluster as admin
    (`Cluster._kubectl`, `KubeEnv.kubectl`), called with the arguments and `check=False`. Works for
    any kubelet node, hollow or not."""
    nodes = {name: dict(resources) for name, resources in nodes.items() if resources}
    deadline = time.monotonic() + timeout_s
    for node, resources in nodes.items():
        patch = json.dumps(
            [
                {
                    "op": "add",
                    "path": f"/status/capacity/{name.replace('~', '~0').replace('/', '~1')}",
                    "value": value,
                }
                for name, value in resources.items()
            ]
        )
        while True:
            out = kubectl(
                "patch", "node", node, "--subresource=status", "--type=json", "-p", patch, check=False
            )
            if out.returncode == 0:
                break
            if time.monotonic() > deadline:  # the Node never registered, or the patch is refused
                raise ControlPlaneError(
                    f"could not advertise {resources} on node {node}: {out.stderr.strip()}"
                )
            time.sleep(0.2)
    for node, resources in nodes.items():
        while True:
            out = kubectl("get", "node", node, "-o", "jsonpath={.status.allocatable}", check=False)
            allocatable = json.loads(out.stdout or "{}") if out.returncode == 0 else {}
            if all(allocatable.get(k) == v for k, v in resources.items()):
                break
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"node {node}: allocatable is {allocatable} {timeout_s:.0f} s after advertising {resources}"
                )
            time.sleep(0.2)


@dataclass
class HollowNode:
    """One hollow node (see the module docstring) named `name`, declaring `capacity` (cpu in whole
    cores; extended resources are left to `advertise_extended_resources`), with `labels` and
    `taints` (`key=value:Effect`, TAINTS added). `kubeconfig` holds the node's client identity
    (`system:node:<name>`). `node_ip`: the Node's InternalIP, an address of this machine that is not
    loopback (None: the kubelet's choice, the address of the default route's interface). `port`: the
    kubelet API (plain HTTP without authentication, as kubemark's; 0: none, the default, since no
    pod on a hollow node has logs to read or a process to exec in). `cgroup`: one the process joins
    (the cluster's, so that cleanup finds it)."""

    name: str
    state: Path
    bin_dir: Path
    kubeconfig: Path
    capacity: Mapping[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[str, ...] = ()
    log: Path | None = None  # default: <state>/hollow-node.log
    node_ip: str | None = None
    address: str = "127.0.0.1"
    port: int = 0
    detach: bool = False
    cgroup: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.log or self.state / "hollow-node.log"

    def argv(self) -> list[str]:
        extended_resources(self.capacity)  # refuses what it cannot declare
        cpu = self.capacity.get("cpu", "1")
        if not cpu.isdigit():
            raise ValueError(f"node {self.name}: a hollow node's cpu is a whole number of cores, not {cpu}")
        socket = self.state / "runtime.sock"
        if len(str(socket)) > 100:  # a unix socket's path is at most 107 bytes
            raise ControlPlaneError(f"node {self.name}: state folder path too long for {socket}")
        taints = [*self.taints, *TAINTS]
        return [
            str(self.bin_dir / "hollow-node"),
            f"--name={self.name}",
            f"--kubeconfig={self.kubeconfig}",
            f"--root-dir={self.state}",
            f"--address={self.address}",
            f"--port={self.port}",
            *([f"--node-ip={self.node_ip}"] if self.node_ip else []),
            f"--cpus={cpu}",
            f"--memory={self.capacity.get('memory', '4Gi')}",
            f"--ephemeral-storage={self.capacity.get('ephemeral-storage', '0')}",
            f"--max-pods={self.capacity.get('pods', '110')}",
            *(
                [f"--node-labels={','.join(f'{k}={v}' for k, v in self.labels.items())}"]
                if self.labels
                else []
            ),
            f"--register-with-taints={','.join(taints)}",
            f"--node-status-update-frequency={STATUS_UPDATE_S}s",
            f"--node-status-report-frequency={STATUS_REPORT_S}s",
        ]

    def start(self) -> None:
        """Starts the process (Ready and the extended resources are left to the caller: the Node
        appears once the kubelet registers)."""
        self.state.mkdir(parents=True, exist_ok=True)
        self.process = _spawn(self.argv(), self.log_path, detach=self.detach, cgroup=self.cgroup)

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ControlPlaneError(
                f"hollow node {self.name} exited with {self.process.returncode}; last lines of "
                f"{self.log_path}:\n{_log_tail(self.log_path)}"
            )

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            wait_or_kill(self.process, 30)
            self.process = None
