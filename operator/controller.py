"""The reconcile loop: a work queue of LLMRuns, workers that reconcile one at a time per run, and
the API calls that carry out each decision.

kopf feeds it (see handlers.py): every watch event of an LLMRun or of one of its children queues
that run (deduplicated), a resync queues every run periodically (progress files change without
events), and a retry due after a backoff queues it at that time. A worker takes a snapshot of the
run and its children from kopf's indexes, runs the pure `reconcile()` in a thread, and applies it:
creates (409 = already there), patches, status, Events, metrics. Errors (API, storage) are logged,
counted and retried with a growing delay; they never stop the loop.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nanorun.operator import kueue, metrics, names
from nanorun.operator.api import GROUP, PLURAL, VERSION
from nanorun.operator.jobs import CONTAINER_NAME, RunRef
from nanorun.operator.launchers import LAUNCHERS, launcher_of
from nanorun.operator.names import (
    LABEL_ATTEMPT,
    LABEL_RUN,
    LABEL_STAGE,
    LABEL_SWEEP,
    RAYSERVICE_GROUP,
    RAYSERVICE_PLURAL,
    RAYSERVICE_VERSION,
)
from nanorun.operator.reconcile import Decision, Event, FailureFacts, reconcile
from nanorun.operator.status import now_utc, parse_time, rfc3339
from nanorun.operator.tenancy import PolicySource
from nanorun.pipeline import progress as stage_files

log = logging.getLogger("nanorun.operator")

Key = tuple[str, str]  # (namespace, name)


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def newest_body(indexed: dict[str, Any], written: dict[str, Any] | None) -> dict[str, Any]:
    """The newer of kopf's indexed body and the one a status patch returned: `written` when it is
    the same object (uid) at a higher resourceVersion, as a patch lands before its watch event."""
    if written is not None and written["metadata"].get("uid") == indexed["metadata"].get("uid"):
        try:
            if int(written["metadata"]["resourceVersion"]) > int(indexed["metadata"]["resourceVersion"]):
                return written
        except (KeyError, ValueError):
            pass
    return indexed


SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")


@dataclass
class Settings:
    resync_seconds: float = field(default_factory=lambda: _env_float("NANORUN_RESYNC_SECONDS", 15.0))
    # Reconciles mostly wait on the API server and storage, so more threads than cores pay off.
    workers: int = field(default_factory=lambda: int(_env_float("NANORUN_WORKERS", 48)))
    error_backoff_seconds: float = field(
        default_factory=lambda: _env_float("NANORUN_ERROR_BACKOFF_SECONDS", 5.0)
    )
    max_error_backoff_seconds: float = 300.0
    policy: PolicySource = field(default_factory=PolicySource)
    # Namespaces whose LLMRuns and LLMSweeps the operator leaves alone: the cluster's own.
    ignored_namespaces: frozenset[str] = field(
        default_factory=lambda: (
            frozenset(os.environ.get("NANORUN_IGNORED_NAMESPACES", ",".join(SYSTEM_NAMESPACES)).split(","))
            - {""}
        )
    )


def api_client():
    """A kubernetes ApiClient from the in-cluster service account, else KUBECONFIG."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = 64
    return client.ApiClient(configuration)


class StorageUnavailable(RuntimeError):
    """The run's storage could not be read; the reconcile went on without it and is retried."""


def _status_code(err: Exception) -> int | None:
    return getattr(err, "status", None)


LOG_TAIL_LINES = 20
LOG_TAIL_BYTES = 16384  # a pod's lines can be any length; the operator reads no more than this
SIGTERM_EXIT = 143  # 128 + 15: the process ended on the SIGTERM a pod deletion or eviction sends
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # a TrainJob pod's node rank
TRAINJOB_RECHECK_SECONDS = 30.0  # how long the answer "is the TrainJob CRD served?" is kept


def _rank0(pod: Any) -> bool:
    """Rank 0's pod: a PyTorchJob's Master, or the TrainJob pod of completion index 0."""
    labels = (pod.metadata.labels or {}) if pod.metadata else {}
    return "master" in pod.metadata.name or labels.get(COMPLETION_INDEX) == "0"


