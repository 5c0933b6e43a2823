"""Stages as Kubeflow Trainer v2 TrainJobs: the pure builder, the launcher choice and the reconcile
decisions that differ from the PyTorchJob path (suspend flag, TTL). No cluster needed; the same
paths on a real Trainer v2 controller are in test_trainjob_kube.py."""

from __future__ import annotations

import datetime as dt

from nanorun.operator.api import parse_spec
from nanorun.operator.children import kueue, launchers
from nanorun.operator.children.pytorchjob import pytorchjob_for_stage
from nanorun.operator.children.trainjob import trainjob_for_stage, trainjob_state
from nanorun.operator.rbac import OPERATOR_RBAC_RULES
from nanorun.operator.reconcile.decision import FailureFacts
from nanorun.operator.reconcile.plan import stage_plan
from nanorun.operator.reconcile.run import reconcile
from nanorun.operator.run_ref import RunRef
from nanorun.pipeline.progress import Progress

RUN = RunRef(name="speedrun", namespace="team-a", uid="1234-uid")
T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def spec_of(**overrides):
    return parse_spec(
        {
            "storage": {"uri": "s3://bucket/runs/speedrun", "credentialsSecret": "s3-creds"},
            "serving": {"apiKeysSecret": "chat-keys"},
            **overrides,
        }
    )


def planned(spec, key):
    return next(s for s in stage_plan(spec) if s.key == key)


def node_patch(job):
    """The runtime patch's replicated Job `node`: the pod template nanorun sets."""
    ((patch,),) = [job["spec"]["runtimePatches"]]
    assert patch["manager"] == "nanorun.io/operator"
    ((node,),) = [patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]]
    assert node["name"] == "node"
    return node["template"]["spec"]["template"]


