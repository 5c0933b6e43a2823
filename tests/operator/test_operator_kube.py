"""The operator as a real process against the test cluster, with the real controllers: the Kubeflow
training-operator runs each PyTorchJob's pods on the cluster's nodes, where the fake-stage image
(tests/kube/images/fake-stage) keeps the stage contract on an S3 server in the test's namespace,
and KubeRay acts on the RayService. Nothing here sets a controller's status."""

from __future__ import annotations

import itertools
import json
import random
import time

import pytest
import yaml
from kubernetes import client
from nanorun.operator.api import GROUP, PLURAL, VERSION
from nanorun.pipeline import storage
from nanorun.pipeline.progress import read_done

from tests.operator.conftest import condition, create_llmrun, get_llmrun, list_jobs, llmrun, wait_for

pytestmark = pytest.mark.kube

# A pod starts in a second or two on the test nodes; a stage of the fake image is a few seconds.
TIMEOUT = 180


def phase_is(api, ns, name, phase):
    def check():
        run = get_llmrun(api, ns, name)
        return run if (run.get("status") or {}).get("phase") == phase else None

    return check


def run_pods(kube, ns: str, run: str) -> list[dict]:
    """The training pods of a run: the training-operator's, labelled from nanorun's template."""
    selector = f"nanorun.io/run={run},training.kubeflow.org/job-name"
    out = kube.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json").stdout
    return json.loads(out)["items"]


