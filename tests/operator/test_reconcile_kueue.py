"""The reconcile decision with Kueue (compute.queue): a queued run, admission, suspend and resume
through the Workload."""

from __future__ import annotations

from nanorun.operator.reconcile.attempts import ACTIVE_POLL_SECONDS
from nanorun.operator.reconcile.run import reconcile

from tests.operator.reconcile_world import RUN, T0, body, cond, job, storage


def workload(admitted=False, active=True, reason="Pending", message="", deactivated_by_operator=False):
    """A Kueue Workload as the API returns it (kueue.x-k8s.io/v1beta2)."""
    conditions = [
        {
            "type": "QuotaReserved",
            "status": "True" if admitted else "False",
            "reason": "QuotaReserved" if admitted else reason,
            "message": "" if admitted else message,
        }
    ]
    if admitted:
        conditions.append({"type": "Admitted", "status": "True", "reason": "Admitted", "message": ""})
    annotations = {"nanorun.io/deactivated": "true"} if deactivated_by_operator else {}
    return {
        "metadata": {"name": "pytorchjob-r1-tokenizer-1-1a2b3", "annotations": annotations},
        "spec": {"active": active},
        "status": {"conditions": conditions, **({"admission": {"clusterQueue": "gpus"}} if admitted else {})},
    }


def kueue_sees(wl):
    from nanorun.operator.children.kueue import admission_of

    return lambda job: admission_of(wl)


QUEUED = {"compute": {"queue": "team-a"}}


def test_a_job_waiting_for_quota_makes_the_run_queued_with_kueues_reason():
    waiting = job("r1-tokenizer-1", "tokenizer", 1, suspend=True)
    why = "couldn't assign flavors to pod set master: insufficient unused quota for nvidia.com/gpu in flavor h100, 8 more needed"
    d = reconcile(
        RUN,
        body(status={"phase": "Running"}, **QUEUED),
        [waiting],
        None,
        storage(),
        T0,
        admission_of=kueue_sees(workload(message=why)),
    )
    s = d.status
    assert (s["phase"], s["stages"][0]["phase"]) == ("Queued", "Queued")
    q = cond(s, "Queued")
    assert (q["status"], q["reason"]) == ("True", "Pending")
    assert "LocalQueue team-a" in q["message"] and why in q["message"]
    assert cond(s, "Progressing")["reason"] == "Queued"
    assert [e.reason for e in d.events] == ["RunQueued"] and why in d.events[0].message
    assert d.patch_jobs == [] and d.patch_workloads == []  # Kueue owns runPolicy.suspend


def test_no_workload_yet_says_so_and_looks_again_soon():
    waiting = job("r1-tokenizer-1", "tokenizer", 1, suspend=True)
    d = reconcile(RUN, body(**QUEUED), [waiting], None, storage(), T0)
    assert d.status["phase"] == "Queued"
    assert "Kueue has made no Workload for PyTorchJob r1-tokenizer-1" in cond(d.status, "Queued")["message"]
    assert d.requeue_after == ACTIVE_POLL_SECONDS  # no watch sees the Workload appear


def test_an_admitted_job_runs_and_the_condition_names_the_cluster_queue():
    started = job("r1-tokenizer-1", "tokenizer", 1, "Running", suspend=False)
    d = reconcile(
        RUN,
        body(status={"phase": "Queued"}, **QUEUED),
        [started],
        None,
        storage(),
        T0,
        admission_of=kueue_sees(workload(admitted=True)),
    )
    assert d.status["phase"] == "Running"
    q = cond(d.status, "Queued")
    assert (q["status"], q["reason"]) == ("False", "Admitted") and "ClusterQueue gpus" in q["message"]


def test_suspend_with_a_queue_deactivates_the_workload_and_resume_reactivates_only_that():
    running = job("r1-tokenizer-1", "tokenizer", 1, "Running", suspend=False)
    d = reconcile(
        RUN,
        body(suspend=True, **QUEUED),
        [running],
        None,
        storage(),
        T0,
        admission_of=kueue_sees(workload(admitted=True)),
    )
    assert d.patch_jobs == []  # never runPolicy.suspend: Kueue would set it back
    assert d.patch_workloads == [
        (
            "pytorchjob-r1-tokenizer-1-1a2b3",
            {"metadata": {"annotations": {"nanorun.io/deactivated": "true"}}, "spec": {"active": False}},
        )
    ]
    assert d.status["phase"] == "Suspended" and cond(d.status, "Queued")["reason"] == "Suspended"

    stopped = job("r1-tokenizer-1", "tokenizer", 1, "Suspended", suspend=True)
    mine = workload(active=False, reason="Deactivated", deactivated_by_operator=True)
    d = reconcile(
        RUN, body(status=d.status, **QUEUED), [stopped], None, storage(), T0, admission_of=kueue_sees(mine)
    )
    assert d.patch_workloads == [
        (
            "pytorchjob-r1-tokenizer-1-1a2b3",
            {"metadata": {"annotations": {"nanorun.io/deactivated": None}}, "spec": {"active": True}},
        )
    ]
    assert d.status["phase"] == "Queued" and [e.reason for e in d.events][:1] == ["StageResumed"]

    # A Workload that Kueue (or a person) deactivated is left as it is, and the status says why.
    theirs = workload(active=False, reason="RequeuingLimitExceeded", message="exceeded the backoff limit")
    d = reconcile(
        RUN, body(status=d.status, **QUEUED), [stopped], None, storage(), T0, admission_of=kueue_sees(theirs)
    )
    assert d.patch_workloads == []
    assert "is deactivated: RequeuingLimitExceeded" in cond(d.status, "Queued")["message"]


def test_without_a_queue_no_workload_is_read():
    def refuse(job):
        raise AssertionError("Workloads are only read for runs with compute.queue")

    running = job("r1-tokenizer-1", "tokenizer", 1, "Running")
    d = reconcile(RUN, body(), [running], None, storage(), T0, admission_of=refuse)
    assert d.status["phase"] == "Running" and not any(c["type"] == "Queued" for c in d.status["conditions"])
