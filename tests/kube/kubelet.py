"""The test cluster's nodes: the upstream kubelet with containerd and runc, running every pod in a
real container from an image pulled from the cluster's registry (tests/kube/registry.py).

`Cluster` (tests/kube/cluster.py) starts `kubelet_nodes` of them, `node-1` .. `node-N`. Each
`KubeletNode` runs, inside the cluster's network namespace (entered with `nsenter --net` only, so that
containerd, runc and the kubelet share this machine's mount namespace and see each other's mounts):

- containerd v2 (built by tests/kube/build.sh) with its own root, state, sockets, runc root and CNI
  configuration: a bridge `kbr<index>` with the pod range 10.<244+slot>.<100+index>.0/24 (Debian's
  containernetworking-plugins: bridge, host-local, portmap, loopback; the bridges share the cluster
  namespace, whose routes join the nodes' pod ranges), Debian's runc, and a `_default` hosts.toml
  that sends every pull to the cluster's registry;
- the kubelet, registered as the node's name with its labels and taints, the cluster's CA, its node
  client certificate and the cluster's kubelet serving certificate, the cgroupfs driver and a cgroup
  root of its own, `/<netns>-<name>`, made in every cgroup v1 hierarchy.

This machine's cgroups are v1: the kubelet needs `failCgroupV1: false` (KEP-5573). Root here lacks
CAP_SYS_RESOURCE, so runc cannot set the negative oom_score_adj the kubelet asks for (pause: -998);
containerd's `restrict_oom_score_adj = true` clamps it to containerd's own.

Stopping a node kills everything in its cgroup tree (kubelet, containerd, shims, containers), unmounts
what it mounted under its state folder and removes its cgroups. A record per node in
/run/nanorun-test-cluster names its state folder, so that `cleanup_kubelets` (called by
tests/kube/host.py's `cleanup_network`) removes what a killed run left, at the next start or at
`make kube-down`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.kube.host import (
    OWNERS,
    ControlPlaneError,
    Network,
    _log_tail,
    _run,
    _spawn,
    alive,
    nsenter_argv,
    wait_or_kill,
)
from tests.kube.registry import PAUSE_IMAGE

CGROUP_V1 = Path("/sys/fs/cgroup")
KUBELET_PORT = 10350
RUNC = "/usr/sbin/runc"
CNI_BIN = "/usr/lib/cni"
# Host paths the kubelet and containerd use whatever their configuration says (fixed upstream).
CONTAINER_LOG_LINKS = Path("/var/log/containers")  # the kubelet's links to its containers' logs
DEVICE_PLUGINS = Path("/var/lib/kubelet/device-plugins")  # its device plugin registration socket
CNI_RESULTS = Path("/var/lib/cni/results")  # the CNI library's cache of attachments
SHIM_SOCKETS = Path("/run/containerd/s")  # the sockets containerd's shims listen on


def kubelet_unsupported() -> str | None:
    """Why this machine cannot run a kubelet node, or None when it can."""
    missing = [p for p in (RUNC, f"{CNI_BIN}/bridge", f"{CNI_BIN}/host-local") if not Path(p).exists()]
    if missing:
        return f"the kubelet node needs {', '.join(missing)} (Debian: apt-get install runc containernetworking-plugins)"
    if not (CGROUP_V1 / "pids/cgroup.procs").exists():
        return "the kubelet node is set up for cgroup v1 hierarchies, which this machine does not mount"
    return None


# --- a kubelet node ---------------------------------------------------------------------------


@dataclass
class KubeletNode:
    """One kubelet node (see the module docstring). `kubeconfig` holds the node's client identity
    (`system:node:<name>`); `pki` the cluster's CA and kubelet serving certificate."""

    index: int
    name: str
    state: Path
    network: Network
    bin_dir: Path
    kubeconfig: Path
    pki: Path
    registry: str
    cluster_dns: str
    cluster_domain: str
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[str, ...] = ()  # `key=value:Effect`
    detach: bool = False
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def cgroup_root(self) -> str:  # the kubelet's cgroupRoot, in every v1 hierarchy
        return f"{self.network.netns}-{self.name}"

    @property
    def pod_cidr(self) -> str:
        return self.network.node_pod_cidr(100 + self.index)

    @property
    def socket(self) -> Path:
        return self.state / "containerd.sock"

    @property
    def record(self) -> Path:
        return _record(self.network, self.name)

    def start(self) -> None:
        """Starts containerd and the kubelet (Ready is left to the
        caller: the Node object appears once the kubelet registers)."""
        cleanup_node(self.state, self.cgroup_root)
        self.state.mkdir(parents=True, exist_ok=True)
        OWNERS.mkdir(parents=True, exist_ok=True)
        self.record.write_text(json.dumps({"state": str(self.state), "cgroup_root": self.cgroup_root}))
        self._make_cgroups()
        self._write_containerd_config()
        env = {**os.environ, "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.processes["containerd"] = _spawn(
            [
                *nsenter_argv(self.network),
                str(self.bin_dir / "containerd"),
                "--config",
                str(self.state / "containerd.toml"),
            ],
            self.state / "containerd.log",
            detach=self.detach,
            env=env,
            cgroup=self._pids_cgroup,
        )
        self._wait_containerd()
        self.processes["kubelet"] = _spawn(
            [
                *nsenter_argv(self.network),
                str(self.bin_dir / "kubelet"),
                f"--config={self._write_kubelet_config()}",
                f"--kubeconfig={self.kubeconfig}",
                f"--root-dir={self.state / 'kubelet'}",
                f"--cert-dir={self.state / 'kubelet-pki'}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.network.gateway}",
                *(
                    [f"--node-labels={','.join(f'{k}={v}' for k, v in self.labels.items())}"]
                    if self.labels
                    else []
                ),
                "-v=1",
            ],
            self.state / "kubelet.log",
            detach=self.detach,
            cgroup=self._pids_cgroup,
        )

    @property
    def _pids_cgroup(self) -> Path:
        return CGROUP_V1 / "pids" / self.cgroup_root

    def _make_cgroups(self) -> None:
        # The kubelet wants its cgroup root in every mounted v1 hierarchy; cpuset's needs its CPUs
        # and memory nodes before a process can join.
        for hierarchy in _hierarchies():
            (hierarchy / self.cgroup_root).mkdir(exist_ok=True)
        cpuset = CGROUP_V1 / "cpuset"
        if (cpuset / "cpuset.cpus").exists():
            for name in ("cpuset.cpus", "cpuset.mems"):
                (cpuset / self.cgroup_root / name).write_text((cpuset / name).read_text())

    def _write_containerd_config(self) -> None:
        s = self.state
        # Every registry host resolves to the cluster's registry (tests/kube/registry.py).
        certs = s / "certs.d" / "_default"
        certs.mkdir(parents=True, exist_ok=True)
        (certs / "hosts.toml").write_text(
            f'server = "http://{self.registry}"\n'
            f'[host."http://{self.registry}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )
        cni = s / "cni"
        cni.mkdir(exist_ok=True)
        (cni / "10-pods.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": self.cgroup_root,
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": f"kbr{self.index}",
                            "isGateway": True,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": self.pod_cidr}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(s / "cni-ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                },
                indent=1,
            )
        )
        (s / "containerd.toml").write_text(f"""\
version = 3
root = "{s}/containerd/root"
state = "{s}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.erofs",
  "io.containerd.nri.v1.nri"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{s}/containerd-ttrpc.sock"
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = "{s}/containerd/opt"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  # The compressed layers are dropped once unpacked: the snapshots are what containers run from.
  discard_unpacked_layers = true
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{s}/certs.d"
[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  netns_mounts_under_state_dir = true
  # Root here lacks CAP_SYS_RESOURCE: runc fails on the kubelet's negative oom_score_adj values.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        SystemdCgroup = false
        Root = "{s}/runc"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN}"]
    conf_dir = "{cni}"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
""")

    def _wait_containerd(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            if self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise ControlPlaneError(f"containerd not answering at {self.socket} after {timeout_s:.0f} s")

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """containerd's `ctr` on this node, in the CRI's namespace k8s.io."""
        out = _run([str(self.bin_dir / "ctr"), "--address", str(self.socket), "--namespace", "k8s.io", *args])
        if check and out.returncode != 0:
            raise ControlPlaneError(f"`ctr {' '.join(args)}` failed: {out.stderr.strip()}")
        return out

    def signal_container(self, container_id: str, sig: str) -> None:
        """Sends `sig` (e.g. SIGSTOP) to a container's main process from the host, as a pod's
        `status.containerStatuses[].containerID` names it (`containerd://<id>`). From the host a
        container's PID 1 can be stopped, which no signal from inside its PID namespace can."""
        self.ctr("task", "kill", "--signal", sig, container_id.removeprefix("containerd://"))

    def _write_kubelet_config(self) -> Path:
        pki = self.pki
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This machine mounts cgroup v1, which the kubelet refuses by default since v1.35 (KEP-5573).
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.cgroup_root}",
            "cgroupsPerQOS": True,
            "enforceNodeAllocatable": ["pods"],
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "imageServiceEndpoint": f"unix://{self.socket}",
            "address": self.network.gateway,
            "port": KUBELET_PORT + self.index,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "podLogsDir": str(self.state / "pod-logs"),
            "tlsCertFile": str(pki / "kubelet.crt"),
            "tlsPrivateKeyFile": str(pki / "kubelet.key"),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "clusterDNS": [self.cluster_dns],
            "clusterDomain": self.cluster_domain,
            "registerWithTaints": [
                {"key": key, "value": value, "effect": effect}
                for key, _, rest in (t.partition("=") for t in self.taints)
                for value, _, effect in [rest.partition(":")]
            ],
            "failSwapOn": False,
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            # A test machine's disk is shared with other work: a moment of little free space must not
            # taint the node (disk-pressure) under a test, so disk eviction is off ("0%").
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "0%",
                "nodefs.inodesFree": "0%",
                "imagefs.available": "0%",
                "imagefs.inodesFree": "0%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "maxPods": 50,
            "nodeStatusUpdateFrequency": "2s",
            # Renewed every quarter of it (5 s): well inside the cluster's node monitor grace period.
            "nodeLeaseDurationSeconds": 20,
            # How soon a changed Secret or ConfigMap reaches the pods that mount it (default 1m):
            # controllers that write their webhook certificates into a mounted Secret wait for it.
            "syncFrequency": "5s",
        }
        path = self.state / "kubelet.yaml"
        path.write_text(json.dumps(config, indent=1))
        return path

    def check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                log = self.state / f"{name}.log"
                raise ControlPlaneError(
                    f"{self.name}: {name} exited with {proc.returncode}; last lines of {log}:\n{_log_tail(log)}"
                )

    def stop(self, keep_images: bool = False) -> None:
        """Stops the kubelet, then every container and containerd, and removes its mounts, cgroups,
        record and, unless `keep_images` (a node that will start again), its image store (gigabytes
        once it pulled the trainer image)."""
        kubelet = self.processes.pop("kubelet", None)
        if kubelet is not None:
            kubelet.terminate()
            wait_or_kill(kubelet, 10)
        cleanup_node(self.state, self.cgroup_root)
        for proc in self.processes.values():  # reaped (cleanup_node killed them)
            wait_or_kill(proc, 10)
        self.processes.clear()
        if not keep_images:
            shutil.rmtree(self.state / "containerd", ignore_errors=True)
        self.record.unlink(missing_ok=True)