def failure_facts(pods: list[Any], read_log: Any, container: str = CONTAINER_NAME) -> FailureFacts:
    """FailureFacts from a failed job's pods (kubernetes client V1Pod objects); `container` is the
    trainer container's name (the launcher's)."""
    failed: list[tuple[Any, int]] = []
    active = tuple(
        sorted(
            p.metadata.name
            for p in pods
            if (p.status.phase if p.status else "") not in ("Succeeded", "Failed")
        )
    )
    if active:
        return FailureFacts(active=active)
    for pod in pods:
        name = pod.metadata.name
        for c in (pod.status.conditions or []) if pod.status else []:
            if c.type == "DisruptionTarget" and c.status == "True":
                return FailureFacts(
                    disruption=f"pod {name}: DisruptionTarget ({c.reason or 'unknown reason'})"
                )
        for cs in (pod.status.container_statuses or []) if pod.status else []:
            term = cs.state.terminated if cs.state else None
            if cs.name != container or term is None:
                continue
            if term.exit_code == SIGTERM_EXIT:
                return FailureFacts(disruption=f"pod {name}: exited {SIGTERM_EXIT} (SIGTERM)")
            if term.exit_code:
                failed.append((pod, term.exit_code))
    # Rank 0's log first (the Master): a Worker usually fails because the Master did.
    failed.sort(key=lambda pf: not _rank0(pf[0]))
    for pod, code in failed:
        try:
            text = read_log(pod) or ""
        except Exception as err:  # the log is a help, not a requirement
            log.info("could not read the log of %s: %s", pod.metadata.name, err)
            continue
        return FailureFacts(log_tail=f"[{pod.metadata.name}, exit {code}]\n{text.strip()}")
    return FailureFacts()