def test_a_run_goes_through_its_stages_to_succeeded_and_serves_the_final_checkpoint(
    kube, kube_namespace, cluster_s3, custom_api, operator_process
):
    ns = kube_namespace
    run_dir = cluster_s3.run_dir()
    manifest = llmrun(
        "tiny", run_dir, enabled=("tokenizer", "pretrain", "sft", "export"), storage=cluster_s3.access
    )
    created = create_llmrun(custom_api, ns, manifest)
    run = wait_for("Succeeded", phase_is(custom_api, ns, "tiny", "Succeeded"), TIMEOUT, operator_process)

    jobs = sorted(list_jobs(custom_api, ns), key=lambda j: j["metadata"]["creationTimestamp"])
    assert [j["metadata"]["name"] for j in jobs] == [
        "tiny-tokenizer-1",
        "tiny-pretrain-1",
        "tiny-sft-1",
        "tiny-export-1",  # the optional export stage, asked for: after the last model stage
    ]
    for before, after in itertools.pairwise(jobs):  # in order: each stage's job once the one before finished
        assert after["metadata"]["creationTimestamp"] >= before["status"]["completionTime"]
    for j in jobs:
        assert condition(j, "Succeeded")["status"] == "True"  # the training-operator's word
        assert j["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
        env = {
            e["name"]: e
            for e in j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "s3-creds",
            "key": "AWS_SECRET_ACCESS_KEY",
        }
    assert sorted(p["status"]["phase"] for p in run_pods(kube, ns, "tiny")) == ["Succeeded"] * 4

    status = run["status"]
    assert [(s["name"], s["phase"], s["attempts"]) for s in status["stages"]] == [
        ("tokenizer", "Succeeded", 1),
        ("pretrain", "Succeeded", 1),
        ("sft", "Succeeded", 1),
        ("export", "Succeeded", 1),
    ]
    export = next(j for j in jobs if j["metadata"]["name"] == "tiny-export-1")
    command = export["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("-m") + 1 :][:4] == ["nanorun.trainer.export", "--source", "sft", "--dtype"]
    pretrain = status["stages"][1]
    assert pretrain["metrics"]["loss"] == pytest.approx(4.0 / 3) and pretrain["metrics"][
        "valBpb"
    ] == pytest.approx(0.5)
    assert pretrain["durationSeconds"] >= 0 and pretrain["completionTime"]
    final = read_done(run_dir, "sft").outputs["checkpoint"]
    # The export stage's output is not a checkpoint to serve: the run's final checkpoint is sft's.
    assert status["checkpoint"] == final and status["observedGeneration"] == 1

    # The RayService for the final checkpoint; KubeRay's RayCluster cannot start here (the serving
    # image is absent), so the run waits for it. A RayService turning Ready is the end-to-end test's.
    svc = custom_api.get_namespaced_custom_object("ray.io", "v1", ns, "rayservices", "tiny-chat")
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    assert app["deployments"][0]["user_config"]["checkpoint"] == final
    assert svc["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    ready = condition(run, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ServingNotReady"

    table = kube.kubectl("get", "llm", "-n", ns).stdout
    assert table.split("\n")[0].split() == ["NAME", "PHASE", "STAGE", "PROGRESS", "LOSS", "ETA", "AGE"]
    assert table.split("\n")[1].split()[:4] == ["tiny", "Succeeded", "export", "done"]

    events = client.CoreV1Api(kube.api_client()).list_namespaced_event(ns).items
    reasons = [e.reason for e in events if e.involved_object.name == "tiny"]
    for reason in ("StageStarted", "StageSucceeded", "RunRunning", "RunSucceeded", "ServingCreated"):
        assert reason in reasons
    assert reasons.count("StageStarted") == 4

    text = operator_process.metrics()
    assert "llmrun_time_to_first_job_seconds_count 1.0" in text
    assert 'llmrun_stage_duration_seconds_count{stage="pretrain"} 1.0' in text
    assert (
        f'llmrun_stage_info{{namespace="{ns}",phase="Succeeded",run="tiny",stage="export",sweep=""}} 1.0'
        in text
    )
    assert 'llmrun_reconciles_total{result="ok"}' in text
    assert 'llmrun_runs{phase="Succeeded"} 1.0' in text and 'llmrun_runs{phase="Running"} 0.0' in text


def test_a_failed_attempt_is_retried_and_the_run_gives_up_after_the_last(
    kube_namespace, cluster_s3, custom_api, operator_process
):
    ns = kube_namespace
    create_llmrun(
        custom_api,
        ns,
        llmrun(
            "flaky",
            cluster_s3.run_dir(),
            storage=cluster_s3.access,
            serving={"enabled": False},
            stage_args={"pretrain": ["--fake-fail-attempts", "1,2"]},
        ),
    )
    run = wait_for("Failed", phase_is(custom_api, ns, "flaky", "Failed"), TIMEOUT, operator_process)
    jobs = {j["metadata"]["name"]: j for j in list_jobs(custom_api, ns)}
    assert sorted(jobs) == ["flaky-pretrain-1", "flaky-pretrain-2", "flaky-tokenizer-1"]
    assert condition(jobs["flaky-pretrain-2"], "Failed")["status"] == "True"  # the training-operator's word
    degraded = condition(run, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "StageFailed"
    assert "2/2" in degraded["message"] and "attempt 2" in degraded["message"], degraded["message"]
    # The failed pod's last log lines: the fake stage's stderr.
    assert "fake stage pretrain: attempt 2 fails as asked" in degraded["message"], degraded["message"]
    assert run["status"]["stages"][1]["phase"] == "Failed"

    def stays_failed():  # no further attempts
        assert len(list_jobs(custom_api, ns)) == 3
        assert get_llmrun(custom_api, ns, "flaky")["status"]["phase"] == "Failed"

    operator_process.look_again(3, stays_failed)


def test_a_failed_attempt_is_retried_and_the_stage_then_succeeds(
    kube_namespace, cluster_s3, custom_api, operator_process
):
    ns = kube_namespace
    create_llmrun(
        custom_api,
        ns,
        llmrun(
            "retry",
            cluster_s3.run_dir(),
            storage=cluster_s3.access,
            serving={"enabled": False},
            stage_args={"tokenizer": ["--fake-fail-attempts", "1"]},
        ),
    )
    run = wait_for("Succeeded", phase_is(custom_api, ns, "retry", "Succeeded"), TIMEOUT, operator_process)
    assert [(s["name"], s["attempts"]) for s in run["status"]["stages"]] == [
        ("tokenizer", 2),
        ("pretrain", 1),
    ]
    assert sorted(j["metadata"]["name"] for j in list_jobs(custom_api, ns)) == [
        "retry-pretrain-1",
        "retry-tokenizer-1",
        "retry-tokenizer-2",
    ]


def test_suspend_stops_the_running_pods_and_resume_finishes_from_the_last_step(
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
            stage_args={"pretrain": ["--fake-steps", "40", "--fake-step-seconds", "0.2"]},
        ),
    )
    wait_for("the job to run", lambda: storage.exists(progress_file), TIMEOUT, operator_process)
    custom_api.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "pause", {"spec": {"suspend": True}}
    )
    wait_for("Suspended", phase_is(custom_api, ns, "pause", "Suspended"), operator=operator_process)
    job = custom_api.get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "pause-pretrain-1")
    assert job["spec"]["runPolicy"]["suspend"] is True
    # The training-operator deletes the suspended job's pods: SIGTERM, and the stage saves its progress.
    wait_for("the pods deleted", lambda: not run_pods(kube, ns, "pause"), operator=operator_process)
    stopped = storage.read_json(progress_file)
    assert stopped["stopped"] == "preempted" and stopped["attempt"] == 1
    assert 0 < stopped["step"] < 40

    def stays_paused():  # no new attempt, no pod, no step
        assert [j["metadata"]["name"] for j in list_jobs(custom_api, ns)] == ["pause-pretrain-1"]
        assert not run_pods(kube, ns, "pause")
        assert storage.read_json(progress_file)["step"] == stopped["step"]

    operator_process.look_again(3, stays_paused)
    assert condition(get_llmrun(custom_api, ns, "pause"), "Progressing")["reason"] == "Suspended"
    wait_for(
        "the job Suspended",
        lambda: (
            condition(
                custom_api.get_namespaced_custom_object(
                    "kubeflow.org", "v1", ns, "pytorchjobs", "pause-pretrain-1"
                ),
                "Suspended",
            ).get("status")
            == "True"
        ),
    )

    custom_api.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "pause", {"spec": {"suspend": False}}
    )
    wait_for("Succeeded", phase_is(custom_api, ns, "pause", "Succeeded"), TIMEOUT, operator_process)
    assert [j["metadata"]["name"] for j in list_jobs(custom_api, ns)] == ["pause-pretrain-1"]
    # The recreated pod went on from the saved step.
    log = kube.kubectl("logs", "pause-pretrain-1-master-0", "-n", ns, "-c", "pytorch").stdout
    assert f"step {stopped['step'] + 1}/40" in log and "step 1/40" not in log, log


