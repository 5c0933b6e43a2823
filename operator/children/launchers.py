"""The kinds of job a stage can run as, behind one small interface: reconcile/attempts.py speaks of "the
stage's job" and asks its `Launcher` how to build, read, suspend and address it.

    launcher = choose(spec.compute.launcher, status.launcher, trainjob_served)
    manifest = launcher.build(run, spec, planned_stage, attempt, config_id)
    launcher_of(job).state(job)              # JobState: Pending | Running | Suspended | Succeeded | Failed

| kind | controller | builder |
|---|---|---|
| `PyTorchJob` (kubeflow.org/v1) | Kubeflow training-operator v1 | pytorchjob.pytorchjob_for_stage |
| `TrainJob` (trainer.kubeflow.org/v1alpha1) | Kubeflow Trainer v2, through a JobSet | trainjob.trainjob_for_stage |

`compute.launcher: auto` takes TrainJob where the cluster serves the trainjobs.trainer.kubeflow.org
CRD, PyTorchJob otherwise, and the choice is kept in `status.launcher`: installing Trainer v2 in the
middle of a run does not move its remaining stages to another controller. An explicit
`compute.launcher` applies from the next job on; a job that exists is always followed as the kind it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nanorun.operator import names
from nanorun.operator.api import LLMRunSpec
from nanorun.operator.children import pytorchjob, trainjob
from nanorun.operator.reconcile.plan import PlannedStage
from nanorun.operator.reconcile.status import JobState, job_state
from nanorun.operator.run_ref import RunRef

Build = Callable[[RunRef, LLMRunSpec, PlannedStage, int, str], dict[str, Any]]


@dataclass(frozen=True)
class Launcher:
    kind: str
    group: str
    version: str
    plural: str
    container: str  # the trainer container of the job's pods (its exit code and log explain a failure)
    build: Build
    job_name: Callable[[str, str, int], str]  # (run, stage module, attempt)
    state: Callable[[dict[str, Any]], JobState]
    suspended: Callable[[dict[str, Any]], bool]
    suspend_patch: Callable[[bool], dict[str, Any]]  # merge patch setting the job's suspend flag
    # Whether the finished job is deleted by the operator after compute.ttlSecondsAfterFinished
    # (the kind's own controller has no TTL for it).
    operator_ttl: bool


def _pytorchjob_suspended(job: dict[str, Any]) -> bool:
    return bool(((job.get("spec") or {}).get("runPolicy") or {}).get("suspend"))


PYTORCHJOB = Launcher(
    kind="PyTorchJob",
    group=names.PYTORCHJOB_GROUP,
    version=names.PYTORCHJOB_VERSION,
    plural=names.PYTORCHJOB_PLURAL,
    container=pytorchjob.CONTAINER_NAME,
    build=pytorchjob.pytorchjob_for_stage,
    job_name=pytorchjob.job_name,
    state=job_state,
    suspended=_pytorchjob_suspended,
    suspend_patch=lambda suspend: {"spec": {"runPolicy": {"suspend": suspend}}},
    operator_ttl=False,  # runPolicy.ttlSecondsAfterFinished: the training-operator deletes it
)

TRAINJOB = Launcher(
    kind="TrainJob",
    group=names.TRAINJOB_GROUP,
    version=names.TRAINJOB_VERSION,
    plural=names.TRAINJOB_PLURAL,
    container=trainjob.CONTAINER_NAME,
    build=trainjob.trainjob_for_stage,
    job_name=trainjob.trainjob_name,
    state=trainjob.trainjob_state,
    suspended=trainjob.trainjob_suspended,
    suspend_patch=trainjob.trainjob_suspend_patch,
    operator_ttl=True,
)

LAUNCHERS = {launcher.kind: launcher for launcher in (PYTORCHJOB, TRAINJOB)}


def launcher_of(job: dict[str, Any]) -> Launcher:
    """The launcher of an observed job, by its kind (PyTorchJob when it does not say)."""
    return LAUNCHERS.get(job.get("kind") or "", PYTORCHJOB)


def choose(requested: str, recorded: str, trainjob_served: bool) -> Launcher:
    """The launcher of the run's next job: the spec's, else the one recorded in status, else
    TrainJob where the cluster serves its CRD."""
    if requested in LAUNCHERS:
        return LAUNCHERS[requested]
    if recorded in LAUNCHERS:
        return LAUNCHERS[recorded]
    return TRAINJOB if trainjob_served else PYTORCHJOB
