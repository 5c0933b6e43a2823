"""kopf registrations of LLMSweeps (imported by loop/handlers.py, so `nanorun operator` runs both).

Indexes keep a live view of every LLMSweep, of the LLMRuns and of the PyTorchJobs and TrainJobs
labelled `nanorun.io/sweep` (a sweep's points, its tokenizer run and its report job), keyed by
(namespace, sweep). Watch events of any of them queue the sweep; the `SweepController`
(controller.py) reconciles it. No finalizer: deleting a sweep deletes its children through
their owner references, and the points' LLMRuns take their jobs with them.
"""

from __future__ import annotations

from typing import Any

import kopf
from nanorun.operator.api import GROUP, PLURAL, VERSION
from nanorun.operator.loop.handlers import _plain
from nanorun.operator.names import (
    LABEL_SWEEP,
    PYTORCHJOB_GROUP,
    PYTORCHJOB_PLURAL,
    PYTORCHJOB_VERSION,
    SUSPENDED_BY_SWEEP,
    TRAINJOB_GROUP,
    TRAINJOB_PLURAL,
    TRAINJOB_VERSION,
)
from nanorun.operator.sweep.api import PLURAL as SWEEP_PLURAL
from nanorun.operator.sweep.controller import SweepController

LLMSWEEPS = (GROUP, VERSION, SWEEP_PLURAL)
LLMRUNS = (GROUP, VERSION, PLURAL)
PYTORCHJOBS = (PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL)
TRAINJOBS = (TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL)  # kopf watches them only where served
SWEEPS = SweepController()


@kopf.on.startup()
async def start_sweeps(**_: Any) -> None:
    SWEEPS.start()


@kopf.on.cleanup()
async def stop_sweeps(**_: Any) -> None:
    await SWEEPS.stop()


@kopf.index(*LLMSWEEPS)
def llmsweeps_by_key(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): _plain(body)}


@kopf.index(*LLMRUNS, labels={LABEL_SWEEP: kopf.PRESENT})
def llmruns_by_sweep(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    run = _plain(body, ("metadata", "status"))
    # What the sweep passes on (its spec.suspend) and whether it was the sweep that suspended the run.
    run["spec"] = {"suspend": bool((body.get("spec") or {}).get("suspend"))}
    if SUSPENDED_BY_SWEEP in body.metadata.annotations:
        run["metadata"]["annotations"] = {SUSPENDED_BY_SWEEP: body.metadata.annotations[SUSPENDED_BY_SWEEP]}
    return {(namespace, labels[LABEL_SWEEP]): run}


@kopf.index(*PYTORCHJOBS, labels={LABEL_SWEEP: kopf.PRESENT})
def pytorchjobs_by_sweep(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_SWEEP]): _plain(body, ("apiVersion", "kind", "metadata", "status"))}


@kopf.index(*TRAINJOBS, labels={LABEL_SWEEP: kopf.PRESENT})
def trainjobs_by_sweep(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {
        (namespace, labels[LABEL_SWEEP]): _plain(body, ("apiVersion", "kind", "metadata", "spec", "status"))
    }


def _attach(kwargs: dict[str, Any]) -> None:
    if SWEEPS.sweeps is None:
        SWEEPS.attach(
            kwargs["llmsweeps_by_key"],
            kwargs["llmruns_by_sweep"],
            kwargs["pytorchjobs_by_sweep"],
            kwargs.get("trainjobs_by_sweep"),
        )


@kopf.on.event(*LLMSWEEPS)
async def llmsweep_event(namespace: str, name: str, **kwargs: Any) -> None:
    _attach(kwargs)
    SWEEPS.enqueue((namespace, name))


@kopf.on.event(*LLMRUNS, labels={LABEL_SWEEP: kopf.PRESENT})
async def sweep_run_event(namespace: str, labels: kopf.Labels, **kwargs: Any) -> None:
    _attach(kwargs)
    SWEEPS.enqueue((namespace, labels[LABEL_SWEEP]))


@kopf.on.event(*PYTORCHJOBS, labels={LABEL_SWEEP: kopf.PRESENT})
@kopf.on.event(*TRAINJOBS, labels={LABEL_SWEEP: kopf.PRESENT})
async def sweep_job_event(namespace: str, labels: kopf.Labels, **kwargs: Any) -> None:
    _attach(kwargs)
    SWEEPS.enqueue((namespace, labels[LABEL_SWEEP]))
