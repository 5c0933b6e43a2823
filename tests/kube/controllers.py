"""The add-ons of the test cluster (tests/kube/cluster.py), installed from manifests once its nodes
are Ready, each running as pods of the cluster and waited for until its Deployments are ready:

- CoreDNS as the upstream addon (tests/kube/addons/coredns.yaml: a Deployment in kube-system behind
  the `kube-dns` Service);
- the Kubeflow training-operator (PyTorchJob) and the KubeRay operator (RayCluster, RayService), as
  pods from their upstream install manifests, each with the RBAC those manifests give it;
- with `Cluster.trainer` (`up --trainer`), JobSet (namespace jobset-system) and Kubeflow Trainer v2
  (namespace kubeflow-system) from their install manifests, webhooks included, so the cluster serves
  TrainJobs beside PyTorchJobs (without it, nanorun's `compute.launcher: auto` means PyTorchJob);
  they start before Kueue, which then has its TrainJob integration on too. Trainer runs with its
  alpha `TrainJobStatus` feature gate on (`TRAINER_FEATURE_GATES`): its status server takes the
  progress a TrainJob's pods report (HTTPS, projected ServiceAccount token) into
  `status.trainerStatus`;
- Kueue (namespace kueue-system) from its install manifest, with its PyTorchJob, RayCluster and
  RayService integrations (`KUEUE_FRAMEWORKS`) and their admission webhooks (no ClusterQueue: a
  test makes its own).

Each controller runs one replica with leader election off (`NO_LEADER_ELECTION`): a controller that
elects itself renews a Lease every two seconds and exits when it cannot for ten, so every restart of
the API server or etcd (tests/operator/test_liveness_kube.py) would also restart it, and with it its
admission webhooks, which every PyTorchJob creation then waits for.

The install manifests come from tests/kube/build.sh, beside the binaries. `install_crds` applies
CRDs (the repository's and the upstream ones: `crd_files` in tests/kube/cluster.py) and waits until
they are Established.
"""

from __future__ import annotations

import string
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tests.kube.host import ControlPlaneError

if TYPE_CHECKING:
    from tests.kube.cluster import Cluster

ADDONS = Path(__file__).resolve().parent / "addons"
CLUSTER_DOMAIN = "cluster.local"
COREDNS_IMAGE = "registry.k8s.io/coredns/coredns:v1.15.0"

# Kueue's job integrations the test cluster turns on: nanorun's stage jobs (PyTorchJob) and its
# chat service (RayService, and the RayCluster KubeRay makes for it).
KUEUE_FRAMEWORKS = ("kubeflow.org/pytorchjob", "ray.io/raycluster", "ray.io/rayservice")
KUEUE_TRAINJOB = "trainer.kubeflow.org/trainjob"  # on too where Trainer v2 runs (`trainer=True`)


# The controller-runtime configuration (Kueue, JobSet, Trainer) of a single replica.
NO_LEADER_ELECTION = {"leaderElect": False}
KUBERAY_NO_LEADER_ELECTION = "--enable-leader-election=false"  # ray-operator/main.go, default true


def _configure(configmap: dict[str, Any], changes: dict[str, Any]) -> None:
    """A controller-runtime manager's ConfigMap (its `controller_manager_config.yaml`) with the
    top-level `changes` and leader election off."""
    config = yaml.safe_load(configmap["data"]["controller_manager_config.yaml"])
    config.update(changes)
    config["leaderElection"] = {**config.get("leaderElection", {}), **NO_LEADER_ELECTION}
    configmap["data"]["controller_manager_config.yaml"] = yaml.safe_dump(config)


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
        _configure(doc, {"integrations": {"frameworks": list(frameworks)}})
    elif kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        doc["webhooks"] = [w for w in doc.get("webhooks") or [] if _kueue_webhook_enabled(w, frameworks)]
    return doc


# Trainer v2's feature gates the test cluster turns on: TrainJobStatus (alpha, off by default) runs
# the status server to which a TrainJob's pods report progress and metrics (`status.trainerStatus`).
TRAINER_FEATURE_GATES = {"TrainJobStatus": True}