# --- cleanup ----------------------------------------------------------------------------------


def _record(network: Network, name: str) -> Path:
    return OWNERS / f"slot-{network.slot}-kubelet-{name}.json"


def _hierarchies() -> list[Path]:
    """The mounted cgroup v1 hierarchies (each controller's folder; not the v2 `unified` one)."""
    return [
        p
        for p in sorted(CGROUP_V1.iterdir())
        if p.is_dir() and not p.is_symlink() and p.name != "unified" and (p / "cgroup.procs").exists()
    ]


def _kill_tree(cgroup: Path) -> int:
    """SIGKILLs every process in a cgroup and its descendants until none is left."""
    killed = 0
    for _ in range(100):
        pids = {int(p) for procs in cgroup.rglob("cgroup.procs") for p in procs.read_text().split()}
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.05)
    return killed


def cleanup_node(state: Path, cgroup_root: str) -> list[str]:
    """Removes what one kubelet node left: its processes (all in its pids cgroup tree), the mounts
    under its state folder (container root filesystems, volumes, pod network namespaces), its cgroups
    in every hierarchy, and the kubelet's links in /var/log/containers. Returns what it removed."""
    removed = []
    pids = CGROUP_V1 / "pids" / cgroup_root
    if pids.is_dir():
        sockets = _shim_sockets(pids)
        removed.append(f"{_kill_tree(pids)} processes of {cgroup_root}")
        for socket in sockets:  # a killed shim leaves its socket behind
            socket.unlink(missing_ok=True)
        for folder in (SHIM_SOCKETS, SHIM_SOCKETS.parent):
            with contextlib.suppress(OSError):
                folder.rmdir()
    prefix = str(state).rstrip("/") + "/"
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    mounts = [m.encode().decode("unicode_escape") for m in mounts]
    ours = sorted({m for m in mounts if m.startswith(prefix)}, key=len, reverse=True)
    for mount in ours:
        _run(["umount", "-l", mount])
    if ours:
        removed.append(f"{len(ours)} mounts under {state}")
    for hierarchy in [*_hierarchies(), CGROUP_V1 / "unified"]:  # runc also makes them in cgroup v2's
        root = hierarchy / cgroup_root
        if root.is_dir():
            for folder in sorted(
                (p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            ):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()
    # The CNI library caches each attachment's result by network name and sandbox id: the pods were
    # not torn down through CNI, so their entries stay unless removed here.
    sandboxes = {p.name for p in state.glob("containerd/*/io.containerd.grpc.v1.cri/sandboxes/*")}
    if CNI_RESULTS.is_dir():
        for entry in CNI_RESULTS.iterdir():
            parts = entry.name.rsplit("-", 2)
            if len(parts) == 3 and (parts[0] == cgroup_root or parts[1] in sandboxes):
                entry.unlink(missing_ok=True)
        for folder in (CNI_RESULTS, CNI_RESULTS.parent):
            with contextlib.suppress(OSError):
                folder.rmdir()
    if CONTAINER_LOG_LINKS.is_dir():
        for link in CONTAINER_LOG_LINKS.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link).startswith(prefix):
                    link.unlink()
    # The kubelet's device plugin socket is at a fixed path: remove it once no kubelet is left.
    if not _kubelet_running():
        (DEVICE_PLUGINS / "kubelet.sock").unlink(missing_ok=True)
        for folder in (DEVICE_PLUGINS, DEVICE_PLUGINS.parent):
            with contextlib.suppress(OSError):
                folder.rmdir()
    return removed


