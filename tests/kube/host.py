"""What the test cluster puts on this machine: its processes (started so that they die with the test
run, or detached for `make kube-up`) and its pod network (a network namespace per cluster, in one of
a few slots; see `Network`), and whether it can (`pods_unsupported`) and on which free ports
(`free_port`). tests/kube/cluster.py builds the cluster from these."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

OWNERS = Path("/run/nanorun-test-cluster")  # one file per network slot: which cluster holds it
SLOTS = 4


class ControlPlaneError(RuntimeError):
    """The cluster could not be built, started or reached; the message says what to do."""


# --- processes ------------------------------------------------------------------------------


def nsenter_argv(network: Network) -> list[str]:
    """The prefix that runs a command in the cluster namespace without a mount namespace of its own
    (`ip netns exec` would give it one, hiding the kubelet's volume mounts from runc)."""
    return ["nsenter", f"--net=/run/netns/{network.netns}"]


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills it when the thread that started it ends
    (for pytest, the main thread, i.e. the test run), so a run that is killed outright leaks no
    servers."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _spawn(
    argv: list[str], log: Path, *, detach: bool, env: dict[str, str] | None = None, cgroup: Path | None = None
) -> subprocess.Popen:
    def before_exec() -> None:
        if cgroup is not None:  # join it, so that everything this process starts is found later
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        if not detach:
            _die_with_parent()

    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=detach,
            preexec_fn=before_exec,
        )


