"""Stall detection, pure: the rule on the ranks' heartbeats (pipeline/liveness.py) with its default
timeout, and what a reconcile does with a stalled stage (operator/reconcile/attempts.py, run.py)."""

from __future__ import annotations

from nanorun.operator.reconcile.decision import FailureFacts
from nanorun.operator.reconcile.run import reconcile
from nanorun.pipeline import liveness
from nanorun.pipeline.liveness import Heartbeat, find_stall
from nanorun.pipeline.progress import Done, Progress

from tests.operator.reconcile_world import RUN, T0, body, cond, job, pod, storage

NOW = T0.timestamp()


def beat(rank, beat_ago=1.0, progress_ago=1.0, phase=liveness.TRAINING, attempt=1, **kw) -> Heartbeat:
    return Heartbeat(
        stage="pretrain",
        rank=rank,
        world_size=2,
        attempt=attempt,
        pod=f"r1-pretrain-{attempt}-{'master' if rank == 0 else 'worker'}-0",
        step=kw.pop("step", 3),
        phase=phase,
        beat_at=NOW - beat_ago,
        progressed_at=NOW - progress_ago,
        **kw,
    )


def test_a_frozen_rank_is_stuck_once_its_beats_stop_for_the_timeout():
    # Rank 1 was SIGSTOPped 25 s ago; rank 0 still beats, waiting for it in a collective.
    beats = [beat(0, beat_ago=1, progress_ago=25), beat(1, beat_ago=25, progress_ago=25)]
    stall = find_stall(beats, NOW, explicit_timeout=20, beat_seconds=2)
    assert stall is not None and stall.timeout == 20 and stall.step == 3
    assert [b.rank for b in stall.stuck] == [0, 1]  # both stopped progressing; rank 1 stopped beating
    assert find_stall(beats, NOW - 10, explicit_timeout=20, beat_seconds=2) is None  # 15 s: not yet


def test_a_live_rank_without_progress_is_stuck_and_a_progressing_one_is_not():
    # Stuck on storage: the heartbeat thread beats, the main thread waits on a read.
    stall = find_stall([beat(0, progress_ago=2), beat(1, progress_ago=40)], NOW, 30, 2)
    assert stall is not None and [b.rank for b in stall.stuck] == [1]
    assert find_stall([beat(0, progress_ago=2), beat(1, progress_ago=29)], NOW, 30, 2) is None


def test_a_long_compile_or_evaluation_is_not_a_stall_but_a_frozen_rank_during_it_is():
    compiling = [beat(0, progress_ago=600, phase=liveness.COMPILING), beat(1, progress_ago=600)]
    assert find_stall(compiling, NOW, explicit_timeout=20, beat_seconds=2) is None
    # The pause's allowance is twice the longest such pause so far, at least the floor.
    evaluating = [
        beat(r, progress_ago=1900, phase=liveness.EVALUATING, longest_pause_seconds=1000) for r in (0, 1)
    ]
    assert find_stall(evaluating, NOW, 20, 2) is None
    assert find_stall([*evaluating[:1], beat(1, progress_ago=2100)], NOW, 20, 2).stuck[-1].rank == 1
    frozen = [beat(0, progress_ago=30, phase=liveness.COMPILING), beat(1, beat_ago=30, progress_ago=30)]
    assert [b.rank for b in find_stall(frozen, NOW, 20, 2).stuck] == [1]
    # A silent rank in a pausing phase holds nobody: its beats stopped with it.
    assert find_stall([beat(0, beat_ago=30, progress_ago=30, phase=liveness.COMPILING)], NOW, 20, 2)


def test_the_default_timeout_grows_with_the_stages_steps_and_pauses_above_a_floor():
    assert liveness.stall_timeout(None, [beat(0, step_seconds=2.0)]) == liveness.STALL_FLOOR_SECONDS
    assert liveness.stall_timeout(None, [beat(0, step_seconds=90.0)]) == 900.0
    assert liveness.stall_timeout(None, [beat(0, longest_pause_seconds=700), beat(1, step_seconds=1)]) == 1400
    assert liveness.stall_timeout(45, [beat(0, step_seconds=90.0)]) == 45  # explicit wins
    slow = [beat(0, progress_ago=700, step_seconds=90.0)]  # 10 steps of 90 s: 700 s is not a stall
    assert find_stall(slow, NOW) is None and find_stall(slow, NOW + 201) is not None
    # The collective timeout outlasts any stall the operator would catch first.
    assert liveness.collective_timeout(None) == 1800 and liveness.collective_timeout(3600) == 7200


def test_no_heartbeat_or_only_finished_ranks_is_no_stall():
    assert find_stall([], NOW, 20) is None
    assert find_stall([beat(0, beat_ago=900, progress_ago=900, phase=liveness.FINISHED)], NOW, 20) is None


