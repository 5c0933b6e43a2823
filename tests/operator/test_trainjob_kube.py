"""Stages as Kubeflow Trainer v2 TrainJobs on the session cluster, which runs the real Trainer v2
controller and JobSet (built from their modules, tests/kube/build.sh) beside the training-operator:
the chart's ClusterTrainingRuntime, a TrainJob as nanorun builds it meeting on two nodes through
the PET_* environment Trainer's torch plugin injects, and the operator as a process choosing
TrainJob for `compute.launcher: auto`, suspending a TrainJob and resuming a preempted one without
counting a failure, each stage's progress reported to Trainer's status server (its `TrainJobStatus`
gate on) and written into the TrainJob's `status.trainerStatus`, and Kueue admitting queued
TrainJobs. Nothing here sets a controller's status."""

from __future__ import annotations

import json
import textwrap

import pytest
from nanorun.operator.api import GROUP, PLURAL, VERSION, parse_spec
from nanorun.operator.children.trainjob import trainjob_for_stage
from nanorun.operator.names import WORKLOAD_GROUP, WORKLOAD_PLURAL, WORKLOAD_VERSION
from nanorun.operator.reconcile.plan import stage_plan
from nanorun.operator.run_ref import RunRef
from nanorun.pipeline import storage

from tests.fixtures.kube import KubeEnv, wait_until
from tests.images.containers import image_ref
from tests.kube.cluster import GPU_LABELS, GPU_TOLERATIONS
from tests.operator.conftest import condition, create_llmrun, get_llmrun, llmrun, wait_for
from tests.operator.test_kueue_kube import QUEUE, gpu_queue  # noqa: F401 (gpu_queue: a fixture)

pytestmark = [pytest.mark.kube, pytest.mark.slow]

TIMEOUT = 240
TRAINJOBS = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")


def trainjob_pods(kube: KubeEnv, ns: str, job: str) -> list[dict]:
    out = kube.kubectl("get", "pods", "-n", ns, "-l", f"jobset.sigs.k8s.io/jobset-name={job}", "-o", "json")
    return json.loads(out.stdout)["items"]


# Under torchrun (which reads PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT): one gloo
# all-reduce across the two pods, then the rank, the sum and the environment on one line each.
ALLREDUCE = textwrap.dedent("""
    import json, os, socket
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    print(f"rank {dist.get_rank()} of {dist.get_world_size()} on {socket.gethostname()}: sum {int(t.item())}")
    print("env", json.dumps(dict(os.environ)), flush=True)
    dist.destroy_process_group()  # exiting with gloo's threads alive may abort in their destructors
""")


def test_a_two_node_trainjob_as_nanorun_builds_it_meets_through_trainers_rendezvous_env(kube, kube_namespace):
    """The pretraining TrainJob nanorun builds for two nodes, its command swapped for an all-reduce
    under torchrun on the trainer image: Trainer v2 renders it with the chart's runtime into a
    JobSet of two pods whose torchrun agents meet at `<job>-node-0-0.<job>` and all-reduce."""
    ns = kube_namespace
    kube.apply(
        ns,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3-creds"},
            "stringData": {"AWS_ACCESS_KEY_ID": "key-id", "AWS_SECRET_ACCESS_KEY": "s3cr3t"},
        },
    )
    spec = parse_spec(
        {
            "image": image_ref("trainer"),
            "compute": {
                "nodes": 2,
                "gpusPerNode": 0,
                "launcher": "TrainJob",
                "nodeSelector": GPU_LABELS,  # where the trainer image is pulled
                "tolerations": GPU_TOLERATIONS,
            },
            "storage": {
                "uri": "s3://nanorun/runs/env",
                "endpoint": "http://s3:9000",
                "credentialsSecret": "s3-creds",
            },
            "serving": {"enabled": False},
        }
    )
    pretrain = next(s for s in stage_plan(spec) if s.key == "pretrain")
    job = trainjob_for_stage(
        RunRef("env", ns, "00000000-0000-0000-0000-000000000004"), spec, pretrain, attempt=1
    )
    job["metadata"].pop("ownerReferences")  # the owner is not in this test
    job["spec"]["trainer"]["command"] = ["torchrun", "--no-python", "python", "-c", ALLREDUCE]
    name = job["metadata"]["name"]
    kube.apply(ns, job)

    done = wait_until(
        lambda: kube.get(ns, "trainjob", name),
        lambda j: (
            condition(j, "Complete").get("status") == "True" or condition(j, "Failed").get("status") == "True"
        ),
        timeout=TIMEOUT,
    )
    pods = sorted(trainjob_pods(kube, ns, name), key=lambda p: p["metadata"]["name"])
    logs = [kube.kubectl("logs", p["metadata"]["name"], "-n", ns, "-c", "node").stdout for p in pods]
    assert condition(done, "Complete").get("status") == "True", (done.get("status"), logs)
    assert len(pods) == 2
    for rank, (pod, log) in enumerate(zip(pods, logs, strict=True)):
        assert pod["metadata"]["labels"]["nanorun.io/run"] == "env"  # the runtime patch's pod labels
        assert pod["spec"]["nodeSelector"] == GPU_LABELS
        assert f"rank {rank} of 2 on {name}-node-0-{rank}: sum 3" in log, log
        env = json.loads(next(line for line in log.splitlines() if line.startswith("env "))[4:])
        assert (
            env["PET_NNODES"] == "2"
            and env["PET_NPROC_PER_NODE"] == "1"
            and env["PET_NODE_RANK"] == str(rank)
        )
        assert env["PET_MASTER_ADDR"] == f"{name}-node-0-0.{name}"
        assert env["NANORUN_RUN"] == "env" and env["NANORUN_ATTEMPT"] == "1"
        assert env["AWS_ACCESS_KEY_ID"] == "key-id" and env["AWS_ENDPOINT_URL"] == "http://s3:9000"
        # Trainer's TrainJobStatus plugin: where rank 0 reports progress (nanorun.pipeline.trainer_status).
        assert env["KUBEFLOW_TRAINER_SERVER_URL"] == (
            "https://kubeflow-trainer-controller-manager.kubeflow-system.svc:10443"
            f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs/{name}/status"
        )


