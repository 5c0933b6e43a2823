"""One reconcile of one LLMRun, as a pure decision: what to create, patch and report.

    decision = reconcile(run, body, jobs, rayservice, read_stage, now)

Level-triggered: the decision depends only on the LLMRun (spec and the status written before) and
its children (stage jobs, RayService) as they are now, plus the stage files in storage, so
running it twice, or after an operator restart, decides the same thing. Children have
deterministic names, so creating one that is already there is a 409 and changes nothing.

Per planned stage, in order: a Succeeded stage is skipped; the first unfinished stage gets its job
(attempt 1) and is followed while it runs. When its job fails, the failure is classified once:
a preemption (the pods were disrupted, or the trainer saved a checkpoint on SIGTERM and said so in
progress.json) starts the next attempt at once and is not counted; any other failure counts, and
is retried (attempt+1 after a doubling backoff) until retry.maxAttempts failures fail the run,
with the failing container's last log lines in the message. A finished stage whose config id
(plan.config_ids: its flags and everything upstream) is no longer the spec's runs again, as a new
attempt. When every stage has succeeded, the RayService is created or patched to serve the final
checkpoint.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nanorun.operator import kueue, launchers
from nanorun.operator import plan as plan_mod
from nanorun.operator.api import GROUP, VERSION, LLMRunSpec, LLMRunStatus, SpecError, StageStatus, parse_spec
from nanorun.operator.jobs import RunRef
from nanorun.operator.launchers import Launcher, launcher_of
from nanorun.operator.names import LABEL_ATTEMPT, LABEL_CONFIG, LABEL_STAGE
from nanorun.operator.rayservice import rayservice_for_run, rayservice_name, served_checkpoints, service_url
from nanorun.operator.status import (
    metrics_from,
    outputs_from,
    parse_time,
    rayservice_ready,
    rfc3339,
    set_condition,
)
from nanorun.pipeline import layout
from nanorun.pipeline.progress import Done, Progress
from nanorun.pipeline.stages import stage_named

# (progress, done) of a stage (its key); may raise on storage errors (the caller retries later).
ReadStage = Callable[[str], tuple[Progress | None, Done | None]]


@dataclass(frozen=True)
class FailureFacts:
    """What a failed job's pods tell: whether some are still stopping (`active`: the job is marked
    failed as soon as a pod is deleted, while the trainer is still writing its SIGTERM checkpoint),
    whether they were disrupted (then `disruption` says how, e.g. "pod x-master-0: DisruptionTarget
    (PreemptionByScheduler)") and the failing container's last log lines."""

    active: tuple[str, ...] = ()
    disruption: str = ""
    log_tail: str = ""


# Reads the pods of a failed stage job; called once per failed attempt. May raise (retried later).
InspectFailure = Callable[[dict[str, Any]], FailureFacts]
ACTIVE_POLL_SECONDS = 2.0  # how often a failed job's stopping pods are looked at again
MAX_LOG_TAIL = 1500  # characters of log kept in the stage message (a condition message should stay readable)


def _no_pods(job: dict[str, Any]) -> FailureFacts:
    return FailureFacts()


# Kueue's view of a stage job of a run with compute.queue (kueue.py). May raise (retried later).
AdmissionOf = Callable[[dict[str, Any]], kueue.Admission]


def _no_workload(job: dict[str, Any]) -> kueue.Admission:
    return kueue.Admission()


@dataclass
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str

    def to_object(self, kind: str, ref: RunRef, now: str) -> dict[str, Any]:
        """The core/v1 Event about `ref` (a RunRef of an object of `kind` in nanorun's group),
        created with a generated name at `now` (RFC 3339)."""
        return {
            "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": kind,
                "name": ref.name,
                "namespace": ref.namespace,
                "uid": ref.uid,
            },
            "reason": self.reason,
            "message": self.message[:1024],
            "type": self.type,
            "source": {"component": "nanorun-operator"},
            "reportingComponent": "nanorun-operator",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }


