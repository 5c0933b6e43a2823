"""The reconcile decision as a pure function: the state machine without a cluster.

Bodies and child objects are plain dicts shaped like the API server's; storage is a dict of
(progress, done) per stage key.
"""

from __future__ import annotations

import copy
import datetime as dt

import yaml
from nanorun.operator.reconcile.decision import Event, FailureFacts
from nanorun.operator.reconcile.run import reconcile
from nanorun.operator.run_ref import RunRef
from nanorun.pipeline.progress import Done, Progress

from tests.operator.reconcile_world import ALL_OFF, RUN, T0, body, cond, config_id, job, pod, storage


def test_a_new_run_creates_the_first_stage_job():
    d = reconcile(RUN, body(), [], None, storage(), T0)
    assert [m["metadata"]["name"] for m, _ in d.create_jobs] == ["r1-tokenizer-1"]
    assert [e.reason for _, e in d.create_jobs] == ["StageStarted"]
    s = d.status
    assert (s["phase"], s["stage"], s["observedGeneration"]) == ("Running", "tokenizer", 2)
    assert [(r["name"], r["phase"], r["attempts"]) for r in s["stages"]] == [
        ("tokenizer", "Running", 1),
        ("pretrain", "Pending", 0),
    ]
    assert cond(s, "Progressing")["status"] == "True" and cond(s, "Ready")["status"] == "False"


def test_deciding_again_before_the_job_is_seen_names_the_same_job():
    first = reconcile(RUN, body(), [], None, storage(), T0)
    again = reconcile(RUN, body(status=first.status), [], None, storage(), T0 + dt.timedelta(seconds=1))
    assert [m["metadata"]["name"] for m, _ in again.create_jobs] == ["r1-tokenizer-1"]  # a 409 at the API
    assert again.status["stages"][0]["attempts"] == 1


def test_a_running_job_shows_progress_and_loss():
    files = {
        "tokenizer": (
            Progress(
                stage="tokenizer",
                step=30,
                total_steps=120,
                loss=3.25,
                tokens_per_sec=5e5,
                mfu=0.41,
                eta_seconds=90,
            ),
            None,
        )
    }
    d = reconcile(RUN, body(), [job("r1-tokenizer-1", "tokenizer", 1, "Running")], None, storage(files), T0)
    assert d.create_jobs == []
    s = d.status
    assert (s["progress"], s["loss"], s["eta"]) == ("30/120", 3.25, "1m30s")
    assert s["stages"][0]["metrics"] == {
        "step": 30,
        "totalSteps": 120,
        "loss": 3.25,
        "tokensPerSecond": 5e5,
        "mfu": 0.41,
        "etaSeconds": 90,
    }


def test_a_succeeded_stage_records_its_outputs_and_starts_the_next():
    done = Done(
        stage="tokenizer",
        seconds=5,
        config_id=config_id("tokenizer"),
        metrics={"loss": 1.0},
        outputs={"tokenizer": "s3://b/r1/tokenizer/tokenizer.tiktoken"},
    )
    d = reconcile(
        RUN,
        body(),
        [job("r1-tokenizer-1", "tokenizer", 1, "Succeeded", at="2026-01-01T12:05:00Z")],
        None,
        storage({"tokenizer": (None, done)}),
        T0 + dt.timedelta(minutes=6),
    )
    tok, pre = d.status["stages"]
    assert (tok["phase"], tok["completionTime"], tok["outputs"]) == (
        "Succeeded",
        "2026-01-01T12:05:00Z",
        done.outputs,
    )
    assert tok["durationSeconds"] == 300.0
    assert d.finished_stages == [("tokenizer", 300.0)]
    assert [m["metadata"]["name"] for m, _ in d.create_jobs] == ["r1-pretrain-1"]
    assert pre["phase"] == "Running" and d.status["stage"] == "pretrain"


