"""The attempts at each planned stage of an LLMRun: which stage runs now, its job per attempt, and
what each attempt's end means, written into the stage's record (status.stages) and the Decision.

    records = stage_records(run, spec, old_status, children, now, decision)

Per planned stage, in order: a Succeeded stage is skipped; the first unfinished stage gets its job
(attempt 1) and is followed while it runs. When its job fails, the failure is classified once:
a preemption (the pods were disrupted, or the trainer saved a checkpoint on SIGTERM and said so in
progress.json) starts the next attempt at once and is not counted; any other failure counts, and
is retried (attempt+1 after a doubling backoff) until retry.maxAttempts failures fail the stage,
with the failing container's last log lines in the message. A finished stage whose config id
(plan.config_ids: its flags and everything upstream) is no longer the spec's runs again, as a new
attempt. A running attempt whose ranks stop progressing (their heartbeats, pipeline/liveness.py) is
Stalled: its job is deleted and the next attempt starts at once, counted apart from failures; a
second stall at the same step fails the stage. The record keeps how each attempt ended, so the
outcome holds once the job is gone; a finished job of a kind whose controller keeps it (TrainJob)
is deleted after compute.ttlSecondsAfterFinished, once the record says how it ended. With a Kueue queue the job waits
for admission (Queued) and spec.suspend deactivates its Workload instead of suspending the job.
Pure like run.py: it reads only the old status, the `Children` and the clock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nanorun.operator.api import LLMRunSpec, LLMRunStatus, StageStatus
from nanorun.operator.children import kueue
from nanorun.operator.children.launchers import Launcher, launcher_of
from nanorun.operator.names import LABEL_ATTEMPT, LABEL_CONFIG, LABEL_STAGE
from nanorun.operator.reconcile import plan as plan_mod
from nanorun.operator.reconcile.decision import Decision, Event, FailureFacts
from nanorun.operator.reconcile.stalls import describe
from nanorun.operator.reconcile.status import metrics_from, outputs_from, parse_time, rfc3339
from nanorun.operator.run_ref import RunRef
from nanorun.pipeline import liveness
from nanorun.pipeline.progress import Done, Progress, is_current
from nanorun.pipeline.stages import BY_KEY

# (progress, done) of a stage (its key); may raise on storage errors (the caller retries later).
ReadStage = Callable[[str], tuple[Progress | None, Done | None]]

# Reads the pods of a failed stage job; called once per failed attempt. May raise (retried later).
InspectFailure = Callable[[dict[str, Any]], FailureFacts]
ACTIVE_POLL_SECONDS = 2.0  # how often a failed job's stopping pods are looked at again
MAX_LOG_TAIL = 1500  # characters of log kept in the stage message (a condition message should stay readable)

# Kueue's view of a stage job of a run with compute.queue (children/kueue.py). May raise (retried later).
AdmissionOf = Callable[[dict[str, Any]], kueue.Admission]

# The heartbeats of one attempt at a stage (key, attempt); [] when storage cannot say (no stall then).
ReadHeartbeats = Callable[[str, int], list[liveness.Heartbeat]]


def no_heartbeats(stage: str, attempt: int) -> list[liveness.Heartbeat]:
    return []


@dataclass(frozen=True)
class Children:
    """What the reconcile reads besides the LLMRun: its stage jobs (of any kind), callbacks that
    read the stage files, a failed job's pods, and Kueue's Workload of a job; and the launcher of
    the jobs it creates."""

    jobs: list[dict[str, Any]]
    read_stage: ReadStage
    inspect_failure: InspectFailure
    admission_of: AdmissionOf
    launcher: Launcher
    read_heartbeats: ReadHeartbeats = no_heartbeats


def _attempt(job: dict[str, Any]) -> int:
    try:
        return int(job["metadata"]["labels"][LABEL_ATTEMPT])
    except (KeyError, ValueError, TypeError):
        return 0


def _job_config(job: dict[str, Any]) -> str:
    return (job["metadata"].get("labels") or {}).get(LABEL_CONFIG, "")


def _job_stage(job: dict[str, Any]) -> str:
    """The key of the stage a job runs ("" for a label that names no stage)."""
    label = (job["metadata"].get("labels") or {}).get(LABEL_STAGE, "")
    return label if label in BY_KEY else ""


def stage_records(
    run: RunRef, spec: LLMRunSpec, old: LLMRunStatus, children: Children, now: dt.datetime, d: Decision
) -> list[StageStatus]:
    old_records = {r.name: r for r in old.stages}
    plan = plan_mod.stage_plan(spec)
    config_ids = plan_mod.config_ids(plan)
    records: list[StageStatus] = []
    blocked = False  # an earlier stage has not succeeded: later ones wait
    for ps in plan:
        config_id = config_ids[ps.key]
        rec = old_records.get(ps.key, StageStatus(name=ps.key)).model_copy(deep=True)
        stage_jobs = sorted((j for j in children.jobs if _job_stage(j) == ps.key), key=_attempt)
        _expire(spec, old_records.get(ps.key), stage_jobs, now, d)
        if rec.config_id and rec.config_id != config_id and rec.phase in ("Succeeded", "Failed"):
            rec = _rerun(ps, rec, config_id, stage_jobs, d)
        if rec.phase == "Succeeded" or blocked:
            if blocked and rec.phase != "Succeeded":
                rec.phase = "Pending"
            records.append(rec)
            continue
        blocked = True
        if rec.failed_by_stalling:
            records.append(rec)  # failed by stalling twice at one step: its job is deleted, nothing follows
            continue
        rec.config_id = rec.config_id or config_id
        # Jobs of an earlier configuration are history.
        stage_jobs = [j for j in stage_jobs if _job_config(j) == rec.config_id]
        latest = stage_jobs[-1] if stage_jobs else None
        rec.attempts = max(rec.attempts, _attempt(latest) if latest else 0)
        progress, done = children.read_stage(ps.key)
        if done is not None and not is_current(done, rec.config_id):
            progress, done = None, None  # files of an earlier configuration: this one has not written yet
        rec.metrics = metrics_from(progress, done)
        if latest is not None and _attempt(latest) == rec.attempts:
            _follow_job(run, spec, ps, rec, latest, progress, done, children, now, d)
        elif rec.attempts and done is not None:
            # The job is gone (TTL) but the stage wrote done.json: storage says it finished.
            _succeed(ps, rec, done, now, d)
        elif rec.attempts and rec.failed_attempt == rec.attempts:
            # The failed job is gone (TTL) before its retry was due: the record remembers the failure.
            _after_failure(run, spec, ps, rec, children.launcher, now, d)
        elif spec.suspend:
            rec.phase = "Suspended" if rec.attempts else "Pending"
        else:
            # No job yet for this attempt (or it vanished): create it; a 409 means it is there.
            rec.attempts = max(rec.attempts, 1)
            _start_attempt(run, spec, ps, rec, children.launcher, now, d)
        if rec.phase == "Succeeded":
            blocked = False
        records.append(rec)
    return records


def _rerun(
    ps: plan_mod.PlannedStage, rec: StageStatus, config_id: str, stage_jobs: list[dict[str, Any]], d: Decision
) -> StageStatus:
    """A finished stage whose flags (or an upstream stage's) changed: a fresh record whose next
    attempt is a new job. If that job exists already (a reconcile that created it but could not
    write the status), it is adopted rather than made twice."""
    mine = [j for j in stage_jobs if _job_config(j) == config_id]
    attempt = _attempt(mine[-1]) if mine else max([rec.attempts, *map(_attempt, stage_jobs)]) + 1
    d.events.append(
        Event(
            "Normal",
            "StageRerun",
            f"stage {ps.key}: its configuration changed ({rec.config_id} → {config_id}); running it again",
        )
    )
    return StageStatus(name=ps.key, phase="Pending", attempts=attempt, config_id=config_id)


def _start_attempt(
    run: RunRef,
    spec: LLMRunSpec,
    ps: plan_mod.PlannedStage,
    rec: StageStatus,
    launcher: Launcher,
    now: dt.datetime,
    d: Decision,
) -> None:
    rec.job = launcher.job_name(run.name, ps.key, rec.attempts)
    rec.phase = "Running"
    rec.start_time = rec.start_time or rfc3339(now)
    if rec.attempts == 1:
        event = Event("Normal", "StageStarted", f"stage {ps.key}: created {launcher.kind} {rec.job}")
    else:
        event = Event(
            "Normal", "StageRetried", f"stage {ps.key}: attempt {rec.attempts}, {launcher.kind} {rec.job}"
        )
    d.create_jobs.append((launcher.build(run, spec, ps, rec.attempts, rec.config_id), event))


def _expire(
    spec: LLMRunSpec, old: StageStatus | None, stage_jobs: list[dict[str, Any]], now: dt.datetime, d: Decision
) -> None:
    """Delete a stage's finished jobs older than compute.ttlSecondsAfterFinished, for a kind whose
    controller keeps them (TrainJob); only once the status written before records how the job
    ended (an earlier attempt, the stage's success, or this attempt's counted end), so the outcome
    outlives the job."""
    ttl = dt.timedelta(seconds=spec.compute.ttl_seconds_after_finished)
    for job in stage_jobs:
        launcher = launcher_of(job)
        state = launcher.state(job)
        if not launcher.operator_ttl or state.phase not in ("Succeeded", "Failed") or state.since is None:
            continue
        attempt = _attempt(job)
        recorded = old is not None and (
            attempt < old.attempts
            or (old.phase == "Succeeded" and attempt == old.attempts)
            or old.failed_attempt == attempt
        )
        if not recorded:
            continue
        if now >= state.since + ttl:
            d.delete_jobs.append(job["metadata"]["name"])
        else:
            due = (state.since + ttl - now).total_seconds()
            d.requeue_after = min(d.requeue_after or due, due)


def _succeed(
    ps: plan_mod.PlannedStage, rec: StageStatus, done: Done | None, when: dt.datetime, d: Decision
) -> None:
    rec.phase = "Succeeded"
    rec.message = ""
    rec.completion_time = rfc3339(when)
    start = parse_time(rec.start_time)
    rec.duration_seconds = round((when - start).total_seconds(), 3) if start else None
    rec.outputs = outputs_from(done)
    d.finished_stages.append((ps.key, rec.duration_seconds or 0.0))
    d.events.append(
        Event("Normal", "StageSucceeded", f"stage {ps.key} succeeded after {rec.attempts} attempt(s)")
    )


def _follow_job(
    run: RunRef,
    spec: LLMRunSpec,
    ps: plan_mod.PlannedStage,
    rec: StageStatus,
    job: dict[str, Any],
    progress: Progress | None,
    done: Done | None,
    children: Children,
    now: dt.datetime,
    d: Decision,
) -> None:
    launcher = launcher_of(job)
    state = launcher.state(job)
    rec.job = job["metadata"]["name"]
    rec.start_time = rec.start_time or job["metadata"].get("creationTimestamp") or rfc3339(now)
    if state.phase == "Succeeded":
        _succeed(ps, rec, done, state.since or now, d)
        return
    if state.phase == "Failed":
        if rec.failed_attempt != rec.attempts:  # seen for the first time: classify and count it once
            facts = children.inspect_failure(job)
            if facts.active:
                # Decide (and start the next attempt) only once every pod has stopped: the next
                # attempt must resume from the checkpoint these pods may still be writing.
                rec.phase = "Running"
                rec.message = f"attempt {rec.attempts} failed; waiting for {', '.join(facts.active)} to stop"
                d.requeue_after = ACTIVE_POLL_SECONDS
                return
            why = f"{state.reason}: {state.message}".strip(": ") or "job failed"
            _record_failure(spec, ps, rec, progress, facts, state.since or now, why, d)
        _after_failure(run, spec, ps, rec, children.launcher, now, d)
        return
    suspended = launcher.suspended(job)
    if spec.compute.queue:
        _follow_queued_job(spec, ps, rec, launcher.kind, suspended, children.admission_of(job), d)
        if rec.phase == "Running" and not suspended:
            _check_stall(run, spec, ps, rec, job, progress, children, now, d)
        return
    # Pending, Running or Suspended: bring the job's suspend flag to what the spec asks.
    if spec.suspend and not suspended:
        d.patch_jobs.append((rec.job, launcher.suspend_patch(True)))
        d.events.append(
            Event("Normal", "StageSuspended", f"stage {ps.key}: suspended {launcher.kind} {rec.job}")
        )
        suspended = True
    elif not spec.suspend and suspended:
        d.patch_jobs.append((rec.job, launcher.suspend_patch(False)))
        d.events.append(Event("Normal", "StageResumed", f"stage {ps.key}: resumed {launcher.kind} {rec.job}"))
        suspended = False
    rec.phase = "Suspended" if suspended and spec.suspend else "Running"
    if not suspended:
        _check_stall(run, spec, ps, rec, job, progress, children, now, d)


def _check_stall(
    run: RunRef,
    spec: LLMRunSpec,
    ps: plan_mod.PlannedStage,
    rec: StageStatus,
    job: dict[str, Any],
    progress: Progress | None,
    children: Children,
    now: dt.datetime,
    d: Decision,
) -> None:
    """A running attempt whose ranks stopped progressing (liveness.find_stall on its heartbeats) is
    ended: its job is deleted and the next attempt resumes from the last checkpoint at once. Pods the
    cluster disrupted (a lost node's, evicted) make it a preemption, looked for as soon as a rank's
    beats stop, so a lost node ends its attempt once its pods are evicted, whatever the stall timeout;
    otherwise it is a stall, counted apart from failures, and a second stall at the same step fails
    the stage: resuming cannot help. While rank 0 wrote this attempt's progress.json within the last
    few heartbeats, every rank progresses (they step together), and no heartbeat is read."""
    if progress is not None and progress.attempt == rec.attempts:
        age = now.timestamp() - progress.updated_at
        if 0 <= age < liveness.BEATS_MISSED * spec.retry.heartbeat_seconds:
            return
    beats = children.read_heartbeats(ps.key, rec.attempts)
    stall = liveness.find_stall(
        beats, now.timestamp(), spec.retry.stall_timeout_seconds, spec.retry.heartbeat_seconds
    )
    if stall is None and not liveness.silent(beats, now.timestamp(), spec.retry.heartbeat_seconds):
        return
    facts = children.inspect_failure(job)
    if facts.disruption:
        rec.failure_time = rfc3339(now)
        rec.preemptions += 1
        rec.preempted_attempt = rec.attempts
        rec.message = f"attempt {rec.attempts} preempted ({facts.disruption}); not counted as a failure"
        d.delete_jobs.append(rec.job)
        d.events.append(Event("Normal", "StagePreempted", f"stage {ps.key}: {rec.message}"))
        d.ended_attempts.append((ps.key, "preempted"))
    elif stall is None:
        return  # a rank is silent, but not for the stall timeout yet and no pod was disrupted
    else:
        said = describe(stall, ps.key, rec.attempts, now.timestamp(), spec.storage.uri)
        again = rec.stalls > 0 and rec.stalled_step == stall.step
        rec.failure_time = rfc3339(now)
        rec.stalls += 1
        rec.stalled_attempt, rec.stalled_step, rec.last_stall = rec.attempts, stall.step, said
        d.delete_jobs.append(rec.job)
        d.events.append(Event("Warning", "StageStalled", said))
        d.ended_attempts.append((ps.key, "stalled"))
        if again:
            rec.message = f"stalled twice at step {stall.step}, so resuming does not help; {said}"
            rec.phase = "Failed"
            rec.completion_time = rfc3339(now)
            d.events.append(Event("Warning", "StageFailed", f"stage {ps.key}: {rec.message}"))
            return
        rec.message = f"attempt {rec.attempts} stalled; resuming from the last checkpoint"
    rec.attempts += 1
    _start_attempt(run, spec, ps, rec, children.launcher, now, d)


def _follow_queued_job(
    spec: LLMRunSpec,
    ps: plan_mod.PlannedStage,
    rec: StageStatus,
    kind: str,
    suspended: bool,
    adm: kueue.Admission,
    d: Decision,
) -> None:
    """A job that Kueue admits (children/kueue.py): Queued until its Workload is admitted; `spec.suspend`
    deactivates the Workload (Kueue then suspends the job) and clearing it reactivates the Workload."""
    queue = spec.compute.queue
    if spec.suspend:
        if adm.workload and adm.active:
            d.patch_workloads.append((adm.workload, kueue.deactivate_patch()))
            d.events.append(
                Event(
                    "Normal",
                    "StageSuspended",
                    f"stage {ps.key}: deactivated Kueue Workload {adm.workload} of {kind} {rec.job}",
                )
            )
        elif not adm.workload:
            d.requeue_after = ACTIVE_POLL_SECONDS  # Kueue makes the Workload in a moment: deactivate it then
        rec.phase = "Suspended"
        d.queued = (
            False,
            "Suspended",
            f"stage {ps.key}: spec.suspend is true; its Kueue Workload is deactivated",
        )
        return
    if not adm.active and adm.deactivated_by_operator:
        d.patch_workloads.append((adm.workload, kueue.reactivate_patch()))
        d.events.append(
            Event("Normal", "StageResumed", f"stage {ps.key}: reactivated Kueue Workload {adm.workload}")
        )
        adm = kueue.Admission(
            workload=adm.workload, reason="Pending", message="reactivated; waiting for Kueue"
        )
    if adm.admitted or not suspended:
        rec.phase = "Running"
        where = f"ClusterQueue {adm.cluster_queue}" if adm.cluster_queue else f"LocalQueue {queue}"
        d.queued = (False, "Admitted", f"stage {ps.key}: admitted by Kueue to {where}")
        return
    rec.phase = "Queued"
    if not adm.workload:
        d.requeue_after = ACTIVE_POLL_SECONDS  # no watch sees the Workload appear: look again soon
    d.queued = (
        True,
        adm.reason or "Waiting",
        f"stage {ps.key}: {kueue.waiting_message(queue, rec.job, adm, kind)}",
    )


def _record_failure(
    spec: LLMRunSpec,
    ps: plan_mod.PlannedStage,
    rec: StageStatus,
    progress: Progress | None,
    facts: FailureFacts,
    failed_at: dt.datetime,
    why: str,
    d: Decision,
) -> None:
    """Attempt `rec.attempts` failed: a preemption (the pods say so, or the trainer checkpointed on
    SIGTERM in this attempt) or a failure that counts."""
    rec.failed_attempt, rec.failure_time = rec.attempts, rfc3339(failed_at)
    trainer_stopped = (
        progress is not None and progress.attempt == rec.attempts and progress.stopped == "preempted"
    )
    disruption = facts.disruption or (
        "the trainer checkpointed on SIGTERM and exited" if trainer_stopped else ""
    )
    if disruption:
        rec.preemptions += 1
        rec.preempted_attempt = rec.attempts
        rec.message = f"attempt {rec.attempts} preempted ({disruption}); not counted as a failure"
        d.events.append(Event("Normal", "StagePreempted", f"stage {ps.key}: {rec.message}"))
        d.ended_attempts.append((ps.key, "preempted"))
        return
    rec.failures += 1
    d.ended_attempts.append((ps.key, "failed"))
    rec.message = f"failure {rec.failures}/{spec.retry.max_attempts} (attempt {rec.attempts}): {why}"
    tail = facts.log_tail.strip()
    if tail:
        rec.message += "; last log lines:\n" + tail[-MAX_LOG_TAIL:]


def _after_failure(
    run: RunRef,
    spec: LLMRunSpec,
    ps: plan_mod.PlannedStage,
    rec: StageStatus,
    launcher: Launcher,
    now: dt.datetime,
    d: Decision,
) -> None:
    """After the recorded end of attempt `rec.attempts`: start the next one (at once after a
    preemption, after the backoff after a failure), or fail the stage after the last failure.
    The record keeps the outcome, so it holds even once the failed job is gone (TTL)."""
    failed_at = parse_time(rec.failure_time) or now
    preempted = rec.preempted_attempt == rec.attempts
    if not preempted and rec.failures >= spec.retry.max_attempts:
        if rec.phase != "Failed":
            d.events.append(Event("Warning", "StageFailed", f"stage {ps.key}: {rec.message}"))
        rec.phase = "Failed"
        rec.completion_time = rec.completion_time or rfc3339(failed_at)
        return
    wait = 0 if preempted else spec.retry.backoff_seconds * 2 ** (rec.failures - 1)
    due = failed_at + dt.timedelta(seconds=wait)
    if spec.suspend:
        rec.phase = "Suspended"
    elif now >= due:
        rec.attempts += 1
        _start_attempt(run, spec, ps, rec, launcher, now, d)
    else:
        rec.phase = "Running"
        d.requeue_after = (due - now).total_seconds()