def _shim_sockets(cgroup: Path) -> list[Path]:
    """The sockets the containerd shims in a cgroup tree listen on, under SHIM_SOCKETS (their names
    are hashes, so they are found through the shims' open files)."""
    inodes: dict[str, int] = {}
    for procs in cgroup.rglob("cgroup.procs"):
        for pid in procs.read_text().split():
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes[target[8:-1]] = int(pid)
    sockets = set()
    for pid in set(inodes.values()):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) >= 8 and fields[6] in inodes and fields[7].startswith(f"{SHIM_SOCKETS}/"):
                    sockets.add(Path(fields[7]))
    return sorted(sockets)


def _kubelet_running() -> bool:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if (proc / "comm").read_text().strip() == "kubelet" and alive(int(proc.name)):
                    return True
    return False


def cleanup_kubelets(network: Network) -> list[str]:
    """Removes what the kubelet nodes of a network slot left (from their records); see cleanup_node."""
    removed = []
    for record in sorted(OWNERS.glob(f"slot-{network.slot}-kubelet-*.json")) if OWNERS.is_dir() else []:
        with contextlib.suppress(ValueError, OSError):
            info = json.loads(record.read_text())
            removed += cleanup_node(Path(info["state"]), info["cgroup_root"])
        record.unlink(missing_ok=True)
    return removed