def test_a_two_node_stage_is_one_trainjob_with_the_pytorchjob_s_command_env_and_resources():
    spec = spec_of(
        compute={
            "nodes": 2,
            "gpusPerNode": 8,
            "cpu": "32",
            "memory": "256Gi",
            "shmSize": "16Gi",
            "nodeSelector": {"pool": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
            "terminationGracePeriodSeconds": 300,
            "trainingRuntime": "my-torch",
        }
    )
    stage = planned(spec, "pretrain")
    job = trainjob_for_stage(RUN, spec, stage, attempt=2, config_id="cfg")
    pyjob = pytorchjob_for_stage(RUN, spec, stage, attempt=2, config_id="cfg")
    master = pyjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    container = master["spec"]["containers"][0]

    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["name"] == pyjob["metadata"]["name"]
    assert job["metadata"]["labels"] == pyjob["metadata"]["labels"]
    assert job["metadata"]["annotations"] == pyjob["metadata"]["annotations"]
    assert job["metadata"]["ownerReferences"] == [RUN.owner_reference()]
    assert job["spec"]["runtimeRef"] == {
        "name": "my-torch",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    trainer = job["spec"]["trainer"]
    # torchrun reads PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_* from Trainer's torch plugin.
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["command"] == container["command"] and trainer["command"][:2] == ["torchrun", "-m"]
    assert trainer["env"] == container["env"]
    assert not any(
        e["name"].startswith("PET_") for e in trainer["env"]
    )  # reserved: Trainer's webhook refuses them
    assert trainer["image"] == spec.image
    assert trainer["resourcesPerNode"] == container["resources"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    pod = node_patch(job)
    assert (
        pod["metadata"] == master["metadata"]
    )  # nanorun labels (pods found by them) and Prometheus annotations
    assert pod["spec"]["nodeSelector"] == {"pool": "h100"}
    assert pod["spec"]["tolerations"] == master["spec"]["tolerations"]
    assert pod["spec"]["affinity"] == spec.compute.affinity
    assert pod["spec"]["terminationGracePeriodSeconds"] == 300
    assert pod["spec"]["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
    assert pod["spec"]["containers"] == [
        {"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}
    ]
    assert job["spec"]["suspend"] is False


def test_a_one_process_stage_is_one_cpu_pod_running_python():
    spec = spec_of(compute={"nodes": 4, "gpusPerNode": 8})
    job = trainjob_for_stage(RUN, spec, planned(spec, "tokenizer"), attempt=1)
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 1 and trainer["numProcPerNode"] == 1
    assert trainer["command"][:2] == ["python", "-m"]
    assert "nvidia.com/gpu" not in str(trainer.get("resourcesPerNode", {}))
    assert "volumes" not in node_patch(job)["spec"]


def test_a_queued_or_suspended_run_creates_its_trainjob_suspended_with_the_queue_label_on_the_job_only():
    spec = spec_of(compute={"queue": "team-a"})
    job = trainjob_for_stage(RUN, spec, planned(spec, "pretrain"), attempt=1)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "kueue.x-k8s.io/queue-name" not in node_patch(job)["metadata"]["labels"]
    # Kueue v0.17 rewrites an admitted TrainJob through Trainer v2.2's API, which has no grace
    # period in runtimePatches: left to the runtime, so Trainer's JobSet update stays valid.
    assert "terminationGracePeriodSeconds" not in node_patch(job)["spec"]
    assert (
        trainjob_for_stage(RUN, spec_of(suspend=True), planned(spec, "pretrain"), 1)["spec"]["suspend"]
        is True
    )


def test_a_long_run_name_leaves_room_for_the_first_pod_s_hostname():
    run = RunRef(name="a-very-long-run-name-" + "x" * 60, namespace="ns", uid="u")
    spec = spec_of()
    name = trainjob_for_stage(run, spec, planned(spec, "midtrain"), attempt=12)["metadata"]["name"]
    assert len(f"{name}-node-0-0") <= 63 and name.endswith("-12")
    assert name != trainjob_for_stage(run, spec, planned(spec, "sft"), attempt=12)["metadata"]["name"]


def test_trainjob_state_reads_the_trainer_controller_s_conditions():
    def tj(*conditions, suspend=False, active=0):
        return {
            "spec": {"suspend": suspend},
            "status": {
                "conditions": [
                    {
                        "type": t,
                        "status": s,
                        "reason": "R",
                        "message": "m",
                        "lastTransitionTime": "2026-01-01T12:00:00Z",
                    }
                    for t, s in conditions
                ],
                "jobsStatus": [{"name": "node", "active": active}],
            },
        }

    assert trainjob_state(tj(("Complete", "True"))).phase == "Succeeded"
    failed = trainjob_state(tj(("Failed", "True")))
    assert (failed.phase, failed.reason, failed.since) == ("Failed", "R", T0)
    assert trainjob_state(tj(suspend=True)).phase == "Suspended"
    assert trainjob_state(tj(("Suspended", "False"), active=2)).phase == "Running"
    assert trainjob_state(tj()).phase == "Pending"


def test_auto_takes_trainjob_only_where_served_and_keeps_the_recorded_choice():
    assert launchers.choose("auto", "", trainjob_served=True) is launchers.TRAINJOB
    assert launchers.choose("auto", "", trainjob_served=False) is launchers.PYTORCHJOB
    # A run that started on PyTorchJobs stays on them when Trainer v2 is installed later.
    assert launchers.choose("auto", "PyTorchJob", trainjob_served=True) is launchers.PYTORCHJOB
    assert launchers.choose("auto", "TrainJob", trainjob_served=False) is launchers.TRAINJOB
    assert launchers.choose("TrainJob", "PyTorchJob", trainjob_served=False) is launchers.TRAINJOB


def test_the_operator_may_create_watch_patch_and_delete_trainjobs_and_nothing_else_of_trainer_v2():
    trainer_rules = [r for r in OPERATOR_RBAC_RULES if "trainer.kubeflow.org" in r["apiGroups"]]
    assert trainer_rules == [
        {
            "apiGroups": ["trainer.kubeflow.org"],
            "resources": ["trainjobs"],
            "verbs": ["list", "watch", "create", "patch", "delete"],
        }
    ]


# --- the reconcile with TrainJobs -------------------------------------------------------------------


def body(status=None, **spec):
    off = {k: {"enabled": False} for k in ("baseEval", "midtrain", "sft", "rl", "eval", "report")}
    return {
        "metadata": {"name": "speedrun", "namespace": "team-a", "uid": "1234-uid", "generation": 1},
        "spec": {
            "storage": {"uri": "s3://b/r"},
            "stages": off,
            "retry": {"maxAttempts": 2, "backoffSeconds": 10},
            "serving": {"apiKeysSecret": "chat-keys"},
            **spec,
        },
        "status": status or {},
    }


def observed(manifest, *conditions, at="2026-01-01T12:00:00Z", active=1):
    """A TrainJob as the API server returns it once the Trainer controller has written conditions."""
    job = {k: manifest[k] for k in ("apiVersion", "kind", "metadata")}
    job["spec"] = {"suspend": manifest["spec"]["suspend"]}
    job["status"] = {
        "conditions": [
            {"type": t, "status": "True", "reason": t, "message": "", "lastTransitionTime": at}
            for t in conditions
        ],
        "jobsStatus": [{"name": "node", "active": active}],
    }
    return job


def nothing(stage):
    return None, None


def test_auto_on_a_cluster_with_trainer_v2_creates_a_trainjob_and_records_the_launcher():
    d = reconcile(RUN, body(), [], None, nothing, T0, trainjob_served=True)
    ((manifest, event),) = d.create_jobs
    assert manifest["kind"] == "TrainJob" and "created TrainJob" in event.message
    assert d.status["launcher"] == "TrainJob"
    # The next reconcile, with the CRD gone from discovery, still follows and keeps the TrainJob.
    again = reconcile(RUN, body(d.status), [observed(manifest)], None, nothing, T0, trainjob_served=False)
    assert again.create_jobs == [] and again.status["launcher"] == "TrainJob"
    assert again.status["phase"] == "Running"


def test_a_run_that_started_on_pytorchjobs_does_not_move_when_trainer_v2_appears():
    first = reconcile(RUN, body(), [], None, nothing, T0, trainjob_served=False)
    ((pyjob, _),) = first.create_jobs
    assert pyjob["kind"] == "PyTorchJob" and first.status["launcher"] == "PyTorchJob"
    pyjob["status"] = {
        "conditions": [{"type": "Succeeded", "status": "True", "lastTransitionTime": "2026-01-01T12:01:00Z"}]
    }
    nxt = reconcile(RUN, body(first.status), [pyjob], None, nothing, T0, trainjob_served=True)
    assert [m["kind"] for m, _ in nxt.create_jobs] == ["PyTorchJob"]


def test_suspend_and_resume_set_the_trainjob_s_spec_suspend():
    d = reconcile(RUN, body(compute={"launcher": "TrainJob"}), [], None, nothing, T0)
    ((manifest, _),) = d.create_jobs
    name = manifest["metadata"]["name"]
    running = observed(manifest)
    s = reconcile(
        RUN, body(d.status, suspend=True, compute={"launcher": "TrainJob"}), [running], None, nothing, T0
    )
    assert s.patch_jobs == [(name, {"spec": {"suspend": True}})]
    assert "suspended TrainJob" in s.events[0].message
    suspended = {**running, "spec": {"suspend": True}}
    r = reconcile(RUN, body(s.status, compute={"launcher": "TrainJob"}), [suspended], None, nothing, T0)
    assert r.patch_jobs == [(name, {"spec": {"suspend": False}})]


def test_a_preempted_trainjob_is_retried_at_once_without_counting_a_failure():
    spec = {"compute": {"launcher": "TrainJob"}}
    d = reconcile(RUN, body(**spec), [], None, nothing, T0)
    ((manifest, _),) = d.create_jobs
    failed = observed(manifest, "Failed", active=0)
    stopped = Progress(stage="tokenizer", step=3, total_steps=10, attempt=1, stopped="preempted")
    files = {"tokenizer": (stopped, None)}
    r = reconcile(RUN, body(d.status, **spec), [failed], None, lambda st: files.get(st, (None, None)), T0)
    rec = r.status["stages"][0]
    assert rec["preemptions"] == 1 and rec.get("failures", 0) == 0
    assert [(m["kind"], m["metadata"]["labels"]["nanorun.io/attempt"]) for m, _ in r.create_jobs] == [
        ("TrainJob", "2")
    ]


def test_a_failed_trainjob_counts_and_its_pods_are_inspected_with_the_trainer_container():
    spec = {"compute": {"launcher": "TrainJob"}}
    d = reconcile(RUN, body(**spec), [], None, nothing, T0)
    ((manifest, _),) = d.create_jobs
    seen = []

    def inspect(job):
        seen.append(job["kind"])
        return FailureFacts(log_tail="error: corrupt shard")

    r = reconcile(
        RUN, body(d.status, **spec), [observed(manifest, "Failed", active=0)], None, nothing, T0, inspect
    )
    rec = r.status["stages"][0]
    assert seen == ["TrainJob"] and rec["failures"] == 1 and "corrupt shard" in rec["message"]
    assert r.create_jobs == [] and r.requeue_after == 10  # the backoff before attempt 2


def test_a_finished_trainjob_is_deleted_after_its_ttl_once_the_status_records_it():
    spec = {"compute": {"launcher": "TrainJob", "ttlSecondsAfterFinished": 60}}
    d = reconcile(RUN, body(**spec), [], None, nothing, T0)
    ((manifest, _),) = d.create_jobs
    done = observed(manifest, "Complete", at="2026-01-01T12:00:00Z", active=0)
    # First seen finished: the success is recorded, nothing is deleted.
    seen = reconcile(RUN, body(d.status, **spec), [done], None, nothing, T0 + dt.timedelta(seconds=10))
    assert seen.delete_jobs == [] and seen.status["stages"][0]["phase"] == "Succeeded"
    # Recorded: kept until the TTL, with a reconcile due then.
    kept = reconcile(RUN, body(seen.status, **spec), [done], None, nothing, T0 + dt.timedelta(seconds=20))
    assert kept.delete_jobs == [] and kept.requeue_after == 40
    later = T0 + dt.timedelta(seconds=61)
    expired = reconcile(RUN, body(seen.status, **spec), [done], None, nothing, later)
    assert expired.delete_jobs == [manifest["metadata"]["name"]]
    # A finished job whose end the status does not hold yet is kept, however old.
    fresh = reconcile(RUN, body(d.status, **spec), [done], None, nothing, later)
    assert fresh.delete_jobs == []


def test_a_pytorchjob_is_left_to_the_training_operator_s_own_ttl():
    d = reconcile(RUN, body(compute={"ttlSecondsAfterFinished": 0}), [], None, nothing, T0)
    ((pyjob, _),) = d.create_jobs
    pyjob["status"] = {
        "conditions": [{"type": "Succeeded", "status": "True", "lastTransitionTime": "2026-01-01T12:00:00Z"}]
    }
    seen = reconcile(RUN, body(d.status), [pyjob], None, nothing, T0)
    later = reconcile(RUN, body(seen.status), [pyjob], None, nothing, T0 + dt.timedelta(hours=1))
    assert seen.delete_jobs == later.delete_jobs == []


def test_a_queued_trainjob_waits_for_kueue_which_owns_its_spec_suspend():
    spec = {"compute": {"launcher": "TrainJob", "queue": "training"}}
    d = reconcile(RUN, body(**spec), [], None, nothing, T0)
    ((manifest, _),) = d.create_jobs
    assert manifest["spec"]["suspend"] is True
    waiting = observed(manifest, active=0)
    q = reconcile(RUN, body(d.status, **spec), [waiting], None, nothing, T0)
    assert q.status["phase"] == "Queued" and q.patch_jobs == []
    message = next(c for c in q.status["conditions"] if c["type"] == "Queued")["message"]
    assert f"TrainJob {manifest['metadata']['name']}" in message
    assert "trainer.kubeflow.org/trainjob integration" in message
    # spec.suspend deactivates the Workload; the TrainJob's spec.suspend stays Kueue's.
    workload = kueue.Admission(workload="trainjob-w", admitted=True, cluster_queue="gpus")
    s = reconcile(
        RUN,
        body(q.status, suspend=True, **spec),
        [waiting],
        None,
        nothing,
        T0,
        admission_of=lambda job: workload,
    )
    assert s.patch_jobs == [] and [w for w, _ in s.patch_workloads] == ["trainjob-w"]
    assert "of TrainJob" in s.events[0].message
