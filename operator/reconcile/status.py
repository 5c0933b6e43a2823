"""Reading children and storage into LLMRun status pieces: job states, stage metrics, conditions.

Pure functions (no API calls): `job_state` reads a PyTorchJob's conditions the way the training
operator writes them, `metrics_from` turns a stage's progress.json / done.json into status
metrics, `set_condition` keeps `lastTransitionTime` unless the status really changed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from nanorun.operator.api import StageMetrics
from nanorun.pipeline.progress import Done, Progress


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> dt.datetime | None:
    if not s:
        return None
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


@dataclass(frozen=True)
class JobState:
    """Where one PyTorchJob stands."""

    phase: str  # Pending | Running | Suspended | Succeeded | Failed
    reason: str = ""
    message: str = ""
    since: dt.datetime | None = None  # when the deciding condition became true


def job_state(job: dict[str, Any]) -> JobState:
    """Succeeded/Failed when that condition is True; else Suspended (runPolicy.suspend), Running, Pending."""
    conditions = (job.get("status") or {}).get("conditions") or []
    true = {c.get("type"): c for c in conditions if c.get("status") == "True"}
    for phase in ("Succeeded", "Failed"):
        if phase in true:
            c = true[phase]
            return JobState(
                phase,
                c.get("reason", ""),
                c.get("message", ""),
                parse_time(c.get("lastTransitionTime") or c.get("lastUpdateTime")),
            )
    if ((job.get("spec") or {}).get("runPolicy") or {}).get("suspend") or "Suspended" in true:
        return JobState("Suspended")
    if "Running" in true or "Restarting" in true:
        return JobState("Running")
    return JobState("Pending")


def metrics_from(progress: Progress | None, done: Done | None) -> StageMetrics:
    """Status metrics of a stage: done.json's summary wins over the last progress.json."""
    m = StageMetrics()
    if progress is not None:
        m = StageMetrics(
            step=progress.step,
            total_steps=progress.total_steps,
            loss=progress.loss,
            val_bpb=progress.val_bpb,
            tokens_per_second=progress.tokens_per_sec,
            mfu=progress.mfu,
            eta_seconds=progress.eta_seconds,
        )
    if done is not None:
        d = done.metrics
        updates = {
            "loss": d.get("loss"),
            "val_bpb": d.get("val_bpb"),
            "tokens_per_second": d.get("tokens_per_sec"),
            "mfu": d.get("mfu"),
            "eta_seconds": 0.0,
        }
        if m.total_steps:
            updates["step"] = m.total_steps
        m = m.model_copy(update={k: v for k, v in updates.items() if isinstance(v, (int, float))})
    return m


def outputs_from(done: Done | None) -> dict[str, str]:
    if done is None:
        return {}
    return {k: str(v) for k, v in done.outputs.items() if isinstance(v, (str, int, float))}


def set_condition(
    conditions: list[dict[str, Any]], type_: str, status: bool, reason: str, message: str, now: dt.datetime
) -> list[dict[str, Any]]:
    """Conditions with `type_` set; lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = (
        old["lastTransitionTime"]
        if old and old.get("status") == value and old.get("lastTransitionTime")
        else rfc3339(now)
    )
    new = {"type": type_, "status": value, "reason": reason, "message": message, "lastTransitionTime": since}
    return [c for c in conditions if c.get("type") != type_] + [new]


def rayservice_ready(rayservice: dict[str, Any] | None) -> bool:
    """KubeRay's Ready condition (serviceStatus "Running" on versions before conditions)."""
    if not rayservice:
        return False
    status = rayservice.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return status.get("serviceStatus") == "Running"
