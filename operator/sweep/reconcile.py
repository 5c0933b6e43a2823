"""One reconcile of one LLMSweep, as a pure decision: which child LLMRuns and report job to create,
and the sweep's status.

    decision = reconcile_sweep(sweep, body, runs, jobs, read_done, now)

Level-triggered like reconcile/run.py: it depends only on the sweep, its children as they are now and
the points' done.json files, so running it twice decides the same thing. The children:

1. unless `template.tokenizer.from` names a run, the tokenizer run `<sweep>-tokenizer`, first;
2. once it has succeeded, every point's LLMRun at once (owned by the sweep, labelled
   `nanorun.io/sweep`): they run as many at a time as the cluster, or Kueue with `compute.queue`,
   admits. A point is an LLMRun, so a failed attempt resumes from its checkpoint as any stage does;
   a point that has succeeded is never created again;
3. when every point has ended, the report job `python -m nanorun.trainer.sweep_report` (one CPU
   process) over the points that succeeded, a PyTorchJob or a TrainJob as the points' stages ran
   (`report_launcher`); it is retried up to `template.retry.maxAttempts`.

`spec.suspend` suspends every unfinished child run (their `spec.suspend`, marked with the
annotation `nanorun.io/suspended-by-sweep`), creates new children suspended and holds back the
report job; unsetting it resumes the marked runs only. A running report job is let finish (one CPU
process, minutes).

The status lists every point with its phase and, once it has succeeded, its numbers (read once from
its done.json files), and counts the points done and running for `kubectl get llmsweep`, with the
best point so far (lowest validation bits per byte).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nanorun.operator.api import API_VERSION, GROUP, VERSION, SpecError, spec_to_dict
from nanorun.operator.api import KIND as RUN_KIND
from nanorun.operator.api.tenancy import OPEN, Policy
from nanorun.operator.children import launchers
from nanorun.operator.names import LABEL_ATTEMPT, LABEL_RUN, LABEL_SWEEP, SUSPENDED_BY_SWEEP
from nanorun.operator.reconcile.decision import Event
from nanorun.operator.reconcile.plan import PlannedStage
from nanorun.operator.reconcile.status import set_condition
from nanorun.operator.run_ref import RunRef
from nanorun.operator.sweep.api import (
    KIND,
    LLMSweepSpec,
    Point,
    SweepPointStatus,
    parse_sweep_spec,
    point_info,
    point_infos,
    point_spec,
    sweep_dir,
    sweep_points,
    tokenizer_run_name,
    tokenizer_source,
    tokenizer_spec,
    trains_tokenizer,
)
from nanorun.pipeline import storage
from nanorun.pipeline import sweep as sweep_files
from nanorun.pipeline.progress import Done

# (run directory, stage) → its done.json, or None; may raise on storage errors (retried later).
ReadDone = Callable[[str, str], Done | None]
ENDED = ("Succeeded", "Failed")
ACTIVE = ("Running", "Queued")
REPORT = PlannedStage("report", "sweep_report", [], False)


@dataclass
class SweepDecision:
    status: dict[str, Any]
    create_runs: list[dict[str, Any]] = field(default_factory=list)  # child LLMRun manifests
    create_jobs: list[dict[str, Any]] = field(default_factory=list)  # the report's PyTorchJob
    patch_runs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (child, merge patch)
    manifest: list[sweep_files.PointInfo] = field(default_factory=list)  # sweep.json, for the report
    events: list[Event] = field(default_factory=list)


def owner_reference(sweep: RunRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": sweep.name,
        "uid": sweep.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_run(sweep: RunRef, name: str, spec: Any) -> dict[str, Any]:
    """A child LLMRun: owned by the sweep (deleting the sweep deletes it), labelled with it."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": RUN_KIND,
        "metadata": {
            "name": name,
            "namespace": sweep.namespace,
            "labels": {LABEL_SWEEP: sweep.name, "app.kubernetes.io/managed-by": "nanorun"},
            "ownerReferences": [owner_reference(sweep)],
        },
        "spec": spec_to_dict(spec),
    }


def suspension(manifest: dict[str, Any], suspend: bool) -> dict[str, Any]:
    """A new child run's manifest as the sweep's `spec.suspend` has it: created suspended (and
    marked as the sweep's doing) while the sweep is."""
    if suspend:
        manifest["spec"]["suspend"] = True
        manifest["metadata"]["annotations"] = {SUSPENDED_BY_SWEEP: "true"}
    return manifest


def suspension_patch(run: dict[str, Any], suspend: bool) -> dict[str, Any] | None:
    """The merge patch that brings an unfinished child run to the sweep's `spec.suspend`, or None.
    Suspending marks the run; resuming resumes only marked runs, so a point a user suspended on
    its own stays suspended."""
    if ((run.get("status") or {}).get("phase")) in ENDED:
        return None
    suspended = bool((run.get("spec") or {}).get("suspend"))
    ours = ((run["metadata"].get("annotations") or {}).get(SUSPENDED_BY_SWEEP)) == "true"
    if suspend and not suspended:
        return {"metadata": {"annotations": {SUSPENDED_BY_SWEEP: "true"}}, "spec": {"suspend": True}}
    if not suspend and suspended and ours:
        return {"metadata": {"annotations": {SUSPENDED_BY_SWEEP: None}}, "spec": {"suspend": False}}
    return None