@dataclass
class Decision:
    status: dict[str, Any]
    create_jobs: list[tuple[dict[str, Any], Event]] = field(
        default_factory=list
    )  # (manifest, event if created)
    patch_jobs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (name, merge patch)
    delete_jobs: list[str] = field(default_factory=list)  # finished jobs past their TTL (a kind without one)
    patch_workloads: list[tuple[str, dict[str, Any]]] = field(
        default_factory=list
    )  # Kueue Workloads (name, merge patch)
    queued: tuple[bool, str, str] | None = (
        None  # the Queued condition (waiting, reason, message), with compute.queue
    )
    create_rayservice: dict[str, Any] | None = None
    patch_rayservice: dict[str, Any] | None = None  # merge patch of the existing one
    delete_rayservice: str | None = None
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None  # seconds until something is due (a retry after backoff)
    finished_stages: list[tuple[str, float]] = field(default_factory=list)  # (stage, seconds), newly
    ended_attempts: list[tuple[str, str]] = field(default_factory=list)  # (stage, preempted | failed), newly


def _attempt(job: dict[str, Any]) -> int:
    try:
        return int(job["metadata"]["labels"][LABEL_ATTEMPT])
    except (KeyError, ValueError, TypeError):
        return 0


def _invalid(old: dict[str, Any], message: str, generation: int, now: dt.datetime) -> Decision:
    """A spec the operator cannot act on: say so in Degraded, touch nothing else, do not retry."""
    status = dict(old)
    conditions = list(status.get("conditions") or [])
    conditions = set_condition(conditions, "Degraded", True, "InvalidSpec", message, now)
    conditions = set_condition(
        conditions, "Progressing", False, "InvalidSpec", "fix the spec to continue", now
    )
    conditions = set_condition(conditions, "Ready", False, "InvalidSpec", message, now)
    status.update(
        conditions=conditions, observedGeneration=generation, phase=status.get("phase") or "Pending"
    )
    events = (
        []
        if any(
            c.get("reason") == "InvalidSpec" and c.get("message") == message
            for c in old.get("conditions") or []
        )
        else [Event("Warning", "InvalidSpec", message)]
    )
    return Decision(status=status, events=events)


def _old_status(old: dict[str, Any]) -> LLMRunStatus:
    known = {
        k: v
        for k, v in old.items()
        if k in LLMRunStatus.model_fields or k in {f.alias for f in LLMRunStatus.model_fields.values()}
    }
    try:
        return LLMRunStatus.model_validate(known)
    except ValueError:
        return LLMRunStatus()