def running(attempt=1, status=None, retry=None, **files):
    spec = {"retry": {"maxAttempts": 2, "backoffSeconds": 10, "stallTimeoutSeconds": 20, **(retry or {})}}
    jobs = [job("r1-tokenizer-1", "tokenizer", 1, "Succeeded")] + [
        job(f"r1-pretrain-{a}", "pretrain", a, "Running") for a in range(1, attempt + 1)
    ]
    stage = {"tokenizer": (None, Done(stage="tokenizer", seconds=1)), **files}
    return body(status=status, **spec), jobs, storage(stage)


def heartbeats(by_attempt):
    return lambda stage, attempt: by_attempt.get((stage, attempt), [])


def test_a_stalled_stage_ends_its_job_names_its_ranks_and_resumes_in_the_next_attempt():
    b, jobs, files = running()
    first = reconcile(RUN, b, jobs[:1], None, files, T0)
    frozen = {("pretrain", 1): [beat(0, beat_ago=1, progress_ago=25), beat(1, beat_ago=25, progress_ago=25)]}
    b, jobs, files = running(
        status=first.status, pretrain=(Progress(stage="pretrain", step=3, attempt=1), None)
    )
    d = reconcile(RUN, b, jobs, None, files, T0, read_heartbeats=heartbeats(frozen))
    assert d.delete_jobs == ["r1-pretrain-1"]
    assert [(m["metadata"]["name"], e.reason) for m, e in d.create_jobs] == [
        ("r1-pretrain-2", "StageRetried")
    ]
    pre = d.status["stages"][1]
    assert (pre["attempts"], pre["stalls"], pre["failures"], pre["preemptions"]) == (2, 1, 0, 0)
    assert (pre["stalledAttempt"], pre["stalledStep"]) == (1, 3)
    assert d.ended_attempts == [("pretrain", "stalled")]
    stalled = cond(d.status, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "StageStalled")
    # Which ranks reported last and when: the stuck ones first, with their pods.
    assert "stage pretrain stalled at step 3 (attempt 1, no progress within 20 s)" in stalled["message"]
    assert (
        "rank 0 (stuck): last heartbeat 2026-01-01T11:59:59Z (1 s ago), last progress" in stalled["message"]
    )
    assert "rank 1 (stuck): last heartbeat 2026-01-01T11:59:35Z (25 s ago)" in stalled["message"]
    assert "pod r1-pretrain-1-worker-0" in stalled["message"]
    event = next(e for e in d.events if e.reason == "StageStalled")
    assert event.type == "Warning" and "rank 1 (stuck)" in event.message

    # Deciding again before the index shows attempt 2: the old job is not judged again, nothing counts twice.
    again = reconcile(
        RUN,
        body(status=d.status, **{"retry": b["spec"]["retry"]}),
        jobs,
        None,
        files,
        T0,
        read_heartbeats=heartbeats(frozen),
    )
    assert again.status["stages"][1]["stalls"] == 1 and again.delete_jobs == [] and again.ended_attempts == []

    # Attempt 2 gets past the step it stalled at: Stalled turns False and still says what happened.
    b, jobs, files = running(
        2, status=d.status, pretrain=(Progress(stage="pretrain", step=4, attempt=2), None)
    )
    fine = {("pretrain", 2): [beat(0, attempt=2, step=4), beat(1, attempt=2, step=4)]}
    d2 = reconcile(RUN, b, jobs, None, files, T0, read_heartbeats=heartbeats(fine))
    assert d2.delete_jobs == [] and d2.status["phase"] == "Running"
    resumed = cond(d2.status, "Stalled")
    assert (resumed["status"], resumed["reason"]) == ("False", "Resumed") and "rank 1 (stuck)" in resumed[
        "message"
    ]


def test_a_stage_that_stalls_twice_at_the_same_step_fails_saying_so():
    b, jobs, files = running(pretrain=(Progress(stage="pretrain", step=3, attempt=1), None))
    stuck = [beat(0, progress_ago=30), beat(1, progress_ago=30)]
    d = reconcile(RUN, b, jobs, None, files, T0, read_heartbeats=heartbeats({("pretrain", 1): stuck}))
    b, jobs, files = running(
        2, status=d.status, pretrain=(Progress(stage="pretrain", step=3, attempt=2), None)
    )
    again = [beat(0, attempt=2, progress_ago=30), beat(1, attempt=2, progress_ago=30)]
    d = reconcile(RUN, b, jobs, None, files, T0, read_heartbeats=heartbeats({("pretrain", 2): again}))
    pre = d.status["stages"][1]
    assert d.status["phase"] == "Failed" and pre["phase"] == "Failed" and d.create_jobs == []
    assert d.delete_jobs == ["r1-pretrain-2"] and (pre["stalls"], pre["failures"]) == (2, 0)
    assert pre["message"].startswith("stalled twice at step 3, so resuming does not help")
    assert cond(d.status, "Stalled")["reason"] == "StalledTwice"
    assert {"StageStalled", "StageFailed", "RunFailed"} <= {e.reason for e in d.events}
    # It stays failed: the job still being deleted is not followed again.
    later = reconcile(RUN, body(status=d.status, **{"retry": b["spec"]["retry"]}), jobs, None, files, T0)
    assert later.status["phase"] == "Failed" and later.create_jobs == [] and later.events == []