def report_launcher(spec: LLMSweepSpec, runs: list[dict[str, Any]]) -> launchers.Launcher:
    """The kind of job the report runs as: the template's compute.launcher, else the kind the
    points ran as (their status.launcher), else PyTorchJob."""
    recorded = next((r["status"]["launcher"] for r in runs if (r.get("status") or {}).get("launcher")), "")
    return launchers.choose(spec.template.compute.launcher, recorded, trainjob_served=False)


def _relabel(node: Any, sweep: str) -> None:
    """Every label set in a job manifest: the sweep's label instead of `nanorun.io/run`."""
    if isinstance(node, dict):
        labels = node.get("labels")
        if isinstance(labels, dict) and LABEL_RUN in labels:
            labels.pop(LABEL_RUN)
            labels[LABEL_SWEEP] = sweep
        for value in node.values():
            _relabel(value, sweep)
    elif isinstance(node, list):
        for value in node:
            _relabel(value, sweep)


def report_job(
    sweep: RunRef, spec: LLMSweepSpec, attempt: int, launcher: launchers.Launcher
) -> dict[str, Any]:
    """The report's job, built by the stage job builder of `launcher` (PyTorchJob or TrainJob), owned
    by the sweep and labelled with it, not with `nanorun.io/run`: no LLMRun follows it."""
    job_spec = tokenizer_spec(spec).model_copy(update={"storage": spec.template.storage})
    job = launcher.build(sweep, job_spec, REPORT, attempt, "")
    job["metadata"]["ownerReferences"] = [owner_reference(sweep)]
    _relabel(job, sweep.name)
    return job


def _attempt(job: dict[str, Any]) -> int:
    try:
        return int(job["metadata"]["labels"][LABEL_ATTEMPT])
    except (KeyError, ValueError, TypeError):
        return 0


def _point_status(
    point: Point,
    run: dict[str, Any] | None,
    old: dict[str, Any] | None,
    spec: LLMSweepSpec,
    read_done: ReadDone,
) -> SweepPointStatus:
    phase = ((run or {}).get("status") or {}).get("phase") or "Pending"
    rec = SweepPointStatus(name=point.name, depth=point.depth, flop_budget=point.flop_budget, phase=phase)
    if phase != "Succeeded":
        return rec
    if old and old.get("phase") == "Succeeded" and old.get("valBpb") is not None:
        return SweepPointStatus.model_validate(old)  # read once: a finished point does not change
    run_dir = sweep_files.point_dir(sweep_dir(spec), point_info(point))
    pre = read_done(run_dir, "pretrain")
    ev = read_done(run_dir, "baseEval")
    if pre is not None:
        m = pre.metrics
        params, tokens = m.get("scaling_params") or m.get("params"), m.get("tokens")
        rec.params = int(params) if params is not None else None
        rec.tokens = int(tokens) if tokens is not None else None
        rec.flops = m.get("flops")
        rec.val_bpb = (ev.metrics.get("val_bpb") if ev else None) or m.get("val_bpb")
        rec.core = ev.metrics.get("core") if ev else None
        rec.seconds = pre.seconds + (ev.seconds if ev else 0.0)
    return rec


def _invalid(old: dict[str, Any], message: str, generation: int, now: dt.datetime) -> SweepDecision:
    status = dict(old)
    conditions = set_condition(
        list(status.get("conditions") or []), "Degraded", True, "InvalidSpec", message, now
    )
    status.update(
        conditions=conditions, observedGeneration=generation, phase=status.get("phase") or "Pending"
    )
    seen = any(
        c.get("reason") == "InvalidSpec" and c.get("message") == message for c in old.get("conditions") or []
    )
    return SweepDecision(status=status, events=[] if seen else [Event("Warning", "InvalidSpec", message)])


