"""What Kueue says about a stage's job, and how the operator suspends a job that Kueue manages.

With `spec.compute.queue` set, every stage job (PyTorchJob or TrainJob) carries the label
`kueue.x-k8s.io/queue-name` and is created suspended. Kueue's job integration (https://kueue.sigs.k8s.io/docs/tasks/run/kubeflow/pytorchjobs/)
makes a Workload for it (owned by the job, labelled `kueue.x-k8s.io/job-uid`), admits it when the
ClusterQueue behind the LocalQueue has quota, and only then sets `runPolicy.suspend: false` (a
TrainJob's `spec.suspend`, with Kueue's trainer.kubeflow.org/trainjob integration:
https://kueue.sigs.k8s.io/docs/tasks/run/trainjobs/).

Two rules follow from Kueue owning `runPolicy.suspend` of such a job:

- While the job waits, the run is `Queued`, and the Workload's own words (its `QuotaReserved`
  condition: "couldn't assign flavors to pod set master: insufficient unused quota for
  nvidia.com/gpu ...") say why.
- `spec.suspend` never touches `runPolicy.suspend` (Kueue would undo it at once). It deactivates the
  Workload instead (`spec.active: false`, the documented way to stop a Kueue workload:
  https://kueue.sigs.k8s.io/docs/concepts/workload/#active), and Kueue evicts and suspends the job
  itself. The operator marks the Workloads it deactivated, so resuming reactivates those and never
  one that Kueue (or a person) deactivated for a reason of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanorun.operator.names import DEACTIVATED_BY_OPERATOR


@dataclass(frozen=True)
class Admission:
    """Kueue's view of one job, from its Workload (`workload == ""`: Kueue has made none yet)."""

    workload: str = ""
    active: bool = True
    admitted: bool = False
    cluster_queue: str = ""
    reason: str = ""  # of QuotaReserved when not admitted (Pending, Inadmissible, ...), else of Evicted
    message: str = ""
    deactivated_by_operator: bool = False


def _true(conditions: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == kind and c.get("status") == "True"), None)


def admission_of(workload: dict[str, Any] | None) -> Admission:
    """The Admission a Workload object (as the API returns it) describes."""
    if workload is None:
        return Admission()
    meta = workload.get("metadata") or {}
    status = workload.get("status") or {}
    conditions = status.get("conditions") or []
    admitted = _true(conditions, "Admitted") is not None
    waiting = next(
        (c for c in conditions if c.get("type") == "QuotaReserved" and c.get("status") != "True"), None
    )
    evicted = _true(conditions, "Evicted")
    why = evicted if evicted is not None and not admitted else waiting
    return Admission(
        workload=meta.get("name", ""),
        active=(workload.get("spec") or {}).get("active", True) is not False,
        admitted=admitted,
        cluster_queue=((status.get("admission") or {}).get("clusterQueue") or ""),
        reason=(why or {}).get("reason", ""),
        message=(why or {}).get("message", ""),
        deactivated_by_operator=(meta.get("annotations") or {}).get(DEACTIVATED_BY_OPERATOR) == "true",
    )


def deactivate_patch() -> dict[str, Any]:
    """Merge patch that stops a Workload and marks it as stopped by the operator."""
    return {"metadata": {"annotations": {DEACTIVATED_BY_OPERATOR: "true"}}, "spec": {"active": False}}


def reactivate_patch() -> dict[str, Any]:
    return {"metadata": {"annotations": {DEACTIVATED_BY_OPERATOR: None}}, "spec": {"active": True}}


# Kueue's integration (its `integrations.frameworks` name) for each kind of stage job.
INTEGRATIONS = {"PyTorchJob": "kubeflow.org/pytorchjob", "TrainJob": "trainer.kubeflow.org/trainjob"}


def waiting_message(queue: str, job: str, adm: Admission, kind: str = "PyTorchJob") -> str:
    """Why a stage's job (of `kind`) has not started, in Kueue's words, naming the LocalQueue."""
    if not adm.workload:
        return (
            f"waiting in LocalQueue {queue}: Kueue has made no Workload for {kind} {job} yet "
            f"(is Kueue installed, with the {INTEGRATIONS.get(kind, kind)} integration?)"
        )
    if not adm.active and not adm.deactivated_by_operator:
        return f"Kueue Workload {adm.workload} is deactivated: {adm.reason or 'spec.active is false'}: {adm.message}"
    said = f"{adm.reason}: {adm.message}" if adm.message else (adm.reason or "waiting for quota")
    return f"waiting in LocalQueue {queue} (Workload {adm.workload}): {said}"
