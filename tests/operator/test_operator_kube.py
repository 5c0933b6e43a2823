"""The operator against the real test API server, with the training-operator harness running jobs
(FakeRunner: progress.json/done.json into a moto S3 server) and the operator as a real process."""

from __future__ import annotations

import base64
import random
import time

import pytest
import yaml
from kubernetes import client
from nanorun.operator.api import GROUP, PLURAL, VERSION
from nanorun.trainer import storage
from nanorun.trainer.progress import read_done

from tests.operator.conftest import condition, create_llmrun, get_llmrun, list_jobs, llmrun, wait_for

pytestmark = pytest.mark.kube


def phase_is(api, ns, name, phase):
    def check():
        run = get_llmrun(api, ns, name)
        return run if (run.get("status") or {}).get("phase") == phase else None
    return check


def make_secret(kube, ns, s3_server):
    data = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    body = {"metadata": {"name": "s3-creds"}, "type": "Opaque",
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
    client.CoreV1Api(kube.api_client()).create_namespaced_secret(ns, body)


def test_a_run_goes_through_its_stages_to_succeeded_and_serves_the_final_checkpoint(
        kube, kube_namespace, s3_server, s3_run_dir, custom_api, training_operator, fake_runner, operator_process):
    ns = kube_namespace
    make_secret(kube, ns, s3_server)
    manifest = llmrun("tiny", s3_run_dir, enabled=("tokenizer", "pretrain", "sft"),
                      storage={"credentialsSecret": "s3-creds", "endpoint": s3_server})
    created = create_llmrun(custom_api, ns, manifest)
    run = wait_for("Succeeded", phase_is(custom_api, ns, "tiny", "Succeeded"), operator=operator_process)

    jobs = list_jobs(custom_api, ns)
    assert sorted(j["metadata"]["name"] for j in jobs) == ["tiny-base-train-1", "tiny-chat-sft-1", "tiny-tok-train-1"]
    assert fake_runner.started == ["tiny-tok-train-1", "tiny-base-train-1", "tiny-chat-sft-1"]  # in order
    for j in jobs:
        assert j["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
        env = {e["name"]: e for e in j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}

    status = run["status"]
    assert [(s["name"], s["phase"], s["attempts"]) for s in status["stages"]] == [
        ("tokenizer", "Succeeded", 1), ("pretrain", "Succeeded", 1), ("sft", "Succeeded", 1)]
    pretrain = status["stages"][1]
    assert pretrain["metrics"]["loss"] == pytest.approx(4.0 / 3) and pretrain["metrics"]["valBpb"] == pytest.approx(0.5)
    assert pretrain["durationSeconds"] >= 0 and pretrain["completionTime"]
    final = read_done(s3_run_dir, "chat_sft").outputs["checkpoint"]
    assert status["checkpoint"] == final and status["observedGeneration"] == 1
    assert condition(run, "Ready")["status"] == "False"  # the RayService is not ready yet

    svc = custom_api.get_namespaced_custom_object("ray.io", "v1", ns, "rayservices", "tiny-chat")
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    assert app["deployments"][0]["user_config"] == {"checkpoint": final}
    assert svc["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]

    # KubeRay reports the service ready: the run becomes Ready and shows the URL.
    custom_api.patch_namespaced_custom_object_status("ray.io", "v1", ns, "rayservices", "tiny-chat", {"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    def ready():
        run = get_llmrun(custom_api, ns, "tiny")
        return run if condition(run, "Ready").get("status") == "True" else None
    run = wait_for("Ready", ready, operator=operator_process)
    assert run["status"]["serving"]["url"] == f"http://tiny-chat-serve-svc.{ns}.svc:8000"
    assert run["status"]["serving"]["ready"] is True

    table = kube.kubectl("get", "llm", "-n", ns).stdout
    assert table.split("\n")[0].split() == ["NAME", "PHASE", "STAGE", "PROGRESS", "LOSS", "AGE"]
    assert table.split("\n")[1].split()[:4] == ["tiny", "Succeeded", "sft", "done"]

    events = client.CoreV1Api(kube.api_client()).list_namespaced_event(ns).items
    reasons = [e.reason for e in events if e.involved_object.name == "tiny"]
    for reason in ("StageStarted", "StageSucceeded", "RunRunning", "RunSucceeded", "ServingCreated"):
        assert reason in reasons
    assert reasons.count("StageStarted") == 3

    text = operator_process.metrics()
    assert "llmrun_time_to_first_job_seconds_count 1.0" in text
    assert 'llmrun_stage_duration_seconds_count{stage="base_train"} 1.0' in text
    assert f'llmrun_stage_info{{namespace="{ns}",phase="Succeeded",run="tiny",stage="sft"}} 1.0' in text
    assert 'llmrun_reconciles_total{result="ok"}' in text
    assert 'llmrun_runs{phase="Succeeded"} 1.0' in text and 'llmrun_runs{phase="Running"} 0.0' in text


def test_a_failed_attempt_is_retried_and_the_run_gives_up_after_the_last(
        kube_namespace, s3_run_dir, custom_api, training_operator, operator_process):
    ns = kube_namespace
    training_operator.runner.fail.update({("base_train", 1): "OOMKilled", ("base_train", 2): "OOMKilled"})
    create_llmrun(custom_api, ns, llmrun("flaky", s3_run_dir))
    run = wait_for("Failed", phase_is(custom_api, ns, "flaky", "Failed"), operator=operator_process)
    names = sorted(j["metadata"]["name"] for j in list_jobs(custom_api, ns))
    assert names == ["flaky-base-train-1", "flaky-base-train-2", "flaky-tok-train-1"]
    degraded = condition(run, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "StageFailed"
    assert "attempt 2/2 failed: PyTorchJobFailed: pytorch-master-0 exited: OOMKilled" in degraded["message"]
    assert run["status"]["stages"][1]["phase"] == "Failed"
    time.sleep(2)  # a failed run stays failed: no further attempts
    assert len(list_jobs(custom_api, ns)) == 3


def test_a_failed_attempt_is_retried_and_the_stage_then_succeeds(kube_namespace, s3_run_dir, custom_api,
                                                                 training_operator, operator_process):
    ns = kube_namespace
    training_operator.runner.fail[("tok_train", 1)] = "node lost"
    create_llmrun(custom_api, ns, llmrun("retry", s3_run_dir, serving={"enabled": True}))
    run = wait_for("Succeeded", phase_is(custom_api, ns, "retry", "Succeeded"), operator=operator_process)
    assert [(s["name"], s["attempts"]) for s in run["status"]["stages"]] == [("tokenizer", 2), ("pretrain", 1)]
    assert sorted(j["metadata"]["name"] for j in list_jobs(custom_api, ns)) == [
        "retry-base-train-1", "retry-tok-train-1", "retry-tok-train-2"]


def test_suspend_pauses_the_running_job_and_resume_lets_it_finish(kube_namespace, s3_run_dir, custom_api,
                                                                  training_operator, operator_process):
    ns = kube_namespace
    training_operator.runner.steps, training_operator.runner.step_seconds = 30, 0.1
    create_llmrun(custom_api, ns, llmrun("pause", s3_run_dir, enabled=("pretrain",)))
    wait_for("the job to run", lambda: storage.exists(storage.join(s3_run_dir, "base_train", "progress.json")),
             operator=operator_process)
    custom_api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "pause", {"spec": {"suspend": True}})
    wait_for("Suspended", phase_is(custom_api, ns, "pause", "Suspended"), operator=operator_process)
    job = custom_api.get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "pause-base-train-1")
    assert job["spec"]["runPolicy"]["suspend"] is True
    time.sleep(0.5)
    step = storage.read_json(storage.join(s3_run_dir, "base_train", "progress.json"))["step"]
    time.sleep(1.5)
    assert storage.read_json(storage.join(s3_run_dir, "base_train", "progress.json"))["step"] == step  # paused
    assert condition(get_llmrun(custom_api, ns, "pause"), "Progressing")["reason"] == "Suspended"
    custom_api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "pause", {"spec": {"suspend": False}})
    wait_for("Succeeded", phase_is(custom_api, ns, "pause", "Succeeded"), operator=operator_process)
    assert [j["metadata"]["name"] for j in list_jobs(custom_api, ns)] == ["pause-base-train-1"]


@pytest.mark.slow
def test_killing_the_operator_at_random_points_never_duplicates_or_loses_a_job(
        kube_namespace, s3_run_dir, custom_api, training_operator, fake_runner, operator_process):
    ns = kube_namespace
    fake_runner.steps, fake_runner.step_seconds = 4, 0.15
    fake_runner.fail[("base_train", 1)] = "preempted"
    stages = ("tokenizer", "pretrain", "midtrain", "sft", "report")
    create_llmrun(custom_api, ns, llmrun("crashy", s3_run_dir, enabled=stages, retry={"maxAttempts": 3}))
    rng = random.Random(5)
    kills = 0
    deadline = time.monotonic() + 120
    while (get_llmrun(custom_api, ns, "crashy").get("status") or {}).get("phase") != "Succeeded":
        assert time.monotonic() < deadline, operator_process.log()
        time.sleep(rng.uniform(0.2, 1.5))
        operator_process.kill()
        kills += 1
        time.sleep(rng.uniform(0.0, 1.0))  # jobs keep finishing while no operator runs
        operator_process.start()
    assert kills >= 3
    names = sorted(j["metadata"]["name"] for j in list_jobs(custom_api, ns))
    assert names == ["crashy-base-train-1", "crashy-base-train-2", "crashy-chat-sft-1", "crashy-mid-train-1",
                     "crashy-report-1", "crashy-tok-train-1"]
    assert sorted(fake_runner.started) == names  # each job ran exactly once
    run = get_llmrun(custom_api, ns, "crashy")
    assert [(s["name"], s["phase"], s["attempts"]) for s in run["status"]["stages"]] == [
        ("tokenizer", "Succeeded", 1), ("pretrain", "Succeeded", 2), ("midtrain", "Succeeded", 1),
        ("sft", "Succeeded", 1), ("report", "Succeeded", 1)]
    assert len(custom_api.list_namespaced_custom_object("ray.io", "v1", ns, "rayservices")["items"]) == 1


def test_deleting_a_run_removes_its_files_only_when_cleanup_is_asked(kube_namespace, s3_bucket, custom_api,
                                                                     training_operator, operator_process):
    ns = kube_namespace
    keep, clean = f"s3://{s3_bucket}/runs/keep", f"s3://{s3_bucket}/runs/clean"
    create_llmrun(custom_api, ns, llmrun("keep", keep, enabled=("tokenizer",), serving={"enabled": False}))
    create_llmrun(custom_api, ns, llmrun("clean", clean, enabled=("tokenizer",), serving={"enabled": False},
                                         storage={"cleanupOnDelete": True}))
    for name in ("keep", "clean"):
        wait_for(f"{name} Succeeded", phase_is(custom_api, ns, name, "Succeeded"), operator=operator_process)
    assert get_llmrun(custom_api, ns, "clean")["metadata"].get("finalizers") == ["nanorun.io/cleanup"]
    assert not get_llmrun(custom_api, ns, "keep")["metadata"].get("finalizers")
    assert storage.list_files(clean) and storage.list_files(keep)

    for name in ("keep", "clean"):
        custom_api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    def gone():
        names = [r["metadata"]["name"] for r in custom_api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]]
        return not names
    wait_for("both runs gone", gone, operator=operator_process)
    assert storage.list_files(clean) == []
    assert storage.list_files(keep)  # not asked: the files stay
    # No garbage collector runs here; in a cluster the owner references delete the jobs with the run.
    for j in list_jobs(custom_api, ns):
        assert j["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] is True


def test_a_serving_change_patches_the_rayservice(kube_namespace, s3_run_dir, custom_api, training_operator,
                                                 operator_process):
    ns = kube_namespace
    create_llmrun(custom_api, ns, llmrun("svc", s3_run_dir, enabled=("pretrain",)))
    wait_for("Succeeded", phase_is(custom_api, ns, "svc", "Succeeded"), operator=operator_process)

    def rayservice():
        try:
            return custom_api.get_namespaced_custom_object("ray.io", "v1", ns, "rayservices", "svc-chat")
        except client.ApiException:
            return None
    before = wait_for("the RayService", rayservice, operator=operator_process)
    custom_api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "svc",
                                              {"spec": {"serving": {"maxReplicas": 3, "targetOngoingRequests": 5}}})

    def patched():
        svc = rayservice()
        dep = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["deployments"][0]
        return svc if dep["autoscaling_config"]["max_replicas"] == 3 else None
    after = wait_for("the patched RayService", patched, operator=operator_process)
    dep = yaml.safe_load(after["spec"]["serveConfigV2"])["applications"][0]["deployments"][0]
    assert dep["autoscaling_config"]["target_ongoing_requests"] == 5
    assert after["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 3
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # patched, not recreated
    assert dep["user_config"] == yaml.safe_load(before["spec"]["serveConfigV2"])["applications"][0]["deployments"][0]["user_config"]


def test_unreadable_storage_is_retried_without_stopping_the_run(kube_namespace, custom_api, operator_process):
    ns = kube_namespace
    create_llmrun(custom_api, ns, llmrun("nostore", "s3://Not_A_Bucket!/runs/x"))  # every read fails
    wait_for("the first job", lambda: list_jobs(custom_api, ns), operator=operator_process)
    wait_for("a counted error", lambda: "llmrun_reconcile_errors_total 0.0" not in operator_process.metrics(),
             operator=operator_process)
    assert "reconcile of" in operator_process.log() and "Invalid bucket name" in operator_process.log()
    assert operator_process.proc.poll() is None  # still running
    run = get_llmrun(custom_api, ns, "nostore")
    assert run["status"]["phase"] == "Running" and run["status"]["stages"][0]["job"] == "nostore-tok-train-1"