def phase_is(api, ns, name, phase):
    def check():
        run = get_llmrun(api, ns, name)
        return run if (run.get("status") or {}).get("phase") == phase else None

    return check


def step_of(progress_file: str) -> int:
    return storage.read_json(progress_file).get("step", 0) if storage.exists(progress_file) else 0


def trainjobs(api, ns: str) -> list[dict]:
    return api.list_namespaced_custom_object(TRAINJOBS[0], TRAINJOBS[1], ns, TRAINJOBS[2])["items"]


def test_auto_runs_every_stage_as_a_trainjob_and_a_deleted_pod_is_a_preemption_not_a_failure(
    kube, kube_namespace, cluster_s3, custom_api, operator_process
):
    ns = kube_namespace
    run_dir = cluster_s3.run_dir()
    progress_file = storage.join(run_dir, "pretrain", "progress.json")
    create_llmrun(
        custom_api,
        ns,
        llmrun(
            "tj",
            run_dir,
            enabled=("tokenizer", "pretrain"),
            storage=cluster_s3.access,
            serving={"enabled": False},
            compute={"nodes": 2, "launcher": "auto"},
            stage_args={"pretrain": ["--fake-steps", "40", "--fake-step-seconds", "0.2"]},
        ),
    )
    wait_for("pretraining's third step", lambda: step_of(progress_file) >= 3, TIMEOUT, operator_process)
    run = get_llmrun(custom_api, ns, "tj")
    assert run["status"]["launcher"] == "TrainJob"
    (job,) = [j for j in trainjobs(custom_api, ns) if j["spec"]["trainer"]["numNodes"] == 2]
    name = job["metadata"]["name"]
    pods = trainjob_pods(kube, ns, name)
    assert len(pods) == 2
    rank0 = next(
        p for p in pods if p["metadata"]["labels"].get("batch.kubernetes.io/job-completion-index") == "0"
    )
    kube.kubectl("delete", "pod", rank0["metadata"]["name"], "-n", ns, "--wait=false")

    done = wait_for("Succeeded", phase_is(custom_api, ns, "tj", "Succeeded"), TIMEOUT, operator_process)
    rec = next(s for s in done["status"]["stages"] if s["name"] == "pretrain")
    assert rec["preemptions"] == 1 and rec.get("failures", 0) == 0 and rec["attempts"] == 2, rec
    kinds = {(j["kind"], j["metadata"]["labels"]["nanorun.io/attempt"]) for j in trainjobs(custom_api, ns)}
    assert ("TrainJob", "2") in kinds
    assert custom_api.list_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs")["items"] == []
    # Attempt 2 went on from the step the SIGTERM saved, not from the start.
    final = storage.read_json(progress_file)
    assert final["attempt"] == 2 and final["step"] == 40

    # Rank 0 of each attempt reported to Trainer's status server, which wrote status.trainerStatus:
    # attempt 1 up to the step its SIGTERM saved, attempt 2 to the end; the tokenizer's job too.
    reported = {
        (j["spec"]["trainer"]["numNodes"], j["metadata"]["labels"]["nanorun.io/attempt"]): j["status"].get(
            "trainerStatus"
        )
        for j in trainjobs(custom_api, ns)
    }
    tokenizer, preempted, last = reported[(1, "1")], reported[(2, "1")], reported[(2, "2")]
    assert tokenizer["progressPercentage"] == 100, reported
    values = {m["name"]: m["value"] for m in preempted["metrics"]}
    assert 0 < preempted["progressPercentage"] < 100 and values["attempt"] == "1", preempted
    assert preempted["progressPercentage"] == int(values["step"]) * 100 // 40
    values = {m["name"]: m["value"] for m in last["metrics"]}
    assert last["progressPercentage"] == 100 and last["estimatedRemainingSeconds"] == 0, last
    assert values["step"] == "40" and values["attempt"] == "2" and values["val_bpb"] == f"{1.5 / 40:.6g}"