def _trainer_doc(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    """One object of Trainer v2's (or JobSet's) manifest, with `TRAINER_FEATURE_GATES` on and
    leader election off."""
    if not (doc and doc.get("kind") == "ConfigMap"):
        return doc
    if doc["metadata"]["name"] == "kubeflow-trainer-config":
        gates = yaml.safe_load(doc["data"]["controller_manager_config.yaml"]).get("featureGates", {})
        _configure(doc, {"featureGates": {**gates, **TRAINER_FEATURE_GATES}})
    elif doc["metadata"]["name"] == "jobset-manager-config":
        _configure(doc, {})
    return doc


def _kuberay_docs(docs: list[dict[str, Any] | None]) -> list[dict[str, Any] | None]:
    """KubeRay's manifest with its operator's leader election off."""
    for doc in docs:
        if doc and doc.get("kind") == "Deployment" and doc["metadata"]["name"] == "kuberay-operator":
            container = doc["spec"]["template"]["spec"]["containers"][0]
            container["args"] = [*container.get("args", []), KUBERAY_NO_LEADER_ELECTION]
    return docs


Deployment = tuple[str, str]  # namespace, name


def manifest_docs(path: Path) -> list[dict[str, Any]]:
    """The objects of an install manifest, parsed by libyaml: PyYAML's own parser takes most of a
    minute over the controllers' manifests (12 MB, mostly CRD schemas)."""
    return [doc for doc in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader) if doc]


def start_addons(cluster: Cluster, timeout_s: float = 120.0) -> None:
    """Applies every add-on's manifest (Trainer's before Kueue's, whose TrainJob integration needs
    the CRD), then waits until all their Deployments are ready; they start side by side."""
    pending = start_dns(cluster)
    if cluster.controllers:
        pending += start_training_controllers(cluster)
        if cluster.trainer:
            pending += start_trainer(cluster)
        pending += start_kueue(cluster)
    wait_deployments(cluster, pending, timeout_s)


def start_dns(cluster: Cluster) -> list[Deployment]:
    manifest = string.Template((ADDONS / "coredns.yaml").read_text()).substitute(
        DNS_DOMAIN=CLUSTER_DOMAIN, DNS_SERVER_IP=cluster.network.dns_ip, COREDNS_IMAGE=COREDNS_IMAGE
    )
    cluster._kubectl("apply", "-f", "-", input=manifest)
    return [("kube-system", "coredns")]


# The training-operator's init container for PyTorchJob Workers (its default template, from
# pkg/controller.v1/pytorch/initcontainer.go), with the security context Pod Security Admission's
# `restricted` profile asks of every container: the template an admin of a restricted cluster gives
# it at its default path, /etc/config/initContainer.yaml.
PYTORCH_INIT_CONTAINER = """\
- name: init-pytorch
  image: {{.InitContainerImage}}
  imagePullPolicy: IfNotPresent
  resources:
    limits:
      cpu: 100m
      memory: 20Mi
    requests:
      cpu: 50m
      memory: 10Mi
  securityContext:
    allowPrivilegeEscalation: false
    capabilities:
      drop: [ALL]
  command: ['sh', '-c', 'err=1;for i in $(seq {{.MaxTries}}); do if nslookup {{.MasterAddr}}; then err=0 && break; fi;echo waiting for master; sleep 2; done; exit $err']
"""


def _training_operator_docs(docs: list[dict[str, Any] | None]) -> list[dict[str, Any] | None]:
    """The training-operator's manifest with PYTORCH_INIT_CONTAINER as a ConfigMap mounted where
    it reads its init container template."""
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "training-operator-init-container", "namespace": "kubeflow"},
        "data": {"initContainer.yaml": PYTORCH_INIT_CONTAINER},
    }
    for doc in docs:
        if doc and doc.get("kind") == "Deployment" and doc["metadata"]["name"] == "training-operator":
            pod = doc["spec"]["template"]["spec"]
            pod.setdefault("volumes", []).append(
                {"name": "init-container", "configMap": {"name": configmap["metadata"]["name"]}}
            )
            pod["containers"][0].setdefault("volumeMounts", []).append(
                {"name": "init-container", "mountPath": "/etc/config", "readOnly": True}
            )
    return [*docs, configmap]