def test_a_failed_attempt_waits_for_the_backoff_then_retries():
    failed = job(
        "r1-tokenizer-1",
        "tokenizer",
        1,
        "Failed",
        at="2026-01-01T12:00:00Z",
        reason="PyTorchJobFailed",
        message="pytorch-master-0 exited with code 137",
    )
    early = reconcile(RUN, body(), [failed], None, storage(), T0 + dt.timedelta(seconds=4))
    assert early.create_jobs == [] and 5.9 < early.requeue_after <= 6
    assert cond(early.status, "Degraded")["reason"] == "AttemptFailed"
    late = reconcile(RUN, body(), [failed], None, storage(), T0 + dt.timedelta(seconds=11))
    assert [(m["metadata"]["name"], e.reason) for m, e in late.create_jobs] == [
        ("r1-tokenizer-2", "StageRetried")
    ]
    assert late.status["stages"][0]["attempts"] == 2


def test_the_run_fails_after_the_last_counted_failure_with_the_reason_and_log_lines():
    first = job("r1-tokenizer-1", "tokenizer", 1, "Failed", reason="PyTorchJobFailed", message="exit 1")
    seen = reconcile(RUN, body(), [first], None, storage(), T0 + dt.timedelta(hours=1))
    second = job("r1-tokenizer-2", "tokenizer", 2, "Failed", reason="PyTorchJobFailed", message="OOMKilled")
    inspected = []

    def inspect(j):
        inspected.append(j["metadata"]["name"])
        return FailureFacts(log_tail="loading shard 3\nValueError: shard 3 is corrupt\n")

    d = reconcile(
        RUN, body(status=seen.status), [first, second], None, storage(), T0 + dt.timedelta(hours=1), inspect
    )
    assert d.create_jobs == [] and d.status["phase"] == "Failed"
    degraded = cond(d.status, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "StageFailed"
    assert "failure 2/2 (attempt 2): PyTorchJobFailed: OOMKilled" in degraded["message"]
    assert degraded["message"].endswith("last log lines:\nloading shard 3\nValueError: shard 3 is corrupt")
    assert {"StageFailed", "RunFailed"} <= {e.reason for e in d.events}
    assert d.status["stages"][0]["failures"] == 2
    assert d.ended_attempts == [("tokenizer", "failed")]
    # Reconciling the failed run again repeats no event, creates nothing, and reads no pods again.
    again = reconcile(
        RUN, body(status=d.status), [first, second], None, storage(), T0 + dt.timedelta(hours=2), inspect
    )
    assert again.create_jobs == [] and again.events == [] and inspected == ["r1-tokenizer-2"]


def test_a_preempted_attempt_restarts_at_once_and_is_not_counted():
    progress = Progress(stage="pretrain", step=20, total_steps=100, attempt=1, stopped="preempted")
    files = {"tokenizer": (None, Done(stage="tokenizer", seconds=1, config_id=config_id("tokenizer")))}
    status = reconcile(
        RUN, body(), [job("r1-tokenizer-1", "tokenizer", 1, "Succeeded")], None, storage(files), T0
    ).status
    jobs = [
        job("r1-tokenizer-1", "tokenizer", 1, "Succeeded"),
        job(
            "r1-pretrain-1",
            "pretrain",
            1,
            "Failed",
            reason="PyTorchJobFailed",
            message="1 Master replica(s) failed",
        ),
    ]
    files["pretrain"] = (progress, None)
    d = reconcile(RUN, body(status=status), jobs, None, storage(files), T0)  # no backoff wait
    assert [(m["metadata"]["name"], e.reason) for m, e in d.create_jobs] == [
        ("r1-pretrain-2", "StageRetried")
    ]
    pre = d.status["stages"][1]
    assert (pre["attempts"], pre["failures"], pre["preemptions"]) == (2, 0, 1)
    assert "attempt 1 preempted (the trainer checkpointed on SIGTERM" in pre["message"]
    assert "StagePreempted" in [e.reason for e in d.events]
    assert d.ended_attempts == [("pretrain", "preempted")]
    # Preempted again (the pods say so this time), then a real failure: only that one counts.
    jobs.append(job("r1-pretrain-2", "pretrain", 2, "Failed"))
    d = reconcile(
        RUN,
        body(status=d.status),
        jobs,
        None,
        storage(files),
        T0,
        lambda j: FailureFacts(
            disruption="pod r1-pretrain-2-master-0: DisruptionTarget (EvictionByEvictionAPI)"
        ),
    )
    jobs.append(job("r1-pretrain-3", "pretrain", 3, "Failed", message="exit 1"))
    d = reconcile(RUN, body(status=d.status), jobs, None, storage(files), T0)
    pre = d.status["stages"][1]
    assert (pre["attempts"], pre["failures"], pre["preemptions"], pre["phase"]) == (3, 1, 2, "Running")
    assert d.create_jobs == [] and d.requeue_after == 10  # the first counted failure waits the backoff


def test_a_stage_whose_flags_change_after_it_finished_runs_again_with_the_stages_after_it():
    base = {
        "stages": {
            **ALL_OFF,
            "tokenizer": {"enabled": True},
            "pretrain": {"enabled": True, "numIterations": 10},
        }
    }
    spec = {k: v for k, v in body().items() if k == "spec"}["spec"] | base
    done = {
        "tokenizer": (None, Done(stage="tokenizer", seconds=1, config_id=config_id("tokenizer", spec))),
        "pretrain": (
            None,
            Done(
                stage="pretrain",
                seconds=1,
                outputs={"checkpoint": "s3://b/r1/pretrain/c/step_10"},
                config_id=config_id("pretrain", spec),
            ),
        ),
    }
    jobs = [
        job("r1-tokenizer-1", "tokenizer", 1, "Succeeded", config=config_id("tokenizer", spec)),
        job("r1-pretrain-1", "pretrain", 1, "Succeeded", config=config_id("pretrain", spec)),
    ]
    first = reconcile(RUN, {**body(), "spec": spec}, jobs, None, storage(done), T0)
    assert first.status["phase"] == "Succeeded"
    ids = {r["name"]: r["configId"] for r in first.status["stages"]}
    done["pretrain"][1].config_id = ids["pretrain"]

    spec["stages"]["pretrain"]["numIterations"] = 20  # the user asks for more steps
    d = reconcile(RUN, {**body(), "spec": spec, "status": first.status}, jobs, None, storage(done), T0)
    tok, pre = d.status["stages"]
    assert tok["phase"] == "Succeeded" and tok["configId"] == ids["tokenizer"]
    assert pre["phase"] == "Running" and pre["configId"] != ids["pretrain"] and pre["attempts"] == 2
    ((manifest, event),) = d.create_jobs
    assert manifest["metadata"]["name"] == "r1-pretrain-2" and "--num-iterations" in str(manifest)
    assert manifest["metadata"]["labels"]["nanorun.io/config"] == pre["configId"]
    assert "StageRerun" in [e.reason for e in d.events] and d.status["phase"] == "Running"
    # The old done.json is not this configuration's: the stage is not done until the new job is.
    jobs.append({**manifest, "status": {"conditions": [{"type": "Running", "status": "True"}]}})
    again = reconcile(RUN, {**body(), "spec": spec, "status": d.status}, jobs, None, storage(done), T0)
    assert again.create_jobs == [] and again.status["stages"][1]["phase"] == "Running"
    # A reconcile that created the job but lost its status write adopts that job instead of a third.
    lost = reconcile(RUN, {**body(), "spec": spec, "status": first.status}, jobs, None, storage(done), T0)
    assert lost.create_jobs == [] and lost.status["stages"][1]["attempts"] == 2


def test_suspend_patches_the_running_job_and_resume_unpatches_it():
    running = job("r1-tokenizer-1", "tokenizer", 1, "Running")
    d = reconcile(RUN, body(suspend=True), [running], None, storage(), T0)
    assert d.patch_jobs == [("r1-tokenizer-1", {"spec": {"runPolicy": {"suspend": True}}})]
    assert d.status["phase"] == "Suspended"
    suspended = job("r1-tokenizer-1", "tokenizer", 1, "Running", suspend=True)
    d = reconcile(RUN, body(suspend=True, status=d.status), [suspended], None, storage(), T0)
    assert d.patch_jobs == [] and d.status["phase"] == "Suspended"
    d = reconcile(RUN, body(status=d.status), [suspended], None, storage(), T0)
    assert d.patch_jobs == [("r1-tokenizer-1", {"spec": {"runPolicy": {"suspend": False}}})]
    assert d.status["phase"] == "Running"


def test_a_suspended_run_starts_no_job():
    d = reconcile(RUN, body(suspend=True), [], None, storage(), T0)
    assert d.create_jobs == [] and d.status["phase"] == "Suspended"


def test_a_job_deleted_after_success_is_not_run_again_when_done_json_exists():
    status = reconcile(RUN, body(), [], None, storage(), T0).status
    done = Done(stage="tokenizer", seconds=1, config_id=config_id("tokenizer"))
    d = reconcile(RUN, body(status=status), [], None, storage({"tokenizer": (None, done)}), T0)
    assert d.status["stages"][0]["phase"] == "Succeeded"
    assert [m["metadata"]["name"] for m, _ in d.create_jobs] == ["r1-pretrain-1"]


def finished_run(serving=None):
    jobs = [
        job("r1-tokenizer-1", "tokenizer", 1, "Succeeded"),
        job("r1-pretrain-1", "pretrain", 1, "Succeeded"),
    ]
    files = {
        "pretrain": (
            None,
            Done(
                stage="pretrain",
                seconds=9,
                outputs={"checkpoint": "s3://b/r1/pretrain/checkpoints/step_000009"},
                config_id=config_id("pretrain"),
            ),
        )
    }
    spec = {"serving": serving} if serving else {}
    return jobs, storage(files), spec


def test_a_finished_run_creates_its_rayservice_and_is_ready_when_it_is():
    jobs, files, spec = finished_run()
    d = reconcile(RUN, body(**spec), jobs, None, files, T0)
    assert d.status["phase"] == "Succeeded" and d.status["progress"] == "done"
    assert d.status["checkpoint"] == "s3://b/r1/pretrain/checkpoints/step_000009"
    svc = d.create_rayservice
    assert svc["metadata"]["name"] == "r1-chat"
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    pretrain = d.status["stages"][1]
    # The version is the config id the served checkpoint was saved under (a re-run may reuse its path).
    assert app["deployments"][0]["user_config"] == {
        "checkpoint": d.status["checkpoint"],
        "version": pretrain["configId"],
    }
    assert cond(d.status, "Ready")["reason"] == "ServingNotReady"
    svc = copy.deepcopy(svc)
    svc["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    d = reconcile(RUN, body(status=d.status, **spec), jobs, svc, files, T0)
    assert d.create_rayservice is None and d.patch_rayservice is None
    assert cond(d.status, "Ready")["status"] == "True"
    assert d.status["serving"] == {
        "rayService": "r1-chat",
        "ready": True,
        "url": "http://r1-chat-serve-svc.ns.svc:8000",
        "checkpoint": "s3://b/r1/pretrain/checkpoints/step_000009",
    }


def test_a_serving_change_patches_the_rayservice():
    jobs, files, _ = finished_run()
    existing = reconcile(RUN, body(), jobs, None, files, T0).create_rayservice
    d = reconcile(RUN, body(serving={"maxReplicas": 5}), jobs, existing, files, T0)
    assert d.create_rayservice is None
    patched = yaml.safe_load(d.patch_rayservice["spec"]["serveConfigV2"])
    assert patched["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"] == 5
    d = reconcile(
        RUN, body(serving={"enabled": False}, stages=("tokenizer", "pretrain")), jobs, existing, files, T0
    )
    assert d.delete_rayservice == "r1-chat" and cond(d.status, "Ready")["reason"] == "Trained"


def test_an_invalid_spec_is_degraded_and_touches_nothing():
    bad = body(serving={"minReplicas": 4, "maxReplicas": 2})
    d = reconcile(RUN, bad, [], None, storage(), T0)
    assert d.create_jobs == [] and d.create_rayservice is None
    degraded = cond(d.status, "Degraded")
    assert (
        degraded["reason"] == "InvalidSpec" and "serving.minReplicas must not exceed" in degraded["message"]
    )
    assert [e.reason for e in d.events] == ["InvalidSpec"]
    assert (
        reconcile(
            RUN, body(serving={"minReplicas": 4, "maxReplicas": 2}, status=d.status), [], None, storage(), T0
        ).events
        == []
    )


def test_condition_times_move_only_when_the_status_flips():
    first = reconcile(RUN, body(), [], None, storage(), T0)
    later = reconcile(
        RUN,
        body(status=first.status),
        [job("r1-tokenizer-1", "tokenizer", 1, "Running")],
        None,
        storage(),
        T0 + dt.timedelta(minutes=5),
    )
    assert (
        cond(later.status, "Progressing")["lastTransitionTime"]
        == cond(first.status, "Progressing")["lastTransitionTime"]
    )


def test_server_side_defaults_on_the_rayservice_are_not_a_change():
    jobs, files, _ = finished_run()
    existing = copy.deepcopy(reconcile(RUN, body(), jobs, None, files, T0).create_rayservice)
    existing["spec"]["rayClusterConfig"]["headGroupSpec"]["serviceType"] = (
        "ClusterIP"  # a default the server adds
    )
    existing["spec"]["upgradeStrategy"] = {"type": "NewCluster"}
    d = reconcile(RUN, body(), jobs, existing, files, T0)
    assert d.patch_rayservice is None and d.create_rayservice is None


def test_a_failure_counts_even_when_the_failed_job_is_gone_before_its_retry():
    failed = job(
        "r1-tokenizer-1",
        "tokenizer",
        1,
        "Failed",
        at="2026-01-01T12:00:00Z",
        reason="PyTorchJobFailed",
        message="exit 1",
    )
    seen = reconcile(RUN, body(), [failed], None, storage(), T0 + dt.timedelta(seconds=2))
    assert seen.create_jobs == []
    # The job's TTL deleted it; the retry is due now.
    d = reconcile(RUN, body(status=seen.status), [], None, storage(), T0 + dt.timedelta(seconds=11))
    assert [m["metadata"]["name"] for m, _ in d.create_jobs] == ["r1-tokenizer-2"]
    # And after the last attempt's job is gone too, the run stays failed instead of starting over.
    last = job("r1-tokenizer-2", "tokenizer", 2, "Failed", at="2026-01-01T12:01:00Z", message="exit 1")
    failed_run = reconcile(RUN, body(status=d.status), [last], None, storage(), T0 + dt.timedelta(minutes=2))
    gone = reconcile(RUN, body(status=failed_run.status), [], None, storage(), T0 + dt.timedelta(days=2))
    assert gone.create_jobs == [] and gone.status["phase"] == "Failed" and gone.events == []


def test_the_pods_of_a_failed_job_tell_a_preemption_from_a_failure():
    from nanorun.operator.reconcile.failures import failure_facts

    logs = {"j-master-0": "step 3\nRuntimeError: boom\n", "j-worker-0": "connection reset by peer"}
    read = lambda pod: logs[pod.metadata.name]  # noqa: E731
    assert (
        failure_facts([pod("j-worker-0", 1), pod("j-master-0", 143)], read).disruption
        == "pod j-master-0: exited 143 (SIGTERM)"
    )
    evicted = failure_facts([pod("j-master-0", 1, disruption="EvictionByEvictionAPI")], read)
    assert evicted.disruption == "pod j-master-0: DisruptionTarget (EvictionByEvictionAPI)"
    # A plain failure: no disruption, and the Master's log (rank 0) rather than the Worker's.
    facts = failure_facts([pod("j-worker-0", 1), pod("j-master-0", 1)], read)
    assert facts.disruption == "" and facts.log_tail == "[j-master-0, exit 1]\nstep 3\nRuntimeError: boom"

    # A log that cannot be read is skipped; the next failed pod's is used.
    def flaky(p):
        if p.metadata.name == "j-master-0":
            raise OSError("kubelet unreachable")
        return logs[p.metadata.name]

    assert failure_facts([pod("j-worker-0", 1), pod("j-master-0", 1)], flaky).log_tail.startswith(
        "[j-worker-0, exit 1]"
    )
    assert failure_facts([pod("j-master-0", 0)], read) == type(facts)()
    # A pod still stopping (the job is marked failed the moment a pod is deleted) is named, nothing decided.
    assert failure_facts([pod("j-worker-0"), pod("j-master-0", 143)], read) == type(facts)(
        active=("j-worker-0",)
    )


def test_a_failed_job_whose_pods_are_still_stopping_is_decided_only_once_they_have_stopped():
    failed = job(
        "r1-tokenizer-1",
        "tokenizer",
        1,
        "Failed",
        reason="PyTorchJobFailed",
        message="1 Master replica(s) failed",
    )
    stopping = reconcile(
        RUN,
        body(),
        [failed],
        None,
        storage(),
        T0,
        lambda j: FailureFacts(active=("r1-tokenizer-1-master-0",)),
    )
    rec = stopping.status["stages"][0]
    assert stopping.create_jobs == [] and rec["phase"] == "Running" and rec.get("failures", 0) == 0
    assert "waiting for r1-tokenizer-1-master-0 to stop" in rec["message"] and stopping.requeue_after == 2
    progress = Progress(stage="tokenizer", attempt=1, stopped="preempted")  # written while it stopped
    d = reconcile(
        RUN, body(status=stopping.status), [failed], None, storage({"tokenizer": (progress, None)}), T0
    )
    assert [m["metadata"]["name"] for m, _ in d.create_jobs] == ["r1-tokenizer-2"]
    assert d.status["stages"][0]["preemptions"] == 1


def test_the_eta_reads_like_a_person_writes_it():
    from nanorun.operator.api import StageMetrics, StageStatus
    from nanorun.operator.reconcile.run import _eta

    def eta(seconds, phase="Running"):
        return _eta(StageStatus(name="pretrain", metrics=StageMetrics(eta_seconds=seconds)), phase)

    assert [eta(35), eta(250), eta(3900), eta(90061)] == ["35s", "4m10s", "1h05m", "25h01m"]
    assert eta(None) == "" and eta(30, "Succeeded") == "" and _eta(None, "Running") == ""


def test_an_event_object_names_its_run_and_cuts_a_long_message():
    ref = RunRef(name="speedrun", namespace="team-a", uid="u-1")
    event = Event("Warning", "StageFailed", "x" * 2000).to_object("LLMRun", ref, "2026-01-01T00:00:00Z")
    assert event["metadata"] == {"generateName": "speedrun.", "namespace": "team-a"}
    assert event["involvedObject"] == {
        "apiVersion": "nanorun.io/v1alpha1",
        "kind": "LLMRun",
        "name": "speedrun",
        "namespace": "team-a",
        "uid": "u-1",
    }
    assert (event["type"], event["reason"], len(event["message"])) == ("Warning", "StageFailed", 1024)
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2026-01-01T00:00:00Z"