@pytest.mark.slow
def test_killing_the_operator_at_random_points_never_duplicates_or_loses_a_job(
    kube, kube_namespace, cluster_s3, custom_api, operator_process
):
    ns = kube_namespace
    stages = ("tokenizer", "pretrain", "midtrain", "sft", "report")
    fast = ["--fake-steps", "4", "--fake-step-seconds", "0.15"]
    create_llmrun(
        custom_api,
        ns,
        llmrun(
            "crashy",
            cluster_s3.run_dir(),
            enabled=stages,
            storage=cluster_s3.access,
            retry={"maxAttempts": 3},
            stage_args={
                "tokenizer": fast,
                "pretrain": [*fast, "--fake-fail-attempts", "1"],
                "midtrain": fast,
                "sft": fast,
                "report": fast,
            },
        ),
    )
    rng = random.Random(5)
    kills = 0
    deadline = time.monotonic() + 300
    while (get_llmrun(custom_api, ns, "crashy").get("status") or {}).get("phase") != "Succeeded":
        assert time.monotonic() < deadline, operator_process.log()
        time.sleep(rng.uniform(0.2, 1.5))
        operator_process.kill()
        kills += 1
        time.sleep(rng.uniform(0.0, 1.0))  # jobs keep running and finishing while no operator runs
        operator_process.start()
    assert kills >= 3
    names = sorted(j["metadata"]["name"] for j in list_jobs(custom_api, ns))
    assert names == [
        "crashy-midtrain-1",
        "crashy-pretrain-1",
        "crashy-pretrain-2",
        "crashy-report-1",
        "crashy-sft-1",
        "crashy-tokenizer-1",
    ]
    # Each job ran exactly once: one pod each (restartPolicy Never, backoffLimit 0).
    pods = sorted(
        p["metadata"]["labels"]["training.kubeflow.org/job-name"] for p in run_pods(kube, ns, "crashy")
    )
    assert pods == names
    run = get_llmrun(custom_api, ns, "crashy")
    assert [(s["name"], s["phase"], s["attempts"]) for s in run["status"]["stages"]] == [
        ("tokenizer", "Succeeded", 1),
        ("pretrain", "Succeeded", 2),
        ("midtrain", "Succeeded", 1),
        ("sft", "Succeeded", 1),
        ("report", "Succeeded", 1),
    ]
    # The RayService once (its RayCluster waits in ImagePullBackOff: conftest.ABSENT_SERVING_IMAGE).
    assert len(custom_api.list_namespaced_custom_object("ray.io", "v1", ns, "rayservices")["items"]) == 1