def reconcile(
    run: RunRef,
    body: dict[str, Any],
    jobs: list[dict[str, Any]],
    rayservice: dict[str, Any] | None,
    read_stage: ReadStage,
    now: dt.datetime,
    inspect_failure: InspectFailure = _no_pods,
    admission_of: AdmissionOf = _no_workload,
    trainjob_served: bool = False,
) -> Decision:
    """Decide what one reconcile of `body` (the LLMRun) does, given its children (`jobs`: the
    run's stage jobs of every kind). `trainjob_served`: whether the cluster serves Trainer v2's
    TrainJob CRD, which `compute.launcher: auto` takes when the run has not chosen yet."""
    meta = body.get("metadata") or {}
    generation = int(meta.get("generation") or 0)
    old_raw = dict(body.get("status") or {})
    try:
        spec = parse_spec(body.get("spec") or {})
    except SpecError as err:
        return _invalid(old_raw, str(err), generation, now)
    old = _old_status(old_raw)
    d = Decision(status={})
    launcher = launchers.choose(spec.compute.launcher, old.launcher, trainjob_served)
    children = Children(jobs, read_stage, inspect_failure, admission_of, launcher)
    records = _stage_records(run, spec, old, children, now, d)
    current = next((r for r in records if r.phase != "Succeeded"), None)
    failed = next((r for r in records if r.phase == "Failed"), None)

    if failed:
        phase = "Failed"
    elif current is None:
        phase = "Succeeded"
    elif current.phase == "Suspended" or (spec.suspend and current.attempts == 0):
        phase = "Suspended"
    elif current.phase == "Queued":
        phase = "Queued"
    elif current.attempts:
        phase = "Running"
    else:
        phase = "Pending"

    shown = failed or current or (records[-1] if records else None)
    status = LLMRunStatus(
        phase=phase,
        stage=shown.name if shown else "",
        progress=_progress(shown, phase),
        loss=shown.metrics.loss if shown else None,
        eta=_eta(shown, phase),
        stages=records,
        checkpoint=_final_checkpoint(spec, records),
        # Recorded with the first job, so that `auto` keeps its choice for the rest of the run.
        launcher=launcher.kind if (jobs or d.create_jobs or old.launcher) else "",
        serving=old.serving,
        observed_generation=generation,
    )
    serving_ready = _serving(run, spec, status, rayservice, d) if phase == "Succeeded" else False
    if phase != "Succeeded" and rayservice is not None and not spec.serving.enabled:
        d.delete_rayservice = rayservice_name(run.name)
    out = status.model_dump(by_alias=True, exclude_none=True)
    out["conditions"] = _conditions(
        old_raw.get("conditions") or [], spec, phase, current, failed, serving_ready, now
    )
    if d.queued is not None:
        out["conditions"] = set_condition(out["conditions"], "Queued", *d.queued, now)
    if old.phase != phase:
        kind = "Warning" if phase == "Failed" else "Normal"
        said = f"run is {phase}" + (f" at stage {shown.name}" if shown else "")
        d.events.append(
            Event(kind, f"Run{phase}", said + (f": {d.queued[2]}" if phase == "Queued" and d.queued else ""))
        )
    d.status = out
    return d


def _eta(rec: StageStatus | None, phase: str) -> str:
    """The current stage's ETA as a person reads it (`1h05m`, `4m10s`, `35s`); empty when unknown."""
    seconds = rec.metrics.eta_seconds if rec is not None and phase == "Running" else None
    if seconds is None or seconds < 0:
        return ""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _progress(rec: StageStatus | None, phase: str) -> str:
    if phase == "Succeeded":
        return "done"
    if rec is None or not rec.metrics.total_steps:
        return ""
    return f"{rec.metrics.step or 0}/{rec.metrics.total_steps}"


def _job_config(job: dict[str, Any]) -> str:
    return (job["metadata"].get("labels") or {}).get(LABEL_CONFIG, "")


def _job_stage(job: dict[str, Any]) -> str:
    """The key of the stage a job runs; a job labelled with the stage's module name (made before
    stages had one name) counts as that stage's, so an upgraded operator follows it."""
    label = (job["metadata"].get("labels") or {}).get(LABEL_STAGE, "")
    try:
        return stage_named(label).key
    except ValueError:
        return ""


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


