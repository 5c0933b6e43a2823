"""A real Kubernetes cluster on this machine; only GPUs are substituted.

The binaries come from `tests/kube/build.sh` (`make setup-kube`), each built from its published Go
module: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, the kubelet,
containerd, the distribution registry, CoreDNS, kubectl, helm, the Kubeflow training-operator,
KubeRay, Kueue, Trainer v2, JobSet, and `hollow-node`, a kubemark hollow kubelet
(tests/kube/hollow.py). `Cluster` (processes and the pod network in tests/kube/host.py) generates a
CA and a certificate per identity (tests/kube/pki.py) and starts, in order:

- etcd and kube-apiserver (Node and RBAC authorization, NodeRestriction and ServiceAccount
  admission), then kube-controller-manager and kube-scheduler, each with its own kubeconfig;
- the nodes of `nodes` (`NodeSpec`s, none by default): hollow nodes, also without the pod network,
  the upstream kubelet with a fake runtime for placement only (their pods are reported Running and
  never run), tainted `nanorun.dev/hollow=true` (NoSchedule and NoExecute);
- with the pod network: the registry and the images pushed to it (tests/kube/registry.py), then
  `kubelet_nodes` kubelet nodes `node-1`.. (tests/kube/kubelet.py: the upstream kubelet, containerd,
  runc), which run every pod in a container; the last is the GPU node, with NVIDIA's GPU labels;
  the GPUs and the NodeSpecs' extended resources are advertised by a PATCH of the Node's status, as
  an admin advertises an extended resource; then kube-proxy (iptables mode) for Services;
- the add-ons, from manifests (tests/kube/controllers.py): CoreDNS, the Kubeflow training-operator,
  the KubeRay operator, Kueue and, with `trainer=True` (`up --trainer`), JobSet and Kubeflow
  Trainer v2.

The pod network needs root (network namespaces, iptables, mounts). Without root the cluster stops
after the scheduler and the hollow nodes: the API and controllers work, pods are scheduled but never
run, and `Cluster.pods_unsupported` says why. Each cluster takes one of four network slots, so
clusters run side by side; /run/nanorun-test-cluster records who owns each.

The pytest fixture `kube` (tests/fixtures/kube.py) uses this module; so does the command line
(tests/kube/cli.py), which keeps a cluster running in the background for trying the operator by
hand:

    python -m tests.kube.cluster up       # or `make kube-up`; writes .kube/config
    python -m tests.kube.cluster status
    python -m tests.kube.cluster down     # or `make kube-down`: no process, namespace, link,
                                          # iptables rule or mount is left behind
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.kube.binaries import require_binaries
from tests.kube.controllers import (
    CLUSTER_DOMAIN,
    COREDNS_IMAGE,
    start_addons,
)
from tests.kube.hollow import HollowNode, advertise_extended_resources, extended_resources
from tests.kube.host import (
    ControlPlaneError,
    Network,
    _log_tail,
    _run,
    _spawn,
    claim_network,
    cleanup_network,
    free_port,
    pods_unsupported,
    record_owner,
    setup_network,
    wait_or_kill,
)
from tests.kube.kubelet import KubeletNode, kubelet_unsupported
from tests.kube.pki import kubeconfig, write_pki
from tests.kube.registry import Registry, push_cluster_images

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
READY_TIMEOUT_S = 60.0
# Components in start order; stop goes the other way.
ORDER = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "kube-network-policies",
)
NETWORK_POLICY_QUEUE = 100  # the NFQUEUE kube-network-policies reads the first packets from


@dataclass(frozen=True)
class NodeSpec:
    """A node of the test cluster: its name, the capacity it declares, labels and taints
    (`key=value:Effect`)."""

    name: str
    capacity: dict[str, str] = field(
        default_factory=lambda: {
            "cpu": "96",
            "memory": "1Ti",
            "pods": "110",
            "nvidia.com/gpu": "8",
            "ephemeral-storage": "1Ti",
        }
    )
    labels: dict[str, str] = field(
        default_factory=lambda: {
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            "nvidia.com/gpu.count": "8",
        }
    )
    taints: tuple[str, ...] = ()


DEFAULT_NODES: tuple[NodeSpec, ...] = ()
# The last kubelet node is the GPU node (the others are system nodes): beside its real CPUs and memory
# it advertises 8 GPUs, substituted (its pods run on CPU), as an extended resource the way a cluster
# admin does (a patch of the Node's status capacity), with the labels NVIDIA's GPU feature discovery
# puts on an H100 node and the taint GPU node pools carry, so the add-ons stay off it. The training
# and serving pods select those labels and tolerate the taint: only that node pulls the trainer and
# serving images, and its two CPUs are theirs.
GPUS = "8"
# The GPU node unpacks the trainer and serving images (7.4 GB together: they share torch's layers)
# with their compressed layers beside them while it pulls. With less free disk than this a run fails
# far into a test (etcd stops on a full disk), so the cluster refuses to start instead.
IMAGES_DISK_GB = 12
NODE_MONITOR_GRACE_S = 24  # kube-controller-manager --node-monitor-grace-period
GPU_LABELS = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": GPUS}
GPU_TAINT = "nvidia.com/gpu=present:NoSchedule"
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


# --- the cluster ----------------------------------------------------------------------------


@dataclass
class Cluster:
    """The whole test cluster with its state in `workdir` (certificates, data, logs, kubeconfigs).

    `detach=False` (tests): the processes die with this process. `detach=True` (`make kube-up`):
    they run in their own sessions and outlive it; `stop` or `down` ends them by pid.
    `pods=None` runs the pod network when this machine can (root); False never does.
    """

    workdir: Path
    detach: bool = False
    nodes: tuple[NodeSpec, ...] = DEFAULT_NODES
    pods: bool | None = None
    controllers: bool = True
    trainer: bool = False  # JobSet and Kubeflow Trainer v2 (TrainJob) too
    # Nodes `node-1`.. that run pods in real containers, and the registry they pull from
    # (tests/kube/kubelet.py, tests/kube/registry.py); they need the pod network.
    kubelet_nodes: int = 2
    # Images of the image builder's storage (`make images`) pushed to the registry at start.
    local_images: tuple[str, ...] = ()
    kubelets: list[KubeletNode] = field(default_factory=list)
    registry: Registry | None = None
    bin_dir: Path = field(default_factory=require_binaries)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    etcd_url: str = ""
    server: str = ""
    pods_unsupported: str | None = None
    network: Network = field(default_factory=lambda: Network(0))
    # Seconds from the start of `start` at which each phase was done (bench/kube_up.py prints them).
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        reason = pods_unsupported()
        if self.pods is False:
            self.pods_unsupported = "this cluster was started without the pod network"
        elif reason:
            self.pods_unsupported = reason
        self.pods = self.pods_unsupported is None

    @property
    def kubeconfig_path(self) -> Path:
        return self.workdir / "config"

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def api_host(self) -> str:
        return self.network.host_ip if self.pods else "127.0.0.1"

    def start(self, attempts: int = 3) -> None:
        """Starts everything (see the module docstring) and waits until the nodes are Ready and
        cluster DNS answers. A free port can be taken by another process before the server binds
        it, so a failed API server start is retried on new ports."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        free_gb = shutil.disk_usage(self.workdir).free / 2**30
        if self.local_images and free_gb < IMAGES_DISK_GB:
            raise ControlPlaneError(
                f"the test cluster's nodes need about {IMAGES_DISK_GB} GB free under {self.workdir} "
                f"for the images they pull and unpack; {free_gb:.1f} GB is free"
            )
        began = time.monotonic()

        def done(phase: str) -> None:
            self.timings[phase] = round(time.monotonic() - began, 2)

        try:
            if self.pods:
                self.network = claim_network(self.workdir)
                (self.workdir / "network-slot").write_text(f"{self.network.slot}\n")
                setup_network(self.network)
            if self.pods and (reason := kubelet_unsupported()):
                raise ControlPlaneError(reason)
            write_pki(
                self.pki,
                nodes=self.node_names,
                node_ip=self.network.gateway,
                service_ip=self.network.kubernetes_ip,
                api_ip=self.api_host,
            )
            for attempt in range(1, attempts + 1):
                try:
                    self._start_etcd()
                    self._start_apiserver()
                    done("apiserver_ready")
                    break
                except ControlPlaneError:
                    self._stop_processes()
                    if attempt == attempts:
                        raise
            self.kubeconfig_path.write_text(kubeconfig(self.server, self.pki))
            self.kubeconfig_path.chmod(0o600)
            self._kubectl("apply", "-f", str(HERE / "addons/rbac.yaml"))
            self._start_controllers()
            for node in self.nodes:  # hollow: no pod network needed
                self._start_node(node)
            if self.pods:
                self._start_registry()
                done("images_pushed")
                self._start_kubelet_nodes()
                self._record_owner()
            self.wait_nodes_ready()
            self._advertise_node_resources()
            done("nodes_ready")
            if self.pods:
                # After the nodes: kube-proxy takes its node's IP from the Node object (and exits
                # when that changes under it).
                self._start_kube_proxy()
                self._start_network_policies()
                self._record_owner()
                start_addons(self)
                done("addons_ready")
        except BaseException:
            self.stop()
            raise

    def _record_owner(self) -> None:
        record_owner(self.network, self.workdir, [os.getpid(), *(p.pid for p in self.processes.values())])

    def _identity(self, user: str) -> Path:
        path = self.workdir / f"{user}.kubeconfig"
        path.write_text(kubeconfig(self.server, self.pki, user=user))
        path.chmod(0o600)
        return path

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        data = self.workdir / "etcd-data"
        shutil.rmtree(data, ignore_errors=True)
        self.etcd_url = f"http://127.0.0.1:{client}"
        self.processes["etcd"] = _spawn(
            [
                str(self.bin_dir / "etcd"),
                "--name=nanorun-test",
                f"--data-dir={data}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=nanorun-test=http://127.0.0.1:{peer}",
                # Test data is disposable: skipping fsync keeps etcd fast on a busy shared disk.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            self.workdir / "etcd.log",
            detach=self.detach,
        )
        self._wait_until(f"{self.etcd_url}/health", "etcd", context=None)

    def _start_apiserver(self) -> None:
        host = self.api_host
        port = free_port(host)
        pki = self.pki
        self.server = f"https://{host}:{port}"
        reconciler = (
            []
            if self.pods
            else [
                # Without the pod network the advertise address is loopback, which the `kubernetes`
                # Service's endpoint reconciler refuses since v1.37; nothing in-cluster dials it then.
                "--endpoint-reconciler-type=none"
            ]
        )
        self.processes["kube-apiserver"] = _spawn(
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                f"--bind-address={host}",
                f"--advertise-address={host}",
                f"--secure-port={port}",
                *reconciler,
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={self.network.service_cidr}",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                f"--kubelet-certificate-authority={pki / 'ca.crt'}",
                "--kubelet-preferred-address-types=InternalIP",
                "--allow-privileged=true",
                "--profiling=false",
            ],
            self.workdir / "kube-apiserver.log",
            detach=self.detach,
        )
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self._wait_until(f"{self.server}/readyz", "kube-apiserver", context=ctx)

    def _start_controllers(self) -> None:
        pki = self.pki
        cm = self._identity("kube-controller-manager")
        self.processes["kube-controller-manager"] = _spawn(
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={cm}",
                f"--authentication-kubeconfig={cm}",
                f"--authorization-kubeconfig={cm}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--service-cluster-ip-range={self.network.service_cidr}",
                f"--cluster-cidr={self.network.pod_network}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--profiling=false",
                # The kubelet reports how pods end; without nodes (no pod network) nothing would.
                "--terminated-pod-gc-threshold=500",
                # A node silent this long is unreachable (default 50 s). The kubelets renew their
                # Lease every 5 s and the hollow nodes post their status every 10 s, so a loaded
                # machine still has room; a lost node's pods are evicted half a minute sooner.
                f"--node-monitor-grace-period={NODE_MONITOR_GRACE_S}s",
            ],
            self.workdir / "kube-controller-manager.log",
            detach=self.detach,
        )
        sched = self._identity("kube-scheduler")
        self.processes["kube-scheduler"] = _spawn(
            [
                str(self.bin_dir / "kube-scheduler"),
                f"--kubeconfig={sched}",
                f"--authentication-kubeconfig={sched}",
                f"--authorization-kubeconfig={sched}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--profiling=false",
            ],
            self.workdir / "kube-scheduler.log",
            detach=self.detach,
        )

    def _start_kube_proxy(self) -> None:
        config = self.workdir / "kube-proxy.yaml"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(self._identity("kube-proxy"))},
                    "mode": "iptables",
                    "clusterCIDR": self.network.pod_network,
                    "hostnameOverride": self.kubelet_names[0],
                    "healthzBindAddress": "127.0.0.1:10256",
                    "metricsBindAddress": "127.0.0.1:10249",
                    # Pods share one bridge: masquerading all Service traffic sends replies back through the
                    # host, where the DNAT is undone, also between two pods on the bridge.
                    "iptables": {"masqueradeAll": True, "minSyncPeriod": "0s", "syncPeriod": "30s"},
                    # Leave the host's conntrack table size alone.
                    "conntrack": {"maxPerCore": 0},
                }
            )
        )
        self.processes["kube-proxy"] = _spawn(
            [*self.network.exec_argv(), str(self.bin_dir / "kube-proxy"), f"--config={config}"],
            self.workdir / "kube-proxy.log",
            detach=self.detach,
            cgroup=self.network.cgroup,
        )

    def _start_network_policies(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """kube-network-policies, enforcing NetworkPolicies on the pods' traffic: the first packet
        of each connection to a pod goes to an NFQUEUE, where the process decides from the
        policies, pods and namespaces it watches, and accepts or drops it. It runs once, for the
        GPU node (`--hostname-override`), where the training and serving pods run: the kubelet
        nodes share the cluster namespace.

        Upstream sends the packets to its queue with nftables' `queue` expression, which this
        machine's kernel lacks (CONFIG_NFT_QUEUE is not set: its nftables batch fails with
        "netlink receive: no such file or directory", and it keeps logging so); the kernel has
        the xtables NFQUEUE target, so an iptables rule in the cluster namespace sends the same
        packets instead: new connections to the GPU node's pod range, before source NAT and after
        kube-proxy's DNAT, except those of root's own sockets (the kubelets' probes), which
        upstream lets through too. Without a listener the queue drops them (upstream's default,
        no `--fail-open`).

        It reads the API only through the in-cluster configuration (a ServiceAccount token and
        the CA at /var/run/secrets/kubernetes.io/serviceaccount, the API server in
        KUBERNETES_SERVICE_HOST/PORT): `ip netns exec` gives it a mount namespace of its own, where
        a tmpfs on /run holds them."""
        self._kubectl("apply", "-f", str(HERE / "addons/network-policies.yaml"))
        token = self._kubectl(
            "create", "token", "kube-network-policies", "-n", "kube-system", "--duration=24h"
        ).stdout.strip()
        secrets = self.workdir / "kube-network-policies"
        secrets.mkdir(exist_ok=True)
        (secrets / "token").write_text(token)
        (secrets / "token").chmod(0o600)
        shutil.copy(self.pki / "ca.crt", secrets / "ca.crt")
        folder = "/run/secrets/kubernetes.io/serviceaccount"
        script = (
            "set -e; mount -t tmpfs -o size=1m,mode=0755 kube-network-policies /run; "
            f'mkdir -p {folder}; cp "$1/token" "$1/ca.crt" {folder}/; shift; exec "$@"'
        )
        host, port = self.server.removeprefix("https://").rsplit(":", 1)
        self.processes["kube-network-policies"] = _spawn(
            [
                *self.network.exec_argv(),
                "sh",
                "-c",
                script,
                "sh",
                str(secrets),
                str(self.bin_dir / "kube-network-policies"),
                f"--hostname-override={self.gpu_node}",
                f"--nfqueue-id={NETWORK_POLICY_QUEUE}",
                "--disable-nri",  # pod IPs from the API (no NRI socket in this containerd)
                # Kernels from 6.12 on have the conntrack fix that this works around.
                "--netfilter-bug-1766-fix=false",
                "--metrics-bind-address=127.0.0.1:0",
                "-v=2",  # each verdict in its log
            ],
            self.workdir / "kube-network-policies.log",
            detach=self.detach,
            env={**os.environ, "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port},
            cgroup=self.network.cgroup,
        )
        # Ready once it reads its queue (the kernel lists the queue's reader in the namespace).
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            queues = _run([*self.network.exec_argv(), "cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
            if any(line.split()[:1] == [str(NETWORK_POLICY_QUEUE)] for line in queues.splitlines()):
                self._queue_new_connections()
                return
            time.sleep(0.2)
        log = self.workdir / "kube-network-policies.log"
        raise ControlPlaneError(
            f"kube-network-policies not reading NFQUEUE {NETWORK_POLICY_QUEUE} after {timeout_s:.0f} s; "
            f"last lines of {log}:\n{_log_tail(log)}"
        )

    def _queue_new_connections(self) -> None:
        """The iptables rules that send kube-network-policies its packets (see
        `_start_network_policies`)."""
        gpu = next(node for node in self.kubelets if node.name == self.gpu_node)
        chain = "NANORUN-NETWORK-POLICIES"
        for rule in (
            ["-N", chain],
            ["-A", chain, "-m", "owner", "--uid-owner", "0", "-j", "RETURN"],
            [
                "-A",
                chain,
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-j",
                "NFQUEUE",
                "--queue-num",
                str(NETWORK_POLICY_QUEUE),
            ],
            ["-A", "POSTROUTING", "-d", gpu.pod_cidr, "-j", chain],
        ):
            out = _run([*self.network.exec_argv(), "iptables", "-t", "mangle", *rule])
            if out.returncode != 0:
                raise ControlPlaneError(f"`iptables -t mangle {' '.join(rule)}` failed: {out.stderr.strip()}")

    def _start_node(self, node: NodeSpec) -> None:
        """A hollow node (tests/kube/hollow.py): placement only, its pods never run. With the pod
        network it runs on this machine's end of the cluster's link, in the cluster's cgroup."""
        hollow = HollowNode(
            name=node.name,
            state=self.workdir / "nodes" / node.name,
            bin_dir=self.bin_dir,
            kubeconfig=self._identity(f"node-{node.name}"),
            capacity=node.capacity,
            labels=node.labels,
            taints=node.taints,
            log=self.workdir / f"node-{node.name}.log",
            node_ip=self.network.host_ip if self.pods else None,
            detach=self.detach,
            cgroup=self.network.cgroup if self.pods else None,
        )
        hollow.start()
        self.processes[f"node/{node.name}"] = hollow.process

    def _advertise_node_resources(self) -> None:
        """The extended resources (nvidia.com/gpu, ...) of the NodeSpecs and of the GPU node, as an
        admin advertises them."""
        resources = {n.name: extended_resources(n.capacity) for n in self.nodes}
        if self.kubelet_names:
            resources[self.gpu_node] = {"nvidia.com/gpu": GPUS}
        advertise_extended_resources(self._kubectl, resources)

    @property
    def kubelet_names(self) -> tuple[str, ...]:
        return tuple(f"node-{i}" for i in range(1, self.kubelet_nodes + 1)) if self.pods else ()

    @property
    def node_names(self) -> tuple[str, ...]:
        return (*(n.name for n in self.nodes), *self.kubelet_names)

    def _start_registry(self) -> None:
        """The registry, with the controllers', CoreDNS's, busybox's and pause's images and
        `local_images` pushed."""
        self.registry = Registry(self.workdir / "registry", self.network, self.bin_dir, detach=self.detach)
        self.registry.start()
        with self.registry.pushing():
            push_cluster_images(self.registry, self.bin_dir, extra=(COREDNS_IMAGE,))
            for ref in self.local_images:
                self.registry.push_local(ref)

    def _start_kubelet_nodes(self) -> None:
        assert self.registry is not None
        for index, name in enumerate(self.kubelet_names, start=1):
            node = KubeletNode(
                index=index,
                name=name,
                state=self.workdir / name,
                network=self.network,
                bin_dir=self.bin_dir,
                kubeconfig=self._identity(f"node-{name}"),
                pki=self.pki,
                registry=self.registry.address,
                cluster_dns=self.network.dns_ip,
                cluster_domain=CLUSTER_DOMAIN,
                labels=GPU_LABELS if name == self.gpu_node else {},
                taints=(GPU_TAINT,) if name == self.gpu_node else (),
                detach=self.detach,
            )
            self.kubelets.append(node)
            node.start()

    @property
    def gpu_node(self) -> str:
        return self.kubelet_names[-1]

    def wait_nodes_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        want = set(self.node_names)
        deadline = time.monotonic() + timeout_s
        columns = 'jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}'
        ready: set[str] = set()
        while time.monotonic() < deadline:
            self._check_alive()
            out = self._kubectl("get", "nodes", "-o", columns, check=False)
            ready = {line.split("=")[0] for line in out.stdout.split() if line.endswith("=True")}
            if want <= ready:
                return
            time.sleep(0.2)
        logs = [node.state / "kubelet.log" for node in self.kubelets if node.name not in ready]
        raise ControlPlaneError(
            f"nodes not Ready after {timeout_s:.0f} s (ready: {sorted(ready)})"
            + "".join(f"; last lines of {log}:\n{_log_tail(log)}" for log in logs)
        )

    def _check_alive(self) -> None:
        for node in self.kubelets:
            node.check_alive()
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                log = self.workdir / f"{name.replace('/', '-')}.log"
                raise ControlPlaneError(
                    f"{name} exited with {proc.returncode}; last lines of {log}:\n{_log_tail(log)}"
                )

    def _kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        out = _run([str(self.bin_dir / "kubectl"), *args], input=input, env=self.env())
        if check and out.returncode != 0:
            raise ControlPlaneError(f"`kubectl {' '.join(args)}` failed: {out.stderr.strip()}")
        return out

    def _wait_until(self, url: str, name: str, context: ssl.SSLContext | None) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        log = self.workdir / f"{name}.log"
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with {self.processes[name].returncode}; "
                    f"last lines of {log}:\n{_log_tail(log)}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise ControlPlaneError(
            f"{name} not ready after {READY_TIMEOUT_S:.0f} s at {url}; last lines of {log}:\n{_log_tail(log)}"
        )

    def restart(self, name: str) -> None:
        """Stops one control-plane process (`etcd`, `kube-apiserver`) with SIGTERM and starts it again
        with the same flags (its ports, etcd's data), as a control-plane upgrade or a crash and restart
        does; returns once it (and the API server) is healthy again."""
        old = self.processes[name]
        old.terminate()
        wait_or_kill(old, 30)
        self.processes[name] = _spawn(list(old.args), self.workdir / f"{name}.log", detach=self.detach)
        if self.pods:
            self._record_owner()
        if name == "etcd":
            self._wait_until(f"{self.etcd_url}/health", "etcd", context=None)
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        self._wait_until(f"{self.server}/readyz", "kube-apiserver", context=ctx)

    def kubelet(self, name: str) -> KubeletNode:
        """The kubelet node called `name`."""
        return next(node for node in self.kubelets if node.name == name)

    def stop_node(self, name: str) -> None:
        """Stops kubelet node `name` with its containers (KubeletNode.stop), as a machine that dies:
        its Node and pods stay in the API, and the node lifecycle controller finds it unreachable.
        Its pulled images stay for `start_node`, as on a machine that reboots."""
        self.kubelet(name).stop(keep_images=True)

    def start_node(self, name: str) -> None:
        """Starts a stopped kubelet node again and waits until it is Ready, with its extended
        resources advertised again (a kubelet that registers zeroes those no device plugin gives)."""
        self.kubelet(name).start()
        self.wait_nodes_ready()
        self._advertise_node_resources()

    def _stop_processes(self) -> None:
        """Nodes first (each stops its pods: SIGTERM, then SIGKILL), then the rest in reverse start
        order."""
        names = [n for n in self.processes if n.startswith("node/")]
        names += [n for n in reversed(ORDER) if n in self.processes]
        nodes = [self.processes.pop(n) for n in names if n.startswith("node/")]
        for proc in nodes:
            proc.terminate()
        for proc in nodes:
            wait_or_kill(proc, 30)
        for name in names:
            proc = self.processes.pop(name, None)
            if proc is not None:
                proc.terminate()
                wait_or_kill(proc, 10)

    def stop(self) -> None:
        """Stops every process and removes the pod network from the host."""
        for node in self.kubelets:
            node.stop()
        self.kubelets.clear()
        if self.registry is not None:
            self.registry.stop()
            self.registry = None
        self._stop_processes()
        if self.pods:
            cleanup_network(self.network)

    def env(self) -> dict[str, str]:
        """os.environ for subprocesses: this kubeconfig, the binaries first on PATH, kubectl's and
        helm's caches and config inside the workdir (nothing touches ~/.kube or ~/.config/helm)."""
        env = dict(os.environ)
        env.update(
            KUBECONFIG=str(self.kubeconfig_path),
            PATH=f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}",
            KUBECACHEDIR=str(self.workdir / "cache"),
            HELM_CACHE_HOME=str(self.workdir / "helm/cache"),
            HELM_CONFIG_HOME=str(self.workdir / "helm/config"),
            HELM_DATA_HOME=str(self.workdir / "helm/data"),
        )
        return env


if __name__ == "__main__":
    from tests.kube.cli import main

    sys.exit(main())
