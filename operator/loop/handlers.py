"""kopf registrations: what the operator watches and how it feeds the reconcile loop.

    kopf run -m nanorun.operator.loop.handlers --standalone -A     (or `nanorun operator`)

Indexes keep a live, read-only view of every LLMRun and of the stage jobs (PyTorchJobs, and
TrainJobs where Trainer v2 is installed) and RayServices labelled `nanorun.io/run`, keyed by
(namespace, run); kopf fills them all before any handler runs,
so after a restart the operator sees every child before it decides anything. Watch events queue
the run they concern; the `Controller` (controller.py) reconciles it. The only finalizer is for
`storage.cleanupOnDelete`: it deletes the run's files, then lets the LLMRun go; its children go
with it through owner references.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

import kopf
from nanorun.operator.api import GROUP, PLURAL, VERSION, SpecError, parse_spec
from nanorun.operator.children.cleanup import cleanup_job, job_outcome
from nanorun.operator.loop.controller import Controller
from nanorun.operator.names import (
    CLEANUP_FINALIZER,
    LABEL_RUN,
    PYTORCHJOB_GROUP,
    PYTORCHJOB_PLURAL,
    PYTORCHJOB_VERSION,
    RAYSERVICE_GROUP,
    RAYSERVICE_PLURAL,
    RAYSERVICE_VERSION,
    TRAINJOB_GROUP,
    TRAINJOB_PLURAL,
    TRAINJOB_VERSION,
    WORKLOAD_GROUP,
    WORKLOAD_PLURAL,
    WORKLOAD_VERSION,
)
from nanorun.operator.run_ref import RunRef
from nanorun.pipeline import storage

LLMRUNS = (GROUP, VERSION, PLURAL)
PYTORCHJOBS = (PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL)
TRAINJOBS = (TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL)  # kopf watches them only where served
RAYSERVICES = (RAYSERVICE_GROUP, RAYSERVICE_VERSION, RAYSERVICE_PLURAL)
WORKLOADS = (
    WORKLOAD_GROUP,
    WORKLOAD_VERSION,
    WORKLOAD_PLURAL,
)  # Kueue's; kopf watches them only where served

log = logging.getLogger("nanorun.operator")
CONTROLLER = Controller()
API_ERROR_BACKOFFS = (1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 60, 60, 60)  # seconds; about 5 minutes in all


def _plain(
    body: kopf.Body, keys: tuple[str, ...] = ("apiVersion", "kind", "metadata", "spec", "status")
) -> dict[str, Any]:
    """A plain copy of what the reconcile reads, without managedFields and kopf's annotations
    (they can be larger than the rest, and the indexes hold every object)."""
    out = copy.deepcopy({k: body[k] for k in keys if k in body})
    meta = out.get("metadata", {})
    meta.pop("managedFields", None)
    meta.pop("annotations", None)
    return out


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = CLEANUP_FINALIZER
    settings.posting.level = logging.WARNING  # the operator posts its own Events on transitions
    # The API server or etcd restarting must not end the operator: a watch that breaks is made
    # again after reconnect_backoff (a 410 Gone, a resourceVersion etcd compacted away, restarts it
    # from a fresh list), a request that fails is retried for about five minutes before kopf gives up,
    # and no request waits on a dead connection longer than its timeouts.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.watching.reconnect_backoff = 1.0
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    settings.networking.error_backoffs = API_ERROR_BACKOFFS
    CONTROLLER.start()


@kopf.on.cleanup()
async def shutdown(**_: Any) -> None:
    await CONTROLLER.stop()


@kopf.index(*LLMRUNS)
def llmruns_by_key(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): _plain(body)}


@kopf.index(*PYTORCHJOBS, labels={LABEL_RUN: kopf.PRESENT})
def pytorchjobs_by_run(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    job = _plain(body, ("kind", "metadata", "status"))
    job["spec"] = {"runPolicy": copy.deepcopy(body.get("spec", {}).get("runPolicy", {}))}
    return {(namespace, labels[LABEL_RUN]): job}


@kopf.index(*TRAINJOBS, labels={LABEL_RUN: kopf.PRESENT})
def trainjobs_by_run(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    job = _plain(body, ("kind", "metadata", "status"))
    job["spec"] = {"suspend": body.get("spec", {}).get("suspend")}
    return {(namespace, labels[LABEL_RUN]): job}


@kopf.index(*RAYSERVICES, labels={LABEL_RUN: kopf.PRESENT})
def rayservices_by_run(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_RUN]): _plain(body, ("metadata", "spec", "status"))}


def _attach(kwargs: dict[str, Any]) -> None:
    if CONTROLLER.runs is None:
        CONTROLLER.attach(
            kwargs["llmruns_by_key"],
            kwargs["pytorchjobs_by_run"],
            kwargs["rayservices_by_run"],
            kwargs.get("trainjobs_by_run"),
        )


@kopf.on.event(*LLMRUNS)
async def llmrun_event(namespace: str, name: str, type: str | None, **kwargs: Any) -> None:
    _attach(kwargs)
    CONTROLLER.enqueue((namespace, name))


@kopf.on.event(*PYTORCHJOBS, labels={LABEL_RUN: kopf.PRESENT})
async def pytorchjob_event(namespace: str, labels: kopf.Labels, **kwargs: Any) -> None:
    _attach(kwargs)
    CONTROLLER.enqueue((namespace, labels[LABEL_RUN]))


@kopf.on.event(*TRAINJOBS, labels={LABEL_RUN: kopf.PRESENT})
async def trainjob_event(namespace: str, labels: kopf.Labels, **kwargs: Any) -> None:
    _attach(kwargs)
    CONTROLLER.enqueue((namespace, labels[LABEL_RUN]))


@kopf.on.event(*RAYSERVICES, labels={LABEL_RUN: kopf.PRESENT})
async def rayservice_event(namespace: str, labels: kopf.Labels, **kwargs: Any) -> None:
    _attach(kwargs)
    CONTROLLER.enqueue((namespace, labels[LABEL_RUN]))


@kopf.on.event(*WORKLOADS)
async def workload_event(namespace: str, meta: kopf.Meta, **kwargs: Any) -> None:
    """Kueue admitted, evicted or re-described a Workload: queue the run whose stage job owns it."""
    _attach(kwargs)
    owners = {
        o.get("name")
        for o in meta.get("ownerReferences") or []
        if o.get("kind") in ("PyTorchJob", "TrainJob")
    }
    if owners:
        run = CONTROLLER.run_of_job(namespace, owners)
        if run is not None:
            CONTROLLER.enqueue((namespace, run))


def _cleanup_requested(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("storage") or {}).get("cleanupOnDelete"))


@kopf.on.delete(*LLMRUNS, when=_cleanup_requested)
async def delete_run_files(
    spec: kopf.Spec, namespace: str, name: str, uid: str, body: kopf.Body, **_: Any
) -> None:
    """storage.cleanupOnDelete: remove `<storage.uri>/` before the LLMRun goes, with a Job in the
    run's namespace that uses the run's own credentials (children/cleanup.py), and only where the tenancy
    policy lets the namespace write (the URI of a run that never ran may point anywhere). Returns
    once the Job has succeeded; until then kopf keeps the finalizer and calls again."""
    if namespace in CONTROLLER.settings.ignored_namespaces:
        return
    uri = (spec.get("storage") or {}).get("uri", "")
    if not storage.is_s3(uri):
        log.info("%s/%s: storage %r is not s3://, nothing to delete from a pod", namespace, name, uri)
        return
    refusal = ""
    try:
        parsed = parse_spec(dict(spec))
    except SpecError as err:
        refusal = f"kept {uri}: the spec is invalid ({err})"
    else:
        if not CONTROLLER.settings.policy.current().may_write(namespace, uri):
            refusal = f"kept {uri}: it is outside the storage prefixes of namespace {namespace}"
    if refusal:
        kopf.warn(body, reason="CleanupRefused", message=refusal)
        log.warning("%s/%s: %s", namespace, name, refusal)
        return
    job = cleanup_job(RunRef(name, namespace, uid), parsed)
    outcome = await asyncio.to_thread(_run_cleanup_job, job)
    if outcome == "Complete":
        log.info("%s/%s: deleted the files under %s", namespace, name, uri)
        return
    if outcome == "Failed":
        kopf.warn(body, reason="CleanupFailed", message=f"job {job['metadata']['name']} failed; trying again")
        raise kopf.TemporaryError(f"cleanup job for {uri} failed; a new one starts", delay=30)
    raise kopf.TemporaryError(f"deleting {uri} (job {job['metadata']['name']})", delay=3)


def _run_cleanup_job(job: dict[str, Any]) -> str:
    """Creates `job` unless it exists; its outcome so far (a failed one is deleted, to start anew)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    batch = client.BatchV1Api(CONTROLLER.api())
    meta = job["metadata"]
    try:
        existing = batch.read_namespaced_job(meta["name"], meta["namespace"]).to_dict()
    except ApiException as err:
        if err.status != 404:
            raise
        batch.create_namespaced_job(meta["namespace"], job)
        return ""
    outcome = job_outcome(existing)
    if outcome == "Failed":
        batch.delete_namespaced_job(meta["name"], meta["namespace"], propagation_policy="Background")
    return outcome


# LLMSweeps have their own indexes, handlers and reconcile loop in the same operator (sweep/handlers.py).
from nanorun.operator.sweep import handlers as sweep_handlers  # noqa: E402, F401
