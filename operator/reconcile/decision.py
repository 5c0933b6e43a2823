"""What one reconcile of an LLMRun gives back, as data: the `Decision` (the status to write, the
children to create, patch or delete, when to look again, the metrics to count) with the `Event`s
to post, and `FailureFacts`, what a failed job's pods tell.

Plain dataclasses without behaviour besides `Event.to_object`, the core/v1 Event to create; the
run's `reconcile()` (run.py) and the stage attempts it follows (attempts.py) fill a Decision,
the controllers apply it, and the sweep reconcile (sweep/reconcile.py) posts the same Events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nanorun.operator.api import GROUP, VERSION
from nanorun.operator.run_ref import RunRef


@dataclass(frozen=True)
class FailureFacts:
    """What a failed job's pods tell: whether some are still stopping (`active`: the job is marked
    failed as soon as a pod is deleted, while the trainer is still writing its SIGTERM checkpoint),
    whether they were disrupted (then `disruption` says how, e.g. "pod x-master-0: DisruptionTarget
    (PreemptionByScheduler)") and the failing container's last log lines."""

    active: tuple[str, ...] = ()
    disruption: str = ""
    log_tail: str = ""


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