def test_a_stall_at_another_step_resumes_again():
    b, jobs, files = running()
    d = reconcile(
        RUN,
        b,
        jobs,
        None,
        files,
        T0,
        read_heartbeats=heartbeats({("pretrain", 1): [beat(0, progress_ago=30, step=3)]}),
    )
    b, jobs, files = running(2, status=d.status)
    d = reconcile(
        RUN,
        b,
        jobs,
        None,
        files,
        T0,
        read_heartbeats=heartbeats({("pretrain", 2): [beat(0, attempt=2, progress_ago=30, step=7)]}),
    )
    pre = d.status["stages"][1]
    assert (pre["phase"], pre["attempts"], pre["stalls"], pre["stalledStep"]) == ("Running", 3, 2, 7)


def test_a_stage_silent_because_its_node_was_lost_is_a_preemption():
    b, jobs, files = running()
    lost = {("pretrain", 1): [beat(0, progress_ago=30), beat(1, beat_ago=30, progress_ago=30)]}
    evicted = FailureFacts(
        active=("r1-pretrain-1-master-0",),
        disruption="pod r1-pretrain-1-worker-0: DisruptionTarget (DeletionByTaintManager)",
    )
    d = reconcile(RUN, b, jobs, None, files, T0, lambda j: evicted, read_heartbeats=heartbeats(lost))
    pre = d.status["stages"][1]
    assert (pre["attempts"], pre["preemptions"], pre["failures"], pre["stalls"]) == (2, 1, 0, 0)
    assert d.delete_jobs == ["r1-pretrain-1"] and d.ended_attempts == [("pretrain", "preempted")]
    assert "Stalled" not in {c["type"] for c in d.status["conditions"]}


def test_a_silent_ranks_pods_are_looked_at_before_the_stall_timeout():
    # Rank 1's beats stopped 8 s ago (4 heartbeats), far from the 120 s stall timeout.
    b, jobs, files = running(retry={"stallTimeoutSeconds": 120, "heartbeatSeconds": 2})
    silent = {("pretrain", 1): [beat(0, progress_ago=8), beat(1, beat_ago=8, progress_ago=8)]}
    looked = []

    def pods(evicted: bool):
        def inspect(j):
            looked.append(j["metadata"]["name"])
            reason = "pod r1-pretrain-1-worker-0: DisruptionTarget (DeletionByTaintManager)"
            return FailureFacts(active=("r1-pretrain-1-master-0",), disruption=reason if evicted else "")

        return inspect

    d = reconcile(RUN, b, jobs, None, files, T0, pods(False), read_heartbeats=heartbeats(silent))
    assert looked == ["r1-pretrain-1"] and d.delete_jobs == [] and d.create_jobs == []
    d = reconcile(RUN, b, jobs, None, files, T0, pods(True), read_heartbeats=heartbeats(silent))
    assert d.delete_jobs == ["r1-pretrain-1"] and d.status["stages"][1]["preemptions"] == 1
    # Ranks that beat are not looked at: no pod is listed on every reconcile of a healthy run.
    looked.clear()
    beating = {("pretrain", 1): [beat(0, progress_ago=8), beat(1, progress_ago=8)]}
    reconcile(RUN, b, jobs, None, files, T0, pods(True), read_heartbeats=heartbeats(beating))
    assert looked == []


def test_heartbeats_are_read_only_once_progress_json_has_not_moved_for_a_few_beats():
    read = []

    def heartbeats_read(stage, attempt):
        read.append(attempt)
        return []

    for age, attempt, expected in ((5, 1, []), (7, 1, [1]), (5, 0, [1]), (-60, 1, [1])):
        read.clear()
        fresh = Progress(stage="pretrain", step=3, attempt=attempt, updated_at=NOW - age)
        b, jobs, files = running(retry={"heartbeatSeconds": 2}, pretrain=(fresh, None))
        reconcile(RUN, b, jobs, None, files, T0, read_heartbeats=heartbeats_read)
        assert read == expected, (age, attempt)


def test_a_pod_evicted_from_a_lost_node_is_not_waited_for():
    from nanorun.operator.reconcile.failures import failure_facts

    gone = pod("j-worker-0", disruption="DeletionByTaintManager")
    gone.metadata.deletion_timestamp = T0
    facts = failure_facts([gone, pod("j-master-0", 143)], lambda pod: "")
    assert (
        facts.active == () and facts.disruption == "pod j-worker-0: DisruptionTarget (DeletionByTaintManager)"
    )
    # A pod still stopping on a live node is waited for, whatever disrupted it.
    stopping = pod("j-worker-0", disruption="EvictionByEvictionAPI")
    stopping.metadata.deletion_timestamp = T0
    assert failure_facts([stopping], lambda pod: "").active == ("j-worker-0",)