def test_suspend_sets_the_trainjob_s_spec_suspend_and_resume_finishes_it(
    kube, kube_namespace, cluster_s3, custom_api, operator_process
):
    ns = kube_namespace
    run_dir = cluster_s3.run_dir()
    progress_file = storage.join(run_dir, "pretrain", "progress.json")
    create_llmrun(
        custom_api,
        ns,
        llmrun(
            "pause",
            run_dir,
            enabled=("pretrain",),
            storage=cluster_s3.access,
            serving={"enabled": False},
            compute={"launcher": "TrainJob"},
            stage_args={"pretrain": ["--fake-steps", "30", "--fake-step-seconds", "0.2"]},
        ),
    )
    wait_for("the job to run", lambda: storage.exists(progress_file), TIMEOUT, operator_process)
    custom_api.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "pause", {"spec": {"suspend": True}}
    )
    wait_for("Suspended", phase_is(custom_api, ns, "pause", "Suspended"), operator=operator_process)
    (job,) = trainjobs(custom_api, ns)
    assert job["spec"]["suspend"] is True
    name = job["metadata"]["name"]
    # Trainer suspends the JobSet, the Job controller deletes the pods: SIGTERM, the stage saves its step.
    wait_for("the pods deleted", lambda: not trainjob_pods(kube, ns, name), TIMEOUT, operator_process)
    wait_for(
        "the TrainJob Suspended",
        lambda: (
            condition(
                custom_api.get_namespaced_custom_object(*TRAINJOBS[:2], ns, TRAINJOBS[2], name), "Suspended"
            ).get("status")
            == "True"
        ),
    )
    stopped = storage.read_json(progress_file)
    assert stopped["stopped"] == "preempted" and 0 < stopped["step"] < 30

    custom_api.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "pause", {"spec": {"suspend": False}}
    )
    wait_for("Succeeded", phase_is(custom_api, ns, "pause", "Succeeded"), TIMEOUT, operator_process)
    assert [j["metadata"]["name"] for j in trainjobs(custom_api, ns)] == [name]  # the same job, resumed
    assert storage.read_json(progress_file)["step"] == 30


@pytest.mark.usefixtures("gpu_queue")
def test_queued_runs_trainjobs_wait_for_kueue_s_quota_and_run_once_admitted(
    kube, kube_namespace, cluster_s3, custom_api, operator_process
):
    """Kueue's trainer.kubeflow.org/trainjob integration: two runs whose pretraining needs the
    ClusterQueue's 8 GPUs each. One TrainJob is admitted and runs, the other waits `Queued` in
    Kueue's words until the first gives its quota back; each Workload is owned by a TrainJob."""
    ns = kube_namespace
    for name in ("first", "second"):
        create_llmrun(
            custom_api,
            ns,
            llmrun(
                name,
                cluster_s3.run_dir(name),
                enabled=("pretrain",),
                storage=cluster_s3.access,
                serving={"enabled": False},
                compute={"gpusPerNode": 8, "queue": QUEUE, "launcher": "TrainJob"},
                # 20 s each: the held run's Workload is tried, and its reason seen, while the other runs.
                stage_args={"pretrain": ["--fake-steps", "100", "--fake-step-seconds", "0.2"]},
            ),
        )

    def held_by_kueue() -> list[str]:
        """The runs Queued in Kueue's own words, once it has tried their Workload against the quota
        the other run holds. Both runs are Queued for a moment before Kueue makes and admits the
        first Workload, with nanorun's words for that."""
        return [
            name
            for name in ("first", "second")
            if (queued := condition(get_llmrun(custom_api, ns, name), "Queued")).get("status") == "True"
            and "insufficient unused quota" in queued.get("message", "")
        ]

    held = wait_for("one run Queued in Kueue's words", held_by_kueue, TIMEOUT, operator_process)
    assert len(held) == 1, held
    for name in ("first", "second"):
        wait_for(f"{name} Succeeded", phase_is(custom_api, ns, name, "Succeeded"), TIMEOUT, operator_process)
    workloads = custom_api.list_namespaced_custom_object(
        WORKLOAD_GROUP, WORKLOAD_VERSION, ns, WORKLOAD_PLURAL
    )
    owners = [o["kind"] for w in workloads["items"] for o in w["metadata"]["ownerReferences"]]
    assert owners == ["TrainJob", "TrainJob"]
    assert {j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] for j in trainjobs(custom_api, ns)} == {
        QUEUE
    }