def wait_or_kill(proc: subprocess.Popen, timeout: float) -> None:
    """Waits `timeout` seconds for `proc` to exit, then SIGKILLs it."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds, for a process that is not our child (one
    `up` started); a pid that is already gone is fine."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


# --- the pod network ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Network:
    """The addresses and names of one cluster's pod network (`slot` 0..3, so that clusters can run
    side by side: `make kube-up` while the tests run).

    Everything of the nodes lives in a network namespace of its own, the cluster namespace, as on a
    node VM: the bridge the pods' veths attach to (its address is the pods' gateway and the nodes'
    InternalIP), kube-proxy and its iptables rules, the kubelet nodes' containerd and their pods'
    bridges (tests/kube/kubelet.py). A veth pair links it to this
    machine, which routes the pod and Service ranges through it; the API server, on this machine,
    listens on the link's address, which pods reach through their gateway. Deleting the cluster
    namespace removes the bridge, the link, the routes and every rule at once.
    """

    slot: int

    @property
    def netns(self) -> str:
        return f"nanorun-c{self.slot}"

    @property
    def pod_netns_prefix(self) -> str:
        return f"{self.netns}-"

    @property
    def host_link(self) -> str:
        return f"nanorun-c{self.slot}"

    @property
    def host_ip(self) -> str:  # this machine's end of the link: the API server's address for pods
        return f"192.168.{240 + self.slot}.1"

    @property
    def ns_ip(self) -> str:
        return f"192.168.{240 + self.slot}.2"

    bridge = "cbr0"

    @property
    def pod_network(self) -> str:
        return f"10.{244 + self.slot}.0.0/16"

    @property
    def gateway(self) -> str:  # the bridge's address: pods' gateway, the nodes' InternalIP
        return f"10.{244 + self.slot}.0.1"

    def node_pod_cidr(self, index: int) -> str:
        return f"10.{244 + self.slot}.{index}.0/24"

    @property
    def service_cidr(self) -> str:
        return f"10.{96 + self.slot}.0.0/16"

    @property
    def kubernetes_ip(self) -> str:  # the first address of the Service range
        return f"10.{96 + self.slot}.0.1"

    @property
    def dns_ip(self) -> str:
        return f"10.{96 + self.slot}.0.10"

    @property
    def owner_file(self) -> Path:
        return OWNERS / f"slot-{self.slot}.json"

    @property
    def cgroup(self) -> Path | None:
        """A cgroup that every node process and pod process joins (they inherit it), so that
        whatever a killed test run left can still be found and ended; None without cgroups."""
        if Path("/sys/fs/cgroup/pids/cgroup.procs").exists():  # cgroup v1
            return Path(f"/sys/fs/cgroup/pids/{self.netns}")
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # cgroup v2
            return Path(f"/sys/fs/cgroup/{self.netns}")
        return None

    def exec_argv(self) -> list[str]:
        """The prefix that runs a command inside the cluster namespace."""
        return ["ip", "netns", "exec", self.netns]


def _owner(network: Network) -> dict | None:
    """The live owner of a slot ({"workdir", "pids"}), or None when the slot is free or stale."""
    try:
        owner = json.loads(network.owner_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return owner if any(alive(p) for p in owner.get("pids", [])) else None


def claim_network(workdir: Path) -> Network:
    """The first free slot, claimed for the cluster in `workdir` (its leftovers removed first)."""
    OWNERS.mkdir(parents=True, exist_ok=True)
    for slot in range(SLOTS):
        network = Network(slot)
        owner = _owner(network)
        if owner is None or owner.get("workdir") == str(workdir):
            cleanup_network(network)
            record_owner(network, workdir, [os.getpid()])
            return network
    raise ControlPlaneError(
        f"all {SLOTS} test cluster network slots are in use (see {OWNERS}); stop a cluster first "
        "(`make kube-down`, or python -m tests.kube.cluster down --state-dir DIR)"
    )


def record_owner(network: Network, workdir: Path, pids: list[int]) -> None:
    network.owner_file.write_text(json.dumps({"workdir": str(workdir), "pids": pids}))


def setup_network(network: Network) -> None:
    n = network
    steps = [
        ["ip", "netns", "add", n.netns],
        ["ip", "link", "add", n.host_link, "type", "veth", "peer", "name", "uplink", "netns", n.netns],
        ["ip", "addr", "add", f"{n.host_ip}/30", "dev", n.host_link],
        ["ip", "link", "set", n.host_link, "up"],
        ["ip", "-n", n.netns, "link", "set", "lo", "up"],
        ["ip", "-n", n.netns, "addr", "add", f"{n.ns_ip}/30", "dev", "uplink"],
        ["ip", "-n", n.netns, "link", "set", "uplink", "up"],
        ["ip", "-n", n.netns, "link", "add", n.bridge, "type", "bridge"],
        ["ip", "-n", n.netns, "addr", "add", f"{n.gateway}/16", "dev", n.bridge],
        ["ip", "-n", n.netns, "link", "set", n.bridge, "up"],
        ["ip", "-n", n.netns, "route", "add", "default", "via", n.host_ip],
        ["ip", "route", "add", n.pod_network, "via", n.ns_ip],
        ["ip", "route", "add", n.service_cidr, "via", n.ns_ip],
        # The cluster namespace routes between the bridge and the link, as a node does.
        [*n.exec_argv(), "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
    ]
    for step in steps:
        out = _run(step)
        if out.returncode != 0:
            cleanup_network(network)
            raise ControlPlaneError(f"pod network: `{' '.join(step)}` failed: {out.stderr.strip()}")
    if n.cgroup is not None:
        n.cgroup.mkdir(exist_ok=True)


def _kill_cgroup(cgroup: Path) -> int:
    """SIGKILLs every process in the cgroup until it is empty; returns how many were killed."""
    killed = 0
    for _ in range(50):
        try:
            pids = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return killed
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        cgroup.rmdir()
    return killed


def cleanup_network(network: Network) -> list[str]:
    """Removes everything of a slot from this machine: its kubelet nodes (tests/kube/kubelet.py), its
    processes (the cgroup's, and any left in the cluster namespace), the pods' network namespaces,
    the cluster namespace (with it the bridge, the link, the routes and kube-proxy's rules) and the
    slot's owner file. Returns what it removed."""
    from tests.kube.kubelet import cleanup_kubelets  # it builds on this module

    removed = cleanup_kubelets(network)
    if network.cgroup is not None and network.cgroup.exists():
        killed = _kill_cgroup(network.cgroup)
        removed.append(f"cgroup {network.cgroup} ({killed} processes)")
    netns = Path("/run/netns")
    pod_namespaces = sorted(netns.glob(network.pod_netns_prefix + "*")) if netns.is_dir() else []
    for ns in [*pod_namespaces, netns / network.netns]:
        if not ns.exists():
            continue
        for pid in _run(["ip", "netns", "pids", ns.name]).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _run(["ip", "netns", "del", ns.name])
        ns.unlink(missing_ok=True)  # a pod namespace whose mount lived in a node's mount namespace
        removed.append(f"netns {ns.name}")
    for etc in Path("/etc/netns").glob(network.pod_netns_prefix + "*") if Path("/etc/netns").is_dir() else []:
        shutil.rmtree(etc, ignore_errors=True)
    if _run(["ip", "link", "show", network.host_link]).returncode == 0:  # the namespace was held open
        _run(["ip", "link", "del", network.host_link])
        removed.append(f"link {network.host_link}")
    network.owner_file.unlink(missing_ok=True)
    return removed


# --- what this machine offers ------------------------------------------------------------------


def pods_unsupported() -> str | None:
    """Why this machine cannot run the pod network, or None when it can."""
    if os.geteuid() != 0:
        return "running pods needs root (network namespaces, a bridge, iptables and mounts)"
    missing = [
        tool
        for tool in ("ip", "iptables", "iptables-restore", "unshare", "nsenter")
        if not shutil.which(tool)
    ]
    if missing:
        return (
            f"running pods needs {', '.join(missing)} (Debian: apt-get install iproute2 iptables util-linux)"
        )
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
