"""A real Kubernetes cluster on this machine, minus only the container runtime.

The binaries come from `tests/kube/build.sh` (`make setup-kube`), each built from its published Go
module: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, CoreDNS, kubectl,
helm, the Kubeflow training-operator, the KubeRay operator, Kueue, and `nanorun-node`, a virtual-kubelet node whose provider runs pods as local processes
(tests/kube/node). `Cluster` (processes and the pod network in tests/kube/host.py) generates a CA and a certificate per identity (tests/kube/pki.py) and
starts, in order:

- etcd and kube-apiserver (Node and RBAC authorization, NodeRestriction and ServiceAccount
  admission), then kube-controller-manager and kube-scheduler, each with its own kubeconfig;
- the pod network: a Linux bridge whose address (10.244.0.1) is the pods' gateway and the address
  at which they reach the API server and the nodes; kube-proxy (iptables mode) for Services;
- the nodes (by default two of 96 CPUs, 1 TiB and 8 `nvidia.com/gpu`), each a `nanorun-node`
  process: every pod gets its own network namespace and IP on the bridge, a cluster resolv.conf and
  its own mount and UTS namespaces; images map to local programs through tests/kube/images.yaml;
- CoreDNS as the upstream addon (a Deployment in kube-system behind the `kube-dns` Service);
- the Kubeflow training-operator (PyTorchJob) and the KubeRay operator (RayCluster, RayService), as
  pods from their upstream install manifests, each with the RBAC those manifests give it;
- Kueue (namespace kueue-system) from its install manifest, with its PyTorchJob, RayCluster and
  RayService integrations and their admission webhooks (no ClusterQueue: a test makes its own);
- with `trainer=True` (`up --trainer`), JobSet (namespace jobset-system) and Kubeflow Trainer v2
  (namespace kubeflow-system) from their install manifests, webhooks included, so the cluster serves
  TrainJobs beside PyTorchJobs (without it, nanorun's `compute.launcher: auto` means PyTorchJob);
  they start before Kueue, which then has its TrainJob integration on too. Trainer runs with its
  alpha `TrainJobStatus` feature gate on: its status server takes the progress a TrainJob's pods
  report (HTTPS, projected ServiceAccount token) into `status.trainerStatus`.

The pod network needs root (network namespaces, iptables, mounts). Without root the cluster stops
after the scheduler: the API and controllers work, pods are scheduled but never run, and
`Cluster.pods_unsupported` says why. Only one cluster per machine can run pods (kube-proxy owns the
host's iptables chains); /run/nanorun-test-cluster names the one that does.

The pytest fixture `kube` (tests/fixtures/kube.py) uses this module; so does the command line,
which keeps a cluster running in the background for trying the operator by hand:

    python -m tests.kube.cluster up       # or `make kube-up`; writes .kube/config
    python -m tests.kube.cluster status
    python -m tests.kube.cluster down     # or `make kube-down`: no process, namespace, link,
                                          # iptables rule or mount is left behind
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import string
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.kube.host import (
    ControlPlaneError,
    Network,
    _log_tail,
    _owner,
    _run,
    _spawn,
    claim_network,
    cleanup_network,
    record_owner,
    setup_network,
    stop_pid,
)
from tests.kube.pki import kubeconfig, write_pki

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STATE_DIR = REPO / ".kube"  # what `up` writes: config, pid files, logs, etcd data, certificates
BINARIES = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "etcd",
    "kubectl",
    "helm",
    "nanorun-node",
    "coredns",
    "training-operator.v1",
    "ray-operator",
    "kueue",
    "trainer-controller-manager",
    "jobset",
)
CLUSTER_DOMAIN = "cluster.local"
COREDNS_IMAGE = "registry.k8s.io/coredns/coredns:v1.15.0"
READY_TIMEOUT_S = 60.0
# Components in start order; stop goes the other way.
ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy")


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


DEFAULT_NODES = (NodeSpec("node-1"), NodeSpec("node-2"))


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
        began = time.monotonic()

        def done(phase: str) -> None:
            self.timings[phase] = round(time.monotonic() - began, 2)

        try:
            if self.pods:
                self.network = claim_network(self.workdir)
                (self.workdir / "network-slot").write_text(f"{self.network.slot}\n")
                setup_network(self.network)
            write_pki(
                self.pki,
                nodes=tuple(n.name for n in self.nodes),
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
            if self.pods:
                self._start_kube_proxy()
                for index, node in enumerate(self.nodes, start=1):
                    self._start_node(index, node)
                self._record_owner()
                self.wait_nodes_ready()
                done("nodes_ready")
                self._start_dns()
                done("dns_ready")
                if self.controllers:
                    self._start_training_controllers()
                    if self.trainer:  # before Kueue, whose TrainJob integration needs the CRD
                        self._start_trainer()
                    self._start_kueue()
                    done("controllers_ready")
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
                    "hostnameOverride": self.nodes[0].name,
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

    def _start_node(self, index: int, node: NodeSpec) -> None:
        identity = f"node-{node.name}"
        kubeconfig_path = self._identity(identity)
        # The Python environment the images' programs run from: the checkout's (make setup), else
        # this interpreter's.
        venv = REPO / ".venv" if (REPO / ".venv/bin/python").exists() else Path(sys.prefix)
        env = {
            **os.environ,
            "NANORUN_VENV": str(venv),
            "NANORUN_KUBE_BIN": str(self.bin_dir),
            "NANORUN_REPO": str(REPO),
        }
        net = self.network
        argv = [
            *net.exec_argv(),
            str(self.bin_dir / "nanorun-node"),
            "run",
            f"--name={node.name}",
            f"--kubeconfig={kubeconfig_path}",
            f"--listen={net.gateway}:{10249 + index}",
            f"--node-ip={net.gateway}",
            f"--tls-cert={self.pki / 'kubelet.crt'}",
            f"--tls-key={self.pki / 'kubelet.key'}",
            f"--client-ca={self.pki / 'ca.crt'}",
            "--capacity=" + ",".join(f"{k}={v}" for k, v in node.capacity.items()),
            *(f"--label={k}={v}" for k, v in node.labels.items()),
            *(f"--taint={t}" for t in node.taints),
            f"--state-dir={self.workdir / 'nodes' / node.name}",
            f"--images={HERE / 'images.yaml'}",
            f"--bridge={net.bridge}",
            f"--pod-cidr={net.node_pod_cidr(index)}",
            f"--gateway={net.gateway}/16",
            f"--cluster-dns={net.dns_ip}",
            f"--cluster-domain={CLUSTER_DOMAIN}",
            f"--netns-prefix={net.pod_netns_prefix}{node.name}-",
            # Where the images' programs live: containers see these even when they are under /tmp.
            *(
                f"--host-path={p}"
                for p in sorted(
                    {
                        str(REPO),
                        str(venv),
                        str(self.bin_dir),
                        str(Path(venv / "bin" / "python").resolve().parents[1]),
                    }
                )
            ),
        ]
        self.processes[f"node/{node.name}"] = _spawn(
            argv, self.workdir / f"node-{node.name}.log", detach=self.detach, env=env, cgroup=net.cgroup
        )

    def wait_nodes_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        want = {n.name for n in self.nodes}
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
        raise ControlPlaneError(
            f"nodes not Ready after {timeout_s:.0f} s (ready: {sorted(ready)}); last lines of "
            f"{self.workdir / f'node-{self.nodes[0].name}.log'}:\n"
            f"{_log_tail(self.workdir / f'node-{self.nodes[0].name}.log')}"
        )

    def _start_dns(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        manifest = string.Template((HERE / "addons/coredns.yaml").read_text()).substitute(
            DNS_DOMAIN=CLUSTER_DOMAIN, DNS_SERVER_IP=self.network.dns_ip, COREDNS_IMAGE=COREDNS_IMAGE
        )
        self._kubectl("apply", "-f", "-", input=manifest)
        self._wait_deployment("kube-system", "coredns", timeout_s)

    def _start_training_controllers(self, timeout_s: float = 90.0) -> None:
        """The Kubeflow training-operator (namespace kubeflow) and the KubeRay operator (namespace
        default), each from its upstream install manifest (Deployment, ServiceAccount, RBAC, CRDs,
        and the training-operator's validating webhook), running as pods of the cluster and watching
        every namespace."""
        manifests = self.bin_dir.parent / "manifests"
        for name in ("training-operator", "kuberay-operator"):
            self._kubectl(
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=nanorun-tests",
                "-f",
                str(manifests / f"{name}.yaml"),
            )
        for namespace, deployment in (("kubeflow", "training-operator"), ("default", "kuberay-operator")):
            self._wait_deployment(namespace, deployment, timeout_s)

    def _start_kueue(self, timeout_s: float = 90.0) -> None:
        """Kueue from its install manifest (namespace kueue-system), with the integrations nanorun's
        jobs and chat service use (KUEUE_FRAMEWORKS). Two changes to the upstream manifest: only the
        admission webhooks of enabled integrations are registered (upstream registers every one and
        answers the disabled ones with a no-op; leaving them out keeps, for example, every pod
        creation from depending on Kueue being up), and the visibility API's APIServices are left
        out (this API server runs without the aggregation layer they need). Ready once its
        webhooks answer: Kueue's readiness waits for the certificates it makes and injects."""
        manifest = yaml.safe_load_all((self.bin_dir.parent / "manifests" / "kueue.yaml").read_text())
        frameworks = KUEUE_FRAMEWORKS + ((KUEUE_TRAINJOB,) if self.trainer else ())
        docs = [_kueue_doc(doc, frameworks) for doc in manifest if doc and doc.get("kind") != "APIService"]
        self._kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=nanorun-tests",
            "-f",
            "-",
            input=yaml.safe_dump_all(docs),
        )
        self._wait_deployment("kueue-system", "kueue-controller-manager", timeout_s)

    def _start_trainer(self, timeout_s: float = 120.0) -> None:
        """JobSet (namespace jobset-system), then Kubeflow Trainer v2 (namespace kubeflow-system,
        which watches JobSets), each from its install manifest with its CRDs, RBAC and admission
        webhooks; both make their webhook certificates themselves. Ready once their Deployments
        are: each one's readiness waits for its certificates."""
        manifests = self.bin_dir.parent / "manifests"
        for name, namespace, deployment in (
            ("jobset", "jobset-system", "jobset-controller-manager"),
            ("trainer", "kubeflow-system", "kubeflow-trainer-controller-manager"),
        ):
            docs = [_trainer_doc(doc) for doc in yaml.safe_load_all((manifests / f"{name}.yaml").read_text())]
            self._kubectl(
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=nanorun-tests",
                "-f",
                "-",
                input=yaml.safe_dump_all([doc for doc in docs if doc]),
            )
            self._wait_deployment(namespace, deployment, timeout_s)

    def _wait_deployment(self, namespace: str, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            out = self._kubectl(
                "get",
                "deployment",
                name,
                "-n",
                namespace,
                "-o",
                "jsonpath={.status.readyReplicas}",
                check=False,
            )
            if out.stdout.strip() == "1":
                return
            time.sleep(0.25)
        pods = self._kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
        raise ControlPlaneError(f"deployment {namespace}/{name} not ready after {timeout_s:.0f} s:\n{pods}")

    def _check_alive(self) -> None:
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

    def _stop_processes(self) -> None:
        """Nodes first (each stops its pods: SIGTERM, then SIGKILL), then the rest in reverse start
        order."""
        names = [n for n in self.processes if n.startswith("node/")]
        names += [n for n in reversed(ORDER) if n in self.processes]
        nodes = [self.processes.pop(n) for n in names if n.startswith("node/")]
        for proc in nodes:
            proc.terminate()
        for proc in nodes:
            _wait_or_kill(proc, 30)
        for name in names:
            proc = self.processes.pop(name, None)
            if proc is not None:
                proc.terminate()
                _wait_or_kill(proc, 10)

    def stop(self) -> None:
        """Stops every process and removes the pod network from the host."""
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


# Kueue's job integrations the test cluster turns on: nanorun's stage jobs (PyTorchJob) and its
# chat service (RayService, and the RayCluster KubeRay makes for it).
KUEUE_FRAMEWORKS = ("kubeflow.org/pytorchjob", "ray.io/raycluster", "ray.io/rayservice")
KUEUE_TRAINJOB = "trainer.kubeflow.org/trainjob"  # on too where Trainer v2 runs (`trainer=True`)


def _kueue_webhook_enabled(webhook: dict[str, Any], frameworks: tuple[str, ...] = KUEUE_FRAMEWORKS) -> bool:
    """Whether a webhook of Kueue's manifest serves Kueue's own API or an enabled integration (its
    path names the group and kind: /mutate-kubeflow-org-v1-pytorchjob)."""
    path = ((webhook.get("clientConfig") or {}).get("service") or {}).get("path", "")
    if "-kueue-x-k8s-io-" in path:
        return True
    for framework in frameworks:
        group, kind = framework.split("/")
        if f"-{group.replace('.', '-')}-" in path and path.endswith(f"-{kind}"):
            return True
    return False


def _kueue_doc(doc: dict[str, Any], frameworks: tuple[str, ...] = KUEUE_FRAMEWORKS) -> dict[str, Any]:
    """One object of Kueue's manifest, with the integrations `frameworks`."""
    kind = doc.get("kind")
    if kind == "ConfigMap" and doc["metadata"]["name"] == "kueue-manager-config":
        config = yaml.safe_load(doc["data"]["controller_manager_config.yaml"])
        config["integrations"] = {"frameworks": list(frameworks)}
        doc["data"]["controller_manager_config.yaml"] = yaml.safe_dump(config)
    elif kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        doc["webhooks"] = [w for w in doc.get("webhooks") or [] if _kueue_webhook_enabled(w, frameworks)]
    return doc


# Trainer v2's feature gates the test cluster turns on: TrainJobStatus (alpha, off by default) runs
# the status server to which a TrainJob's pods report progress and metrics (`status.trainerStatus`).
TRAINER_FEATURE_GATES = {"TrainJobStatus": True}


def _trainer_doc(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    """One object of Trainer v2's (or JobSet's) manifest, with `TRAINER_FEATURE_GATES` on."""
    if doc and doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == "kubeflow-trainer-config":
        config = yaml.safe_load(doc["data"]["controller_manager_config.yaml"])
        config["featureGates"] = {**config.get("featureGates", {}), **TRAINER_FEATURE_GATES}
        doc["data"]["controller_manager_config.yaml"] = yaml.safe_dump(config)
    return doc


def _wait_or_kill(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def install_crds(files: list[Path], env: dict[str, str], timeout_s: float = 60.0) -> None:
    """Server-side apply (the upstream CRDs exceed client-side apply's annotation limit), then
    wait until every CRD is Established so its API can be used right away."""
    if not files:
        return
    file_args = [arg for f in files for arg in ("-f", str(f))]
    applied = subprocess.run(
        [
            "kubectl",
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=nanorun-tests",
            "-o",
            "name",
            *file_args,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if applied.returncode != 0:
        raise ControlPlaneError(f"installing CRDs failed:\n{applied.stderr.strip()}")
    # Polled rather than `kubectl wait`, which fails outright while a new CRD has no conditions yet.
    columns = (
        'custom-columns=NAME:.metadata.name,ESTABLISHED:.status.conditions[?(@.type=="Established")].status'
    )
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(
            ["kubectl", "get", *applied.stdout.split(), "--no-headers", "-o", columns],
            env=env,
            capture_output=True,
            text=True,
        )
        pending = [line.split()[0] for line in out.stdout.splitlines() if not line.endswith("True")]
        if out.returncode == 0 and not pending:
            return
        if time.monotonic() > deadline:
            raise ControlPlaneError(
                f"CRDs not Established after {timeout_s:.0f} s: {pending} {out.stderr.strip()}"
            )
        time.sleep(0.2)


# --- command line (make kube-up / kube-down) --------------------------------------------------


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
        if exe == name.split("/")[0] or (name.startswith("node/") and exe == "nanorun-node"):
            pids[name] = pid
    return pids


def up(state: Path, nodes: tuple[NodeSpec, ...] = DEFAULT_NODES, trainer: bool = False) -> int:
    running = _running_pids(state)
    if running and len(running) == len(_pid_files(state)):
        print(f"already running ({state / 'config'}); `make kube-down` stops it")
        return 0
    if running:  # part of a cluster (a process died): start over
        down(state)
    cluster = Cluster(state, detach=True, nodes=nodes, trainer=trainer)
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
    parser = argparse.ArgumentParser(prog="python -m tests.kube.cluster", description=__doc__.splitlines()[0])
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
            return up(state, nodes, trainer=args.trainer)
        return {"down": down, "status": status}[args.command](state)
    except ControlPlaneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
