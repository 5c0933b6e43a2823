"""The reconcile loop of LLMRuns, on the work queue both loops share (workqueue.py: deduplicated
keys, one reconcile per run at a time, a periodic resync, a growing delay after errors), and the API
calls that carry out each decision.

A reconcile takes a snapshot of the run and its children from kopf's indexes, runs the pure
`reconcile()` in a worker thread, and applies it: creates (409 = already there), patches, status,
Events, metrics. Errors (API, storage) are logged, counted and retried; they never stop the loop.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nanorun.operator import metrics, names
from nanorun.operator.api import GROUP, PLURAL, VERSION, parse_spec
from nanorun.operator.api.tenancy import PolicySource
from nanorun.operator.children import kueue
from nanorun.operator.children.launchers import LAUNCHERS, launcher_of
from nanorun.operator.children.network import NetworkSettings, network_policies
from nanorun.operator.loop.workqueue import Key, WorkQueue
from nanorun.operator.names import (
    LABEL_ATTEMPT,
    LABEL_RUN,
    LABEL_STAGE,
    LABEL_SWEEP,
    RAYSERVICE_GROUP,
    RAYSERVICE_PLURAL,
    RAYSERVICE_VERSION,
)
from nanorun.operator.reconcile.decision import Decision, Event, FailureFacts
from nanorun.operator.reconcile.failures import LOG_TAIL_BYTES, LOG_TAIL_LINES, failure_facts
from nanorun.operator.reconcile.run import reconcile
from nanorun.operator.reconcile.status import now_utc, parse_time, rfc3339
from nanorun.operator.run_ref import RunRef
from nanorun.pipeline import liveness
from nanorun.pipeline import progress as stage_files

log = logging.getLogger("nanorun.operator")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


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
    network: NetworkSettings = field(default_factory=NetworkSettings.from_env)
    # Namespaces whose LLMRuns and LLMSweeps the operator leaves alone: the cluster's own.
    ignored_namespaces: frozenset[str] = field(
        default_factory=lambda: (
            frozenset(os.environ.get("NANORUN_IGNORED_NAMESPACES", ",".join(SYSTEM_NAMESPACES)).split(","))
            - {""}
        )
    )


REQUEST_TIMEOUT = (10.0, 60.0)  # seconds to connect, seconds between bytes of the answer


def api_client():
    """A kubernetes ApiClient from the in-cluster service account, else KUBECONFIG."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = 64
    api = client.ApiClient(configuration)
    # The client waits forever by default: a call to an API server that restarts or vanishes behind a
    # dead connection would hold its reconcile worker for good. Every call gets REQUEST_TIMEOUT
    # unless it asks for its own; the reconcile fails and is retried with the error backoff.
    plain = api.rest_client.request

    def request(*args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
        return plain(*args, _request_timeout=_request_timeout or REQUEST_TIMEOUT, **kwargs)

    api.rest_client.request = request
    return api


class StorageUnavailable(RuntimeError):
    """The run's storage could not be read; the reconcile went on without it and is retried."""


def _status_code(err: Exception) -> int | None:
    return getattr(err, "status", None)


def unless_status(status: int, call: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Makes the API call; False when the server answered `status` instead (409 on a create: it is
    already there; 404 on a delete: it is already gone), which is then no error."""
    try:
        call(*args, **kwargs)
    except Exception as err:
        if _status_code(err) != status:
            raise
        return False
    return True


TRAINJOB_RECHECK_SECONDS = 30.0  # how long the answer "is the TrainJob CRD served?" is kept


class Controller(WorkQueue):
    """One per operator process. Indexes are kopf's read-only live views, attached on first use."""

    kind = "LLMRun"

    def __init__(self, settings: Settings | None = None) -> None:
        settings = settings or Settings()
        super().__init__(settings, settings.workers)
        self.runs: Mapping[Key, Any] | None = None
        self.jobs: Mapping[Key, Any] | None = None
        self.trainjobs: Mapping[Key, Any] | None = None
        self.rayservices: Mapping[Key, Any] | None = None
        self._trainjob_served: tuple[float, bool] | None = None  # (when asked, answer)
        self._api = None
        self._api_client = None

    # --- wiring ---------------------------------------------------------------------------------

    def attach(
        self, runs: Mapping, jobs: Mapping, rayservices: Mapping, trainjobs: Mapping | None = None
    ) -> None:
        self.runs, self.jobs, self.rayservices, self.trainjobs = runs, jobs, rayservices, trainjobs

    def objects(self) -> Mapping[Key, Any] | None:
        return self.runs

    def run_of_job(self, namespace: str, job_names: set[str]) -> str | None:
        """The run one of these stage jobs belongs to (from the jobs indexes), if any."""
        for index in (self.jobs, self.trainjobs):
            for (ns, run), jobs in (index or {}).items():
                if ns == namespace and any(j["metadata"].get("name") in job_names for j in jobs):
                    return run
        return None

    def start(self) -> None:
        self._clients()
        super().start()

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

    # --- one reconcile --------------------------------------------------------------------------

    def snapshot(self, key: Key) -> tuple:
        """Copies of the run's stage jobs of every kind (PyTorchJobs and TrainJobs) and its RayService."""
        jobs = [
            copy.deepcopy(j)
            for index in (self.jobs, self.trainjobs)
            if index is not None
            for j in index.get(key, [])
        ]
        rs_store = self.rayservices.get(key, []) if self.rayservices is not None else []
        return jobs, copy.deepcopy(next(iter(rs_store), None))

    def handle(self, key: Key, body: dict[str, Any], jobs: list, rayservice: dict | None) -> float | None:
        decision = self._decide_and_apply(key, body, jobs, rayservice)
        invalid = any(
            c.get("reason") == "InvalidSpec" and c.get("status") == "True"
            for c in decision.status.get("conditions", [])
        )
        result = "invalid" if invalid else "requeue" if decision.requeue_after else "ok"
        metrics.RECONCILES.labels(result=result).inc()
        return decision.requeue_after

    def forget(self, key: Key) -> None:
        metrics.forget_run(*key)

    def failed(self, key: Key, err: Exception) -> None:
        metrics.RECONCILE_ERRORS.inc()
        metrics.RECONCILES.labels(result="error").inc()

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

        def read_heartbeats(stage: str, attempt: int):
            # Heartbeats storage cannot give are no evidence of a stall: none, and retry later.
            try:
                return liveness.read_heartbeats(uri, stage, attempt)
            except Exception as err:
                storage_errors.append(f"reading the heartbeats of {uri}/{stage}: {err}")
                return []

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
            read_heartbeats,
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
        if d.create_jobs or d.create_rayservice is not None:
            self._apply_network_policies(run, body)
        for manifest, event in d.create_jobs:
            launcher = launcher_of(manifest)
            if not unless_status(
                409,
                api.create_namespaced_custom_object,
                launcher.group,
                launcher.version,
                run.namespace,
                launcher.plural,
                manifest,
            ):
                continue  # already there: a previous reconcile (or operator process) created it
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
            unless_status(
                404,
                api.delete_namespaced_custom_object,
                launcher.group,
                launcher.version,
                run.namespace,
                launcher.plural,
                job,
                propagation_policy="Background",
            )
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
        if d.create_rayservice is not None and not unless_status(
            409, api.create_namespaced_custom_object, *rs, d.create_rayservice
        ):
            d.events = [e for e in d.events if e.reason != "ServingCreated"]  # it was already there
        if d.patch_rayservice is not None:
            name = d.status["serving"]["rayService"]
            api.patch_namespaced_custom_object(*rs, name, d.patch_rayservice)
        if d.delete_rayservice is not None:
            unless_status(404, api.delete_namespaced_custom_object, *rs, d.delete_rayservice)

    def _apply_network_policies(self, run: RunRef, body: dict[str, Any]) -> None:
        """The run's NetworkPolicies (children/network.py), in place before its pods are: created, or brought
        to the admin's current settings where they exist."""
        policies = network_policies(run, parse_spec(body.get("spec") or {}), self.settings.network)
        if not policies:
            return
        from kubernetes import client

        self._clients()
        net = client.NetworkingV1Api(self._api_client)
        for policy in policies:
            if not unless_status(409, net.create_namespaced_network_policy, run.namespace, policy):
                net.patch_namespaced_network_policy(
                    policy["metadata"]["name"], run.namespace, {"spec": policy["spec"]}
                )

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
        self.wrote(key, patched)

    def _post_event(self, run: RunRef, event: Event) -> None:
        now = rfc3339(now_utc())
        body = event.to_object("LLMRun", run, now)
        try:
            self._clients()[1].create_namespaced_event(run.namespace, body)
        except Exception as err:  # an Event is best effort: never fail a reconcile over one
            log.info("could not post event %s for %s/%s: %s", event.reason, run.namespace, run.name, err)
