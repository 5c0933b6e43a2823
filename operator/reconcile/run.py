"""One reconcile of one LLMRun, as a pure decision: what to create, patch and report.

    decision = reconcile(run, body, jobs, rayservice, read_stage, now)

Level-triggered: the decision depends only on the LLMRun (spec and the status written before) and
its children (stage jobs, RayService) as they are now, plus the stage files in storage, so
running it twice, or after an operator restart, decides the same thing. Children have
deterministic names, so creating one that is already there is a 409 and changes nothing.

A spec that does not parse is reported in Degraded and nothing else is touched. Otherwise the
stages' records come from their attempts (attempts.py: which stage runs, retries, preemptions),
and from them the run's phase: Failed once a stage failed, Succeeded once every stage has,
else the current stage's Suspended, Queued, Running or Pending. The status shows the current (or
failed) stage with its progress, loss and ETA, the final checkpoint, and the conditions Degraded,
Progressing and Ready (and Queued, with compute.queue); a change of phase is an Event. When every
stage has succeeded, the RayService is created or patched to serve the final checkpoint; with
serving disabled it is deleted. The Decision, Event and FailureFacts it returns and reads are in
decision.py.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from nanorun.operator.api import LLMRunSpec, LLMRunStatus, SpecError, StageStatus, parse_spec
from nanorun.operator.api.tenancy import OPEN, Policy
from nanorun.operator.children import kueue, launchers
from nanorun.operator.children.rayservice import (
    rayservice_for_run,
    rayservice_name,
    served_checkpoints,
    service_url,
)
from nanorun.operator.reconcile.attempts import (
    AdmissionOf,
    Children,
    InspectFailure,
    ReadHeartbeats,
    ReadStage,
    no_heartbeats,
    stage_records,
)
from nanorun.operator.reconcile.decision import Decision, Event, FailureFacts
from nanorun.operator.reconcile.status import rayservice_ready, set_condition
from nanorun.operator.run_ref import RunRef
from nanorun.pipeline import layout
from nanorun.pipeline.stages import MODEL_KEYS


def _no_pods(job: dict[str, Any]) -> FailureFacts:
    return FailureFacts()


def _no_workload(job: dict[str, Any]) -> kueue.Admission:
    return kueue.Admission()


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
    policy: Policy = OPEN,
    read_heartbeats: ReadHeartbeats = no_heartbeats,
) -> Decision:
    """Decide what one reconcile of `body` (the LLMRun) does, given its children (`jobs`: the
    run's stage jobs of every kind). `trainjob_served`: whether the cluster serves Trainer v2's
    TrainJob CRD, which `compute.launcher: auto` takes when the run has not chosen yet. A run whose
    uses what the tenancy `policy` does not give its namespace is invalid: nothing of it is read.
    `read_heartbeats` gives an attempt's heartbeats, from which a stalled stage is told."""
    meta = body.get("metadata") or {}
    generation = int(meta.get("generation") or 0)
    old_raw = dict(body.get("status") or {})
    try:
        spec = parse_spec(body.get("spec") or {})
    except SpecError as err:
        return _invalid(old_raw, str(err), generation, now)
    refused = policy.refusals(run.namespace, spec)
    if refused:
        return _invalid(old_raw, "\n".join(refused), generation, now)
    old = _old_status(old_raw)
    d = Decision(status={})
    launcher = launchers.choose(spec.compute.launcher, old.launcher, trainjob_served)
    children = Children(jobs, read_stage, inspect_failure, admission_of, launcher, read_heartbeats)
    records = stage_records(run, spec, old, children, now, d)
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
    stalled = _stalled(records, failed, current)
    if stalled is not None:
        out["conditions"] = set_condition(out["conditions"], "Stalled", *stalled, now)
    if old.phase != phase:
        kind = "Warning" if phase == "Failed" else "Normal"
        said = f"run is {phase}" + (f" at stage {shown.name}" if shown else "")
        d.events.append(
            Event(kind, f"Run{phase}", said + (f": {d.queued[2]}" if phase == "Queued" and d.queued else ""))
        )
    d.status = out
    return d


def _stalled(
    records: list[StageStatus], failed: StageStatus | None, current: StageStatus | None
) -> tuple[bool, str, str] | None:
    """The Stalled condition (status, reason, message), once a stage has stalled: True from the
    stall until the next attempt gets past the step it stalled at (or for good when the stage
    failed by stalling twice there), then False, still naming what the last stall's ranks said."""
    last = next((r for r in reversed(records) if r.stalls), None)
    if last is None:
        return None
    if failed is last and last.failed_by_stalling:
        return True, "StalledTwice", f"stage {last.name}: {last.message}"
    waiting = (
        current is last
        and last.stalled_attempt == last.attempts - 1
        and (last.metrics.step or 0) <= (last.stalled_step or 0)
    )
    if waiting:
        return (
            True,
            "StageStalled",
            f"{last.last_stall}; attempt {last.attempts} resumes from the last checkpoint",
        )
    return (
        False,
        "Resumed",
        f"stage {last.name} stalled {last.stalls} time(s), the next attempt went on; last: {last.last_stall}",
    )


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


def _final_checkpoint(spec: LLMRunSpec, records: list[StageStatus]) -> str:
    """The checkpoint of the last model-producing stage that finished (done.json's, else its dir)."""
    by_key = {r.name: r for r in records}
    for key in reversed(MODEL_KEYS):
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
        (r for r in reversed(status.stages) if r.name in MODEL_KEYS and r.phase == "Succeeded"),
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