def reconcile_sweep(
    sweep: RunRef,
    body: dict[str, Any],
    runs: list[dict[str, Any]],
    jobs: list[dict[str, Any]],
    read_done: ReadDone,
    now: dt.datetime,
    policy: Policy = OPEN,
) -> SweepDecision:
    """What to do next for one sweep, given its children (LLMRuns and report jobs labelled with it);
    a template that uses what the tenancy `policy` does not give the namespace is invalid."""
    old = body.get("status") or {}
    generation = body["metadata"].get("generation", 0)
    try:
        spec = parse_sweep_spec(body.get("spec"))
    except SpecError as err:
        return _invalid(old, str(err), generation, now)
    refused = policy.refusals(sweep.namespace, spec.template)
    if refused:
        return _invalid(
            old, "\n".join(f"spec.template.{r.removeprefix('spec.')}" for r in refused), generation, now
        )
    by_name = {r["metadata"]["name"]: r for r in runs}
    old_points = {p.get("name"): p for p in old.get("points") or []}
    points = sweep_points(sweep.name, spec)
    d = SweepDecision(status={}, manifest=point_infos(sweep.name, spec))
    conditions = list(old.get("conditions") or [])

    tokenizer_phase = "Succeeded"
    if trains_tokenizer(spec):
        name = tokenizer_run_name(sweep.name)
        run = by_name.get(name)
        if run is None:
            d.create_runs.append(suspension(child_run(sweep, name, tokenizer_spec(spec)), spec.suspend))
            d.events.append(Event("Normal", "TokenizerStarted", f"training the sweep's tokenizer in {name}"))
        tokenizer_phase = ((run or {}).get("status") or {}).get("phase") or "Pending"

    records = []
    for point in points:
        run = by_name.get(point.name)
        if run is None and tokenizer_phase == "Succeeded":
            d.create_runs.append(
                suspension(child_run(sweep, point.name, point_spec(spec, point)), spec.suspend)
            )
        records.append(_point_status(point, run, old_points.get(point.name), spec, read_done))
    if tokenizer_phase == "Succeeded" and any(r.name not in by_name for r in records):
        created = sum(1 for r in records if r.name not in by_name)
        d.events.append(Event("Normal", "PointsCreated", f"created {created} of {len(records)} points"))

    for run in runs:
        if (patch := suspension_patch(run, spec.suspend)) is not None:
            d.patch_runs.append((run["metadata"]["name"], patch))

    done = [r for r in records if r.phase == "Succeeded"]
    measured = [r for r in done if r.val_bpb is not None]
    best = min(measured, key=lambda r: r.val_bpb) if measured else None
    ended = all(r.phase in ENDED for r in records)
    failed = [r.name for r in records if r.phase == "Failed"]

    report, report_job_name, report_attempts = old.get("report", ""), old.get("reportJob", ""), 0
    phase = "Running" if runs or d.create_runs else "Pending"
    message = ""
    if tokenizer_phase == "Failed":
        phase, message = "Failed", f"the tokenizer run {tokenizer_run_name(sweep.name)} failed"
    elif spec.suspend and not ended:
        stopped = sum(1 for r in records if r.phase not in ENDED)
        phase, message = "Suspended", f"suspended: {stopped} of {len(records)} points unfinished"
    elif ended and done and spec.suspend and not report and not jobs:
        phase, message = "Suspended", "suspended before the report job"
    elif ended and done:
        mine = sorted(jobs, key=_attempt)
        latest = mine[-1] if mine else None
        report_attempts = max(_attempt(latest) if latest else 0, old.get("reportAttempts") or 0)
        state = launchers.launcher_of(latest).state(latest).phase if latest else ""
        launcher = launchers.launcher_of(latest) if latest else report_launcher(spec, runs)
        if latest is None and not report:
            job = report_job(sweep, spec, 1, launcher)
            d.create_jobs.append(job)
            report_job_name, report_attempts = job["metadata"]["name"], 1
        elif state == "Failed" and report_attempts < spec.template.retry.max_attempts:
            job = report_job(sweep, spec, report_attempts + 1, launcher)
            d.create_jobs.append(job)
            report_job_name, report_attempts = job["metadata"]["name"], report_attempts + 1
        elif state == "Failed":
            phase, message = "Failed", f"the report job {latest['metadata']['name']} failed"
        if latest is not None:
            report_job_name = report_job_name if d.create_jobs else latest["metadata"]["name"]
        if state == "Succeeded" or (report and latest is None):
            report = storage.join(sweep_files.report_dir(sweep_dir(spec)), "report.md")
            phase = "Failed" if failed else "Succeeded"
            message = f"points failed: {', '.join(failed)}" if failed else ""
            if not old.get("report"):
                d.events.append(Event("Normal", "ReportWritten", f"sweep report: {report}"))
    elif ended:
        phase, message = "Failed", "every point failed"

    if phase == "Suspended" and old.get("phase") != phase:
        d.events.append(Event("Normal", "SweepSuspended", message))
    elif old.get("phase") == "Suspended" and phase != "Suspended" and not spec.suspend:
        d.events.append(Event("Normal", "SweepResumed", f"resumed {len(d.patch_runs)} runs"))
    if phase in ENDED and old.get("phase") != phase:
        d.events.append(
            Event("Normal" if phase == "Succeeded" else "Warning", f"Sweep{phase}", message or phase)
        )
    conditions = set_condition(conditions, "Ready", phase == "Succeeded", phase, message, now)
    conditions = set_condition(conditions, "Degraded", phase == "Failed" or bool(failed), phase, message, now)
    d.status = {
        "phase": phase,
        "done": len(done),
        "running": sum(1 for r in records if r.phase in ACTIVE),
        "total": len(records),
        "best": best.name if best else "",
        "bestBpb": best.val_bpb if best else None,
        "tokenizer": tokenizer_source(spec),
        "points": [r.model_dump(by_alias=True, exclude_none=True) for r in records],
        "report": report,
        "reportJob": report_job_name,
        "reportAttempts": report_attempts,
        "conditions": conditions,
        "observedGeneration": generation,
    }
    return d