class Controller:
    """One per operator process. Indexes are kopf's read-only live views, attached on first use."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.runs: Mapping[Key, Any] | None = None
        self.jobs: Mapping[Key, Any] | None = None
        self.trainjobs: Mapping[Key, Any] | None = None
        self.rayservices: Mapping[Key, Any] | None = None
        self._trainjob_served: tuple[float, bool] | None = None  # (when asked, answer)
        self._queue: asyncio.Queue[Key] | None = None
        self._queued: set[Key] = set()
        self._locks: dict[Key, asyncio.Lock] = {}
        self._errors: dict[Key, int] = {}
        self._written: dict[Key, dict[str, Any]] = {}  # newest body we patched, until the index catches up
        self._tasks: list[asyncio.Task] = []
        self._api = None
        self._api_client = None
        self._pool: ThreadPoolExecutor | None = None

    # --- wiring ---------------------------------------------------------------------------------

    def attach(
        self, runs: Mapping, jobs: Mapping, rayservices: Mapping, trainjobs: Mapping | None = None
    ) -> None:
        self.runs, self.jobs, self.rayservices, self.trainjobs = runs, jobs, rayservices, trainjobs

    def _stage_jobs(self, key: Key) -> list[dict[str, Any]]:
        """Copies of a run's stage jobs of every kind (PyTorchJobs and TrainJobs)."""
        return [
            copy.deepcopy(j)
            for index in (self.jobs, self.trainjobs)
            if index is not None
            for j in index.get(key, [])
        ]

    def run_of_job(self, namespace: str, job_names: set[str]) -> str | None:
        """The run one of these stage jobs belongs to (from the jobs indexes), if any."""
        for index in (self.jobs, self.trainjobs):
            for (ns, run), jobs in (index or {}).items():
                if ns == namespace and any(j["metadata"].get("name") in job_names for j in jobs):
                    return run
        return None

    def start(self) -> None:
        self._clients()
        self._queue = asyncio.Queue()
        self._pool = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="reconcile")
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.settings.workers)]
        self._tasks.append(asyncio.create_task(self._resync()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _clients(self):
        """(CustomObjectsApi, CoreV1Api), made once: the first import of the API modules takes
        seconds, which must not land on the first run's reconcile."""
        if self._api is None:
            from kubernetes import client

            api = api_client()
            self._api_client = api
            self._api = (client.CustomObjectsApi(api), client.CoreV1Api(api))
        return self._api

    def api(self):
        """The kubernetes ApiClient the controller's clients share."""
        self._clients()
        return self._api_client

    def enqueue(self, key: Key) -> None:
        if key[0] in self.settings.ignored_namespaces:
            return
        if self._queue is not None and key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def enqueue_later(self, key: Key, seconds: float) -> None:
        asyncio.get_running_loop().call_later(max(0.0, seconds), self.enqueue, key)

    # --- the loop -------------------------------------------------------------------------------

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            if self.runs is None:
                continue
            for key in list(self.runs.keys()):
                self.enqueue(key)

    async def _worker(self, n: int) -> None:
        assert self._queue is not None
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            lock = self._locks.setdefault(key, asyncio.Lock())
            async with lock:
                await self._reconcile_key(key)

    def _body(self, key: Key) -> dict[str, Any] | None:
        """The newest body of a run: kopf's index, or what we last wrote if that is newer."""
        store = self.runs.get(key) if self.runs is not None else None
        indexed = next(iter(store), None) if store else None
        written = self._written.get(key)
        if indexed is None:
            return None
        if newest_body(indexed, written) is written:
            return written
        self._written.pop(key, None)
        return indexed

    async def _reconcile_key(self, key: Key) -> None:
        body = self._body(key)
        if body is None:  # deleted
            metrics.forget_run(*key)
            self._errors.pop(key, None)
            self._locks.pop(key, None)
            return
        jobs = self._stage_jobs(key)
        rs_store = self.rayservices.get(key, []) if self.rayservices is not None else []
        rayservice = copy.deepcopy(next(iter(rs_store), None))
        try:
            loop = asyncio.get_running_loop()
            decision = await loop.run_in_executor(
                self._pool, self._decide_and_apply, key, body, jobs, rayservice
            )
        except Exception as err:  # API or storage trouble: count it, retry later with a growing delay
            n = self._errors[key] = self._errors.get(key, 0) + 1
            delay = min(
                self.settings.max_error_backoff_seconds, self.settings.error_backoff_seconds * 2 ** (n - 1)
            )
            metrics.RECONCILE_ERRORS.inc()
            metrics.RECONCILES.labels(result="error").inc()
            log.warning("reconcile of %s/%s failed (retry in %.0fs): %s", *key, delay, err)
            self.enqueue_later(key, delay)
            return
        self._errors.pop(key, None)
        invalid = any(
            c.get("reason") == "InvalidSpec" and c.get("status") == "True"
            for c in decision.status.get("conditions", [])
        )
        result = "invalid" if invalid else "requeue" if decision.requeue_after else "ok"
        metrics.RECONCILES.labels(result=result).inc()
        if decision.requeue_after:
            self.enqueue_later(key, decision.requeue_after + 0.05)

    # --- applying a decision (runs in a worker thread) -----------------------------------------

    def _decide_and_apply(
        self, key: Key, body: dict[str, Any], jobs: list[dict[str, Any]], rayservice: dict[str, Any] | None
    ) -> Decision:
        namespace, name = key
        meta = body["metadata"]
        run = RunRef(name=name, namespace=namespace, uid=meta.get("uid", ""))
        uri = ((body.get("spec") or {}).get("storage") or {}).get("uri", "")

        storage_errors: list[str] = []

        def read_stage(stage: str):
            # Storage trouble must not stop the pipeline: decide without the files, retry later.
            try:
                return stage_files.read_progress(uri, stage), stage_files.read_done(uri, stage)
            except Exception as err:
                storage_errors.append(f"reading {uri}/{stage}: {err}")
                return None, None

        t0 = time.perf_counter()
        decision = reconcile(
            run,
            body,
            jobs,
            rayservice,
            read_stage,
            now_utc(),
            self._inspect_failure,
            self._admission_of,
            self._trainjob_crd_served(),
            self.settings.policy.current(),
        )
        t1 = time.perf_counter()
        self._apply_children(run, body, decision, jobs)
        t2 = time.perf_counter()
        self._apply_status(key, body, decision)
        t3 = time.perf_counter()
        for event in decision.events:
            self._post_event(run, event)
        log.debug(
            "reconciled %s/%s: decide %.3fs, children %.3fs, status %.3fs, events %.3fs",
            namespace,
            name,
            t1 - t0,
            t2 - t1,
            t3 - t2,
            time.perf_counter() - t3,
        )
        for stage, seconds in decision.finished_stages:
            metrics.STAGE_DURATION.labels(stage=stage).observe(seconds)
        for stage, outcome in decision.ended_attempts:
            metrics.ATTEMPTS_ENDED.labels(stage=stage, outcome=outcome).inc()
        status = decision.status
        metrics.set_stage(
            namespace,
            name,
            status.get("stage", ""),
            status.get("phase", "Pending"),
            sweep=(meta.get("labels") or {}).get(LABEL_SWEEP, ""),
        )
        metrics.set_run_phase(namespace, name, status.get("phase", "Pending"))
        if storage_errors:
            raise StorageUnavailable("; ".join(storage_errors))
        return decision

    def _trainjob_crd_served(self) -> bool:
        """Whether the cluster has Trainer v2's TrainJob CRD (what `compute.launcher: auto` asks),
        looked up again at most every TRAINJOB_RECHECK_SECONDS. An answer the API cannot give counts
        as "no"; a run that has started keeps its launcher anyway (status.launcher)."""
        now = time.monotonic()
        if self._trainjob_served is None or now - self._trainjob_served[0] > TRAINJOB_RECHECK_SECONDS:
            from kubernetes import client

            self._clients()
            try:
                crds = client.ApiextensionsV1Api(self._api_client).list_custom_resource_definition(
                    field_selector=f"metadata.name={names.TRAINJOB_CRD}"
                )
                established = any(
                    c.type == "Established" and c.status == "True"
                    for crd in crds.items
                    for c in (crd.status.conditions or [])
                )
            except Exception as err:
                log.info("could not look up the %s CRD: %s", names.TRAINJOB_CRD, err)
                established = False
            self._trainjob_served = (now, established)
        return self._trainjob_served[1]

    def _inspect_failure(self, job: dict[str, Any]) -> FailureFacts:
        """Read a failed job's pods: any still running or stopping are named (the decision waits for
        them); a disruption (a DisruptionTarget condition — preemption,
        eviction, node loss — or a container that exited 143 on SIGTERM) makes it a preemption;
        otherwise the last log lines of the failed container (the Master's first) explain it.
        Listing the pods may raise (the reconcile is retried); a log that cannot be read is left out."""
        meta = job["metadata"]
        labels = meta.get("labels") or {}
        selector = ",".join(f"{k}={labels.get(k, '')}" for k in (LABEL_RUN, LABEL_STAGE, LABEL_ATTEMPT))
        core = self._clients()[1]
        pods = core.list_namespaced_pod(meta["namespace"], label_selector=selector).items
        container = launcher_of(job).container
        return failure_facts(
            pods,
            lambda pod: core.read_namespaced_pod_log(
                pod.metadata.name,
                pod.metadata.namespace,
                container=container,
                tail_lines=LOG_TAIL_LINES,
                limit_bytes=LOG_TAIL_BYTES,
            ),
            container,
        )

    def _admission_of(self, job: dict[str, Any]) -> kueue.Admission:
        """Kueue's Workload of a job (found by the job-uid label Kueue puts on it). No Workload, or
        no Workload API at all (Kueue not installed: 404), is an empty Admission; the status then
        says that Kueue has made none."""
        meta = job["metadata"]
        try:
            found = self._clients()[0].list_namespaced_custom_object(
                names.WORKLOAD_GROUP,
                names.WORKLOAD_VERSION,
                meta["namespace"],
                names.WORKLOAD_PLURAL,
                label_selector=f"{names.JOB_UID_LABEL}={meta.get('uid', '')}",
            )
        except Exception as err:
            if _status_code(err) == 404:
                return kueue.Admission()
            raise
        items = sorted(found.get("items") or [], key=lambda w: w["metadata"].get("creationTimestamp", ""))
        return kueue.admission_of(items[-1] if items else None)

    def _apply_children(
        self, run: RunRef, body: dict[str, Any], d: Decision, jobs: list[dict[str, Any]]
    ) -> None:
        api = self._clients()[0]
        for manifest, event in d.create_jobs:
            launcher = launcher_of(manifest)
            try:
                api.create_namespaced_custom_object(
                    launcher.group, launcher.version, run.namespace, launcher.plural, manifest
                )
            except Exception as err:
                if _status_code(err) == 409:
                    continue  # already there: a previous reconcile (or operator process) created it
                raise
            self._post_event(run, event)
            if manifest["metadata"]["labels"].get(LABEL_ATTEMPT) == "1" and not any(
                (r.get("attempts") or 0) > 0 for r in ((body.get("status") or {}).get("stages") or [])
            ):
                created = parse_time(body["metadata"].get("creationTimestamp"))
                if created is not None:
                    metrics.TIME_TO_FIRST_JOB.observe(max(0.0, (now_utc() - created).total_seconds()))
        # A decision names jobs it patches or deletes; their kind is the observed job's.
        kinds = {j["metadata"]["name"]: launcher_of(j) for j in jobs}
        for job, patch in d.patch_jobs:
            launcher = kinds.get(job, LAUNCHERS["PyTorchJob"])
            api.patch_namespaced_custom_object(
                launcher.group, launcher.version, run.namespace, launcher.plural, job, patch
            )
        for job in d.delete_jobs:
            launcher = kinds.get(job, LAUNCHERS["PyTorchJob"])
            try:
                api.delete_namespaced_custom_object(
                    launcher.group,
                    launcher.version,
                    run.namespace,
                    launcher.plural,
                    job,
                    propagation_policy="Background",
                )
            except Exception as err:
                if _status_code(err) != 404:
                    raise
        for workload, patch in d.patch_workloads:
            api.patch_namespaced_custom_object(
                names.WORKLOAD_GROUP,
                names.WORKLOAD_VERSION,
                run.namespace,
                names.WORKLOAD_PLURAL,
                workload,
                patch,
            )
        rs = (RAYSERVICE_GROUP, RAYSERVICE_VERSION, run.namespace, RAYSERVICE_PLURAL)
        if d.create_rayservice is not None:
            try:
                api.create_namespaced_custom_object(*rs, d.create_rayservice)
            except Exception as err:
                if _status_code(err) != 409:
                    raise
                d.events = [e for e in d.events if e.reason != "ServingCreated"]  # it was already there
        if d.patch_rayservice is not None:
            name = d.status["serving"]["rayService"]
            api.patch_namespaced_custom_object(*rs, name, d.patch_rayservice)
        if d.delete_rayservice is not None:
            try:
                api.delete_namespaced_custom_object(*rs, d.delete_rayservice)
            except Exception as err:
                if _status_code(err) != 404:
                    raise

    def _apply_status(self, key: Key, body: dict[str, Any], d: Decision) -> None:
        old = body.get("status") or {}
        new = dict(d.status)
        # A merge patch keeps keys it does not mention; null removes the ones we no longer set.
        for managed in ("loss", "eta", "checkpoint", "progress", "stage"):
            new.setdefault(managed, None)
        if all(old.get(k) == v for k, v in new.items() if v is not None) and all(
            k not in old for k, v in new.items() if v is None
        ):
            return
        patched = self._clients()[0].patch_namespaced_custom_object_status(
            GROUP, VERSION, key[0], PLURAL, key[1], {"status": new}
        )
        self._written[key] = patched

    def _post_event(self, run: RunRef, event: Event) -> None:
        now = rfc3339(now_utc())
        body = event.to_object("LLMRun", run, now)
        try:
            self._clients()[1].create_namespaced_event(run.namespace, body)
        except Exception as err:  # an Event is best effort: never fail a reconcile over one
            log.info("could not post event %s for %s/%s: %s", event.reason, run.namespace, run.name, err)