def test_deleting_a_run_removes_its_jobs_and_its_files_only_when_cleanup_is_asked(
    kube, kube_namespace, cluster_s3, custom_api, operator_process
):
    ns = kube_namespace
    keep, clean = cluster_s3.run_dir("keep"), cluster_s3.run_dir("clean")
    create_llmrun(
        custom_api,
        ns,
        llmrun("keep", keep, enabled=("tokenizer",), serving={"enabled": False}, storage=cluster_s3.access),
    )
    create_llmrun(
        custom_api,
        ns,
        llmrun(
            "clean",
            clean,
            enabled=("tokenizer",),
            serving={"enabled": False},
            storage={**cluster_s3.access, "cleanupOnDelete": True},
        ),
    )
    for name in ("keep", "clean"):
        wait_for(f"{name} Succeeded", phase_is(custom_api, ns, name, "Succeeded"), TIMEOUT, operator_process)
    assert get_llmrun(custom_api, ns, "clean")["metadata"].get("finalizers") == ["nanorun.io/cleanup"]
    assert not get_llmrun(custom_api, ns, "keep")["metadata"].get("finalizers")
    assert storage.list_files(clean) and storage.list_files(keep)
    assert len(list_jobs(custom_api, ns)) == 2 and len(run_pods(kube, ns, "keep")) == 1

    for name in ("keep", "clean"):
        custom_api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    def gone():
        names = [
            r["metadata"]["name"]
            for r in custom_api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
        ]
        return not names

    wait_for("both runs gone", gone, operator=operator_process)
    assert storage.list_files(clean) == []
    assert storage.list_files(keep)  # not asked: the files stay
    # The garbage collector follows the owner references: the jobs, then their pods.
    wait_for(
        "the jobs and pods collected",
        lambda: (
            not list_jobs(custom_api, ns)
            and not run_pods(kube, ns, "keep")
            and not run_pods(kube, ns, "clean")
        ),
        operator=operator_process,
    )


def test_a_serving_change_patches_the_rayservice(kube_namespace, cluster_s3, custom_api, operator_process):
    ns = kube_namespace
    # The RayCluster KubeRay makes for it waits in ImagePullBackOff (conftest.ABSENT_SERVING_IMAGE).
    create_llmrun(
        custom_api, ns, llmrun("svc", cluster_s3.run_dir(), enabled=("pretrain",), storage=cluster_s3.access)
    )
    wait_for("Succeeded", phase_is(custom_api, ns, "svc", "Succeeded"), TIMEOUT, operator_process)

    def rayservice():
        try:
            return custom_api.get_namespaced_custom_object("ray.io", "v1", ns, "rayservices", "svc-chat")
        except client.ApiException:
            return None

    before = wait_for("the RayService", rayservice, operator=operator_process)
    custom_api.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "svc",
        {"spec": {"serving": {"maxReplicas": 3, "targetOngoingRequests": 5}}},
    )

    def patched():
        svc = rayservice()
        dep = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["deployments"][0]
        return svc if dep["autoscaling_config"]["max_replicas"] == 3 else None

    after = wait_for("the patched RayService", patched, operator=operator_process)
    dep = yaml.safe_load(after["spec"]["serveConfigV2"])["applications"][0]["deployments"][0]
    assert dep["autoscaling_config"]["target_ongoing_requests"] == 5
    assert after["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 3
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # patched, not recreated
    assert (
        dep["user_config"]
        == yaml.safe_load(before["spec"]["serveConfigV2"])["applications"][0]["deployments"][0]["user_config"]
    )
    assert condition(get_llmrun(custom_api, ns, "svc"), "Ready")["reason"] == "ServingNotReady"


def test_unreadable_storage_is_retried_without_stopping_the_run(kube_namespace, custom_api, operator_process):
    ns = kube_namespace
    create_llmrun(
        custom_api,
        ns,
        llmrun(
            "nostore",
            "s3://Not_A_Bucket!/runs/x",  # every read fails
            serving={"enabled": False},
        ),
    )
    wait_for("the first job", lambda: list_jobs(custom_api, ns), operator=operator_process)
    wait_for(
        "a counted error",
        lambda: "llmrun_reconcile_errors_total 0.0" not in operator_process.metrics(),
        operator=operator_process,
    )
    assert "reconcile of" in operator_process.log() and "Invalid bucket name" in operator_process.log()
    assert operator_process.proc.poll() is None  # still running
    run = get_llmrun(custom_api, ns, "nostore")
    assert run["status"]["phase"] == "Running" and run["status"]["stages"][0]["job"] == "nostore-tokenizer-1"
