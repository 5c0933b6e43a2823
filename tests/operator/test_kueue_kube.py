"""Runs with `compute.queue` through the real Kueue (tests/kube: Kueue v0.17 from its Go module, with
its PyTorchJob, RayCluster and RayService integrations and its admission webhooks) and the real
training-operator, on the fake-stage image.

A ClusterQueue with 8 GPUs of quota feeds the LocalQueue `training`; each run's pretraining needs 8
(one node of 8 GPUs). The cluster itself has two such nodes: the quota, not the nodes, decides.
Run: .venv/bin/pytest tests/operator/test_kueue_kube.py -q   (needs root for the pod network)
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import yaml
from nanorun.operator.api import GROUP, PLURAL, VERSION
from nanorun.operator.names import WORKLOAD_GROUP, WORKLOAD_PLURAL, WORKLOAD_VERSION
from nanorun.pipeline import storage

from tests.operator.conftest import condition, create_llmrun, get_llmrun, list_jobs, llmrun, wait_for

pytestmark = [pytest.mark.kube, pytest.mark.slow]

TIMEOUT = 120
QUEUE = "training"
H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


@pytest.fixture
def gpu_queue(kube_pods, kube_namespace) -> Iterator[str]:
    """A ResourceFlavor of the H100 nodes, a ClusterQueue of 8 of their GPUs for this namespace only,
    and the LocalQueue `training` in it, as docs/deploy.md sets them up. Yields the ClusterQueue."""
    name = kube_namespace
    objects = [
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": name},
            "spec": {"nodeLabels": H100},
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": kube_namespace}},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": name,
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "64"},
                                    {"name": "memory", "nominalQuota": "512Gi"},
                                    {"name": "nvidia.com/gpu", "nominalQuota": "8"},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": QUEUE, "namespace": kube_namespace},
            "spec": {"clusterQueue": name},
        },
    ]
    kube_pods.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))
    wait_for(
        "the ClusterQueue to be active",
        lambda: (
            kube_pods.kubectl(
                "get", "clusterqueue", name, "-o", "jsonpath={.status.conditions[?(@.type=='Active')].status}"
            ).stdout
            == "True"
        ),
    )
    try:
        yield name
    finally:
        kube_pods.kubectl("delete", "clusterqueue", name, "--wait=false", check=False)
        kube_pods.kubectl("delete", "resourceflavor", name, "--wait=false", check=False)


def gpu_run(name: str, run_dir: str, s3, steps: int, **spec) -> dict:
    """Only pretraining, on one node of 8 GPUs, through the queue."""
    return llmrun(
        name,
        run_dir,
        enabled=("pretrain",),
        storage=s3.access,
        serving={"enabled": False},
        compute={"gpusPerNode": 8, "nodes": 1, "queue": QUEUE},
        stage_args={"pretrain": ["--fake-steps", str(steps), "--fake-step-seconds", "0.2"]},
        **spec,
    )


def phase(api, ns: str, name: str) -> str:
    return (get_llmrun(api, ns, name).get("status") or {}).get("phase", "")


def job_condition_time(api, ns: str, job: str, kind: str) -> str:
    obj = api.get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", job)
    return condition(obj, kind).get("lastTransitionTime", "")


def cluster_queue(kube, name: str) -> dict:
    """The ClusterQueue's status (Kueue's counts of reserving, admitted and pending Workloads)."""
    return json.loads(kube.kubectl("get", "clusterqueue", name, "-o", "json").stdout).get("status") or {}


def workload_of(api, ns: str, job: str) -> dict:
    items = api.list_namespaced_custom_object(WORKLOAD_GROUP, WORKLOAD_VERSION, ns, WORKLOAD_PLURAL)["items"]
    return next(
        (w for w in items if any(o["name"] == job for o in w["metadata"].get("ownerReferences") or [])), {}
    )


def test_two_runs_share_8_gpus_one_waits_queued_and_runs_when_the_first_finishes(
    kube_pods, kube_namespace, cluster_s3, custom_api, operator_process, gpu_queue
):
    ns = kube_namespace
    create_llmrun(custom_api, ns, gpu_run("first", cluster_s3.run_dir("first"), cluster_s3, steps=25))
    wait_for(
        "the first run admitted and running",
        lambda: (
            phase(custom_api, ns, "first") == "Running"
            and job_condition_time(custom_api, ns, "first-pretrain-1", "Running")
        ),
        TIMEOUT,
        operator_process,
    )
    create_llmrun(custom_api, ns, gpu_run("second", cluster_s3.run_dir("second"), cluster_s3, steps=3))

    # Queued in Kueue's words once it has tried the Workload against the quota the first run holds
    # (before that, in nanorun's: Kueue has made no Workload yet).
    queued = wait_for(
        "the second run Queued in Kueue's words",
        lambda: (
            (c := condition(get_llmrun(custom_api, ns, "second"), "Queued")).get("status") == "True"
            and "insufficient" in c.get("message", "")
            and c
        ),
        TIMEOUT,
        operator_process,
    )
    assert phase(custom_api, ns, "second") == "Queued"
    assert f"LocalQueue {QUEUE}" in queued["message"], queued
    assert "nvidia.com/gpu" in queued["message"], queued
    admitted = condition(get_llmrun(custom_api, ns, "first"), "Queued")
    assert (admitted["status"], admitted["reason"]) == ("False", "Admitted") and gpu_queue in admitted[
        "message"
    ]
    table = kube_pods.kubectl("get", "llmrun", "-n", ns).stdout
    row = next(line for line in table.splitlines() if line.startswith("second "))
    assert "Queued" in row.split(), table
    # Kueue holds the second job suspended; it has no pods while the first runs.
    second_job = custom_api.get_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", "second-pretrain-1"
    )
    assert second_job["spec"]["runPolicy"]["suspend"] is True
    assert not kube_pods.kubectl(
        "get", "pods", "-n", ns, "-l", "nanorun.io/run=second", "-o", "name"
    ).stdout.strip()

    wait_for(
        "the first run Succeeded",
        lambda: phase(custom_api, ns, "first") == "Succeeded",
        TIMEOUT,
        operator_process,
    )
    wait_for(
        "the second run Succeeded",
        lambda: phase(custom_api, ns, "second") == "Succeeded",
        TIMEOUT,
        operator_process,
    )
    first_done = job_condition_time(custom_api, ns, "first-pretrain-1", "Succeeded")
    second_started = job_condition_time(custom_api, ns, "second-pretrain-1", "Running")
    assert first_done and second_started and first_done <= second_started, (first_done, second_started)
    events = kube_pods.kubectl(
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        "involvedObject.name=second",
        "-o",
        "jsonpath={.items[*].reason}",
    ).stdout.split()
    assert "RunQueued" in events and "RunSucceeded" in events, events


def test_suspend_deactivates_the_workload_without_a_fight_and_resume_continues_from_the_checkpoint(
    kube_pods, kube_namespace, cluster_s3, custom_api, operator_process, gpu_queue
):
    ns = kube_namespace
    progress_file = storage.join(cluster_s3.run_dir("long"), "pretrain", "progress.json")
    create_llmrun(custom_api, ns, gpu_run("long", cluster_s3.run_dir("long"), cluster_s3, steps=60))
    wait_for("the first steps", lambda: storage.exists(progress_file), TIMEOUT, operator_process)
    create_llmrun(custom_api, ns, gpu_run("waiting", cluster_s3.run_dir("waiting"), cluster_s3, steps=3))
    wait_for(
        "the second run Queued",
        lambda: phase(custom_api, ns, "waiting") == "Queued",
        TIMEOUT,
        operator_process,
    )

    # Suspending the queued run: its Workload is deactivated, so it is not admitted when quota frees.
    custom_api.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "waiting", {"spec": {"suspend": True}}
    )
    wait_for(
        "the queued run Suspended",
        lambda: (
            phase(custom_api, ns, "waiting") == "Suspended"
            and workload_of(custom_api, ns, "waiting-pretrain-1").get("spec", {}).get("active") is False
        ),
        TIMEOUT,
        operator_process,
    )

    # Suspending the running run: Kueue evicts its Workload and suspends the job; the pods get
    # SIGTERM and the stage saves its progress.
    custom_api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "long", {"spec": {"suspend": True}})
    wait_for(
        "the running run Suspended",
        lambda: phase(custom_api, ns, "long") == "Suspended",
        TIMEOUT,
        operator_process,
    )
    wait_for(
        "its pods gone",
        lambda: (
            not kube_pods.kubectl(
                "get", "pods", "-n", ns, "-l", "nanorun.io/run=long", "-o", "name"
            ).stdout.strip()
        ),
        TIMEOUT,
        operator_process,
    )
    stopped = storage.read_json(progress_file)
    assert stopped["stopped"] == "preempted" and 0 < stopped["step"] < 60, stopped
    # No fight over runPolicy.suspend: it stays true while both runs are suspended, and the
    # quota that the running run freed does not go to the suspended queued one. Kueue has the freed
    # quota once the ClusterQueue reserves none; then the operator looks at both runs again.
    wait_for(
        "the running run's quota freed",
        lambda: cluster_queue(kube_pods, gpu_queue)["reservingWorkloads"] == 0,
        TIMEOUT,
        operator_process,
    )

    def no_fight():
        for job in ("long-pretrain-1", "waiting-pretrain-1"):
            obj = custom_api.get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", job)
            assert obj["spec"]["runPolicy"]["suspend"] is True, (job, obj["spec"]["runPolicy"])
        assert phase(custom_api, ns, "waiting") == "Suspended"
        assert cluster_queue(kube_pods, gpu_queue)["reservingWorkloads"] == 0
        assert storage.read_json(progress_file)["step"] == stopped["step"]

    operator_process.look_again(6, no_fight)  # three times each run

    # Resuming both: Kueue admits one, then the other when the quota frees; the long run goes on
    # from the step it saved, in the same job (a suspension is not an attempt).
    for name in ("waiting", "long"):
        custom_api.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name, {"spec": {"suspend": False}}
        )
    wait_for(
        "the resumed queued run Succeeded",
        lambda: phase(custom_api, ns, "waiting") == "Succeeded",
        TIMEOUT,
        operator_process,
    )
    wait_for(
        "the resumed long run Succeeded",
        lambda: phase(custom_api, ns, "long") == "Succeeded",
        TIMEOUT,
        operator_process,
    )
    assert [
        j["metadata"]["name"] for j in list_jobs(custom_api, ns) if j["metadata"]["name"].startswith("long")
    ] == ["long-pretrain-1"]
    log = kube_pods.kubectl("logs", "long-pretrain-1-master-0", "-n", ns, "-c", "pytorch").stdout
    assert f"step {stopped['step'] + 1}/60" in log and "step 1/60" not in log, log
    stages = get_llmrun(custom_api, ns, "long")["status"]["stages"]
    assert stages[0]["failures"] == 0, stages


def test_a_run_on_a_queue_that_does_not_exist_says_so(
    kube_pods, kube_namespace, cluster_s3, custom_api, operator_process
):
    ns = kube_namespace
    run = gpu_run("lost", cluster_s3.run_dir("lost"), cluster_s3, steps=3)
    run["spec"]["compute"]["queue"] = "no-such-queue"
    create_llmrun(custom_api, ns, run)
    wait_for(
        "Kueue's reason in the Queued condition",
        lambda: (
            "LocalQueue no-such-queue doesn't exist"
            in condition(get_llmrun(custom_api, ns, "lost"), "Queued").get("message", "")
        ),
        TIMEOUT,
        operator_process,
    )
    assert phase(custom_api, ns, "lost") == "Queued"