def _stage_records(
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
        rec.config_id = rec.config_id or config_id
        # Jobs of an earlier configuration are history; jobs from before config ids count as current.
        stage_jobs = [j for j in stage_jobs if _job_config(j) in ("", rec.config_id)]
        latest = stage_jobs[-1] if stage_jobs else None
        rec.attempts = max(rec.attempts, _attempt(latest) if latest else 0)
        progress, done = children.read_stage(ps.key)
        if done is not None and done.config_id and done.config_id != rec.config_id:
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


def _follow_queued_job(
    spec: LLMRunSpec,
    ps: plan_mod.PlannedStage,
    rec: StageStatus,
    kind: str,
    suspended: bool,
    adm: kueue.Admission,
    d: Decision,
) -> None:
    """A job that Kueue admits (kueue.py): Queued until its Workload is admitted; `spec.suspend`
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


def _final_checkpoint(spec: LLMRunSpec, records: list[StageStatus]) -> str:
    """The checkpoint of the last model-producing stage that finished (done.json's, else its dir)."""
    by_key = {r.name: r for r in records}
    for key in reversed(plan_mod.CHECKPOINT_STAGES):
        rec = by_key.get(key)
        if rec is not None and rec.phase == "Succeeded":
            return rec.outputs.get("checkpoint") or layout.checkpoints_dir(
                layout.stage_dir(spec.storage.uri, key)
            )
    return ""


def _serving(
    run: RunRef, spec: LLMRunSpec, status: LLMRunStatus, existing: dict[str, Any] | None, d: Decision
) -> bool:
    """Create, patch or delete the RayService; fill status.serving. Returns whether it is ready."""
    name = rayservice_name(run.name)
    if not spec.serving.enabled:
        if existing is not None:
            d.delete_rayservice = name
        status.serving = status.serving.model_copy(
            update={"ray_service": "", "ready": False, "url": "", "checkpoint": ""}
        )
        return False
    _, args_checkpoint = served_checkpoints(existing) if existing else (None, None)
    final = next(
        (
            r
            for r in reversed(status.stages)
            if r.name in plan_mod.CHECKPOINT_STAGES and r.phase == "Succeeded"
        ),
        None,
    )
    desired = rayservice_for_run(
        run, spec, status.checkpoint, args_checkpoint, final.config_id if final else ""
    )
    if existing is None:
        d.create_rayservice = desired
        d.events.append(
            Event("Normal", "ServingCreated", f"created RayService {name} for {status.checkpoint}")
        )
    elif not _contains(existing.get("spec") or {}, desired["spec"]):
        d.patch_rayservice = {"spec": desired["spec"]}
        d.events.append(Event("Normal", "ServingUpdated", f"updated RayService {name}"))
    ready = rayservice_ready(existing) and d.patch_rayservice is None
    status.serving = status.serving.model_copy(
        update={
            "ray_service": name,
            "ready": ready,
            "url": service_url(run.name, run.namespace),
            "checkpoint": status.checkpoint,
        }
    )
    return ready


def _contains(actual: Any, wanted: Any) -> bool:
    """Whether `actual` has everything `wanted` sets (the API server adds defaults of its own)."""
    if isinstance(wanted, dict):
        return isinstance(actual, dict) and all(
            k in actual and _contains(actual[k], v) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return isinstance(actual, list) and len(actual) == len(wanted) and all(map(_contains, actual, wanted))
    return actual == wanted


def _conditions(
    old: list[dict[str, Any]],
    spec: LLMRunSpec,
    phase: str,
    current: StageStatus | None,
    failed: StageStatus | None,
    serving_ready: bool,
    now: dt.datetime,
) -> list[dict[str, Any]]:
    c = list(old)
    if failed:
        c = set_condition(c, "Degraded", True, "StageFailed", f"stage {failed.name}: {failed.message}", now)
    elif current is not None and current.message:
        c = set_condition(
            c, "Degraded", True, "AttemptFailed", f"stage {current.name}: {current.message}; retrying", now
        )
    else:
        c = set_condition(c, "Degraded", False, "AsExpected", "", now)
    if phase in ("Running", "Pending"):
        c = set_condition(
            c, "Progressing", True, "StageRunning", f"stage {current.name if current else ''}", now
        )
    elif phase == "Queued":
        c = set_condition(
            c,
            "Progressing",
            False,
            "Queued",
            f"stage {current.name if current else ''} waits for Kueue to admit it (see the Queued condition)",
            now,
        )
    elif phase == "Suspended":
        c = set_condition(c, "Progressing", False, "Suspended", "spec.suspend is true", now)
    else:
        c = set_condition(c, "Progressing", False, phase, f"run {phase.lower()}", now)
    if phase == "Succeeded" and (serving_ready or not spec.serving.enabled):
        reason = "Serving" if spec.serving.enabled else "Trained"
        c = set_condition(
            c,
            "Ready",
            True,
            reason,
            "training finished" + (", chat service ready" if spec.serving.enabled else ""),
            now,
        )
    elif phase == "Succeeded":
        c = set_condition(
            c, "Ready", False, "ServingNotReady", "training finished; waiting for the RayService", now
        )
    else:
        c = set_condition(c, "Ready", False, phase, f"run is {phase}", now)
    return c