def start_training_controllers(cluster: Cluster) -> list[Deployment]:
    """The Kubeflow training-operator (namespace kubeflow) and the KubeRay operator (namespace
    default), each from its upstream install manifest (Deployment, ServiceAccount, RBAC, CRDs,
    and the training-operator's validating webhook), running as pods of the cluster and watching
    every namespace; the training-operator's init container template is PYTORCH_INIT_CONTAINER."""
    manifests = cluster.bin_dir.parent / "manifests"
    training = manifest_docs(manifests / "training-operator.yaml")
    apply(cluster, _training_operator_docs(training))
    apply(cluster, _kuberay_docs(manifest_docs(manifests / "kuberay-operator.yaml")))
    return [("kubeflow", "training-operator"), ("default", "kuberay-operator")]


def start_kueue(cluster: Cluster) -> list[Deployment]:
    """Kueue from its install manifest (namespace kueue-system), with the integrations nanorun's
    jobs and chat service use (KUEUE_FRAMEWORKS). Two changes to the upstream manifest: only the
    admission webhooks of enabled integrations are registered (upstream registers every one and
    answers the disabled ones with a no-op; leaving them out keeps, for example, every pod
    creation from depending on Kueue being up), and the visibility API's APIServices are left
    out (this API server runs without the aggregation layer they need). Ready once its
    webhooks answer: Kueue's readiness waits for the certificates it makes and injects."""
    manifest = manifest_docs(cluster.bin_dir.parent / "manifests" / "kueue.yaml")
    frameworks = KUEUE_FRAMEWORKS + ((KUEUE_TRAINJOB,) if cluster.trainer else ())
    docs = [_kueue_doc(doc, frameworks) for doc in manifest if doc.get("kind") != "APIService"]
    apply(cluster, docs)
    return [("kueue-system", "kueue-controller-manager")]


def apply(cluster: Cluster, docs: list[dict[str, Any] | None]) -> None:
    """Server-side apply of an install manifest's objects (empty documents skipped): upstream CRDs
    exceed client-side apply's annotation limit, and a rerun takes over fields it set before."""
    cluster._kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=nanorun-tests",
        "-f",
        "-",
        input=yaml.dump_all([doc for doc in docs if doc], Dumper=yaml.CSafeDumper),
    )


def start_trainer(cluster: Cluster) -> list[Deployment]:
    """JobSet (namespace jobset-system), then Kubeflow Trainer v2 (namespace kubeflow-system,
    which watches JobSets), each from its install manifest with its CRDs, RBAC and admission
    webhooks; both make their webhook certificates themselves. Ready once their Deployments
    are: each one's readiness waits for its certificates."""
    manifests = cluster.bin_dir.parent / "manifests"
    for name in ("jobset", "trainer"):
        apply(
            cluster,
            [_trainer_doc(doc) for doc in manifest_docs(manifests / f"{name}.yaml")],
        )
    return [
        ("jobset-system", "jobset-controller-manager"),
        ("kubeflow-system", "kubeflow-trainer-controller-manager"),
    ]


def wait_deployments(cluster: Cluster, deployments: list[Deployment], timeout_s: float) -> None:
    """Waits until each Deployment has its one replica ready."""
    pending = list(deployments)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        cluster._check_alive()
        namespace, name = pending[0]
        out = cluster._kubectl(
            "get", "deployment", name, "-n", namespace, "-o", "jsonpath={.status.readyReplicas}", check=False
        )
        if out.stdout.strip() == "1":
            pending.pop(0)
        else:
            time.sleep(0.25)
    if pending:
        pods = cluster._kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
        raise ControlPlaneError(f"deployments {pending} not ready after {timeout_s:.0f} s:\n{pods}")


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
