"""Every example LLMRun fits the cluster it is written for: on the session cluster's hollow nodes,
shaped like a GPU cluster (tests/fixtures/kube.py `HOLLOW_NODES`: a system node, and two nodes of 8
H100s with InfiniBand, tainted `nvidia.com/gpu`), every pod the training-operator makes for each
stage's PyTorchJob, and every pod KubeRay makes for the RayService, is scheduled, with no
`FailedScheduling`. Stages whose pods are alike but for their commands and environment (`placement`:
most of a run's stages) are placed alike, so one job of each kind is scheduled.

The nodes are hollow nodes (tests/kube/hollow.py: the kubelet with a fake runtime, so the pods
placed there are reported Running and never run; it is placement that is under test). The jobs and
the RayService are exactly what nanorun's operator builds for the example, except the image (one no
registry serves) and a toleration of the hollow nodes' taint. An example with a Kueue queue gets
that LocalQueue, backed by a ClusterQueue with the GPU nodes' capacity, and the cluster's Kueue
admits its suspended jobs.
Run: .venv/bin/pytest tests/kube/test_examples_schedule.py -q   (needs root for the pod network)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from tests.fixtures.kube import KubeEnv, api_keys_secret, wait_until
from tests.kube.cluster import REPO
from tests.kube.hollow import TOLERATION

pytestmark = [pytest.mark.kube, pytest.mark.slow]

EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml")) + [REPO / "examples" / "tiny.yaml"]
ABSENT_IMAGE = "registry.invalid/nanorun-not-pulled:0"


def pods(kube: KubeEnv, ns: str, selector: str) -> list[dict]:
    return json.loads(kube.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json").stdout)["items"]


def failed_scheduling(kube: KubeEnv, ns: str) -> list[str]:
    events = json.loads(kube.kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]
    return [
        f"{e['involvedObject']['name']}: {e['message']}" for e in events if e["reason"] == "FailedScheduling"
    ]


def all_scheduled(kube: KubeEnv, ns: str, selector: str, count: int) -> list[dict]:
    """Waits until `count` pods match and each is bound to a node; fails at the first FailedScheduling."""

    def check() -> list[dict]:
        refused = failed_scheduling(kube, ns)
        assert not refused, refused
        return pods(kube, ns, selector)

    return wait_until(
        check, lambda ps: len(ps) == count and all(p["spec"].get("nodeName") for p in ps), timeout=120
    )


def placement_only(pod_spec: dict) -> None:
    """What this test changes in a pod template: the image, and a toleration of the hollow nodes'
    taint (tests/kube/hollow.py), which keeps every other pod off them."""
    pod_spec["containers"][0]["image"] = ABSENT_IMAGE
    pod_spec["tolerations"] = [*pod_spec.get("tolerations", []), TOLERATION]


def placement(job: dict) -> str:
    """What decides where a job's pods go: each replica's count and pod spec, of its containers
    only their resources."""
    shape = {}
    for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
        pod = copy.deepcopy(replica["template"]["spec"])
        for kind in ("containers", "initContainers"):
            pod[kind] = [c.get("resources") for c in pod.get(kind, [])]
        shape[role] = {"replicas": replica["replicas"], "pod": pod}
    return json.dumps(shape, sort_keys=True)


def make_queue(kube: KubeEnv, ns: str, queue: str) -> None:
    """The LocalQueue `queue` in `ns`, on a ClusterQueue of the two GPU nodes' capacity (a flavor
    without node labels: where pods go stays the pods' own nodeSelector and tolerations)."""
    capacity = {"cpu": "384", "memory": "4Ti", "nvidia.com/gpu": "16", "rdma/ib": "2"}  # 2 x GPU_MACHINE
    quota = [{"name": k, "nominalQuota": v} for k, v in capacity.items()]
    objects = [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "any-node"}},
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": ns},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "resourceGroups": [
                    {
                        "coveredResources": [q["name"] for q in quota],
                        "flavors": [{"name": "any-node", "resources": quota}],
                    }
                ],
            },
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": queue, "namespace": ns},
            "spec": {"clusterQueue": ns},
        },
    ]
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_pod_of_an_example_is_scheduled_on_a_gpu_cluster(kube, example: Path):
    from nanorun.operator.api import parse_spec
    from nanorun.operator.children.pytorchjob import pytorchjob_for_stage
    from nanorun.operator.children.rayservice import rayservice_for_run
    from nanorun.operator.reconcile.plan import stage_plan
    from nanorun.operator.run_ref import RunRef

    body = yaml.safe_load(example.read_text())
    ns = f"schedule-{example.stem.replace('_', '-').replace('.', '-')}"[:50]
    kube.kubectl("create", "namespace", ns)
    wait_until(
        lambda: kube.kubectl("get", "serviceaccount", "default", "-n", ns, check=False).returncode,
        lambda rc: rc == 0,
    )
    spec = parse_spec(body["spec"])
    run = RunRef(name=body["metadata"]["name"], namespace=ns, uid="00000000-0000-0000-0000-000000000003")
    if spec.compute.queue:
        make_queue(kube, ns, spec.compute.queue)
    placed: dict[str, list[str]] = {}
    by_placement: dict[str, list[str]] = {}
    for stage in stage_plan(spec):
        job = pytorchjob_for_stage(run, spec, stage, attempt=1)
        shape = placement(job)
        if shape in by_placement:
            placed[stage.key] = by_placement[shape]
            continue
        job["metadata"].pop("ownerReferences")  # no LLMRun object here
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            placement_only(replica["template"]["spec"])
        name = job["metadata"]["name"]
        kube.apply(ns, job)
        replicas = sum(r["replicas"] for r in job["spec"]["pytorchReplicaSpecs"].values())
        scheduled = all_scheduled(kube, ns, f"training.kubeflow.org/job-name={name}", replicas)
        placed[stage.key] = by_placement[shape] = sorted(p["spec"]["nodeName"] for p in scheduled)
        kube.kubectl("delete", "pytorchjob", name, "-n", ns, "--wait=true", "--timeout=60s")
        wait_until(
            lambda name=name: pods(kube, ns, f"training.kubeflow.org/job-name={name}"), lambda ps: ps == []
        )
    if spec.compute.gpus_per_node:  # GPU stages land on the GPU nodes, one pod per node
        pretrain = placed["pretrain"]
        assert (
            set(pretrain) <= {"gpu-1", "gpu-2"} and len(set(pretrain)) == len(pretrain) == spec.compute.nodes
        )

    if spec.serving.enabled:
        if spec.serving.api_keys_secret:  # as the example's comment says to create it
            kube.apply(ns, api_keys_secret(spec.serving.api_keys_secret, "sk-nanorun-" + "0" * 32))
        service = rayservice_for_run(run, spec, "s3://bucket/runs/x/sft/checkpoints/step_000001")
        service["metadata"].pop("ownerReferences")
        cluster_spec = service["spec"]["rayClusterConfig"]
        for group in [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]:
            placement_only(group["template"]["spec"])
        kube.apply(ns, copy.deepcopy(service))
        expected = 1 + spec.serving.min_replicas
        scheduled = all_scheduled(kube, ns, "ray.io/node-type in (head,worker)", expected)
        nodes = {p["metadata"]["labels"]["ray.io/node-type"]: p["spec"]["nodeName"] for p in scheduled}
        if spec.serving.gpus_per_replica:
            assert nodes["worker"] in {"gpu-1", "gpu-2"}, nodes
    kube.kubectl("delete", "namespace", ns, "--wait=false")
    if spec.compute.queue:
        kube.kubectl("delete", "clusterqueue", ns, "--wait=false")
