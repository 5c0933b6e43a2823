"""The reconcile loop of LLMSweeps: a de-duplicated work queue of sweeps, fed by the watch events of
the sweeps and of their children (sweep_handlers.py) and by a periodic resync; each reconcile takes
the sweep and its children from kopf's indexes, runs the pure `reconcile_sweep()` in a thread and
applies it: writes `sweep.json` once, creates child LLMRuns and the report job (409 = already there),
patches the children's `spec.suspend` as the sweep's asks, patches the status, posts Events. API and storage errors are logged and retried with a growing delay.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nanorun.operator import launchers, metrics
from nanorun.operator.api import GROUP, PLURAL, VERSION
from nanorun.operator.controller import Settings, _status_code, api_client, newest_body
from nanorun.operator.jobs import RunRef
from nanorun.operator.reconcile import Event
from nanorun.operator.status import now_utc, rfc3339
from nanorun.operator.sweep import KIND
from nanorun.operator.sweep import PLURAL as SWEEP_PLURAL
from nanorun.operator.sweep_reconcile import SweepDecision, reconcile_sweep
from nanorun.pipeline import progress
from nanorun.pipeline import sweep as sweep_files

log = logging.getLogger("nanorun.operator.sweep")
Key = tuple[str, str]


class SweepController:
    """One per operator process; the indexes are kopf's live views, attached on first use."""

    def __init__(self, settings: Settings | None = None, workers: int = 4) -> None:
        self.settings = settings or Settings()
        self.workers = workers
        self.sweeps: Mapping[Key, Any] | None = None
        self.runs: Mapping[Key, Any] | None = None
        self.jobs: list[Mapping[Key, Any]] = []  # one index per kind of job (PyTorchJob, TrainJob)
        self._queue: asyncio.Queue[Key] | None = None
        self._queued: set[Key] = set()
        self._errors: dict[Key, int] = {}
        self._written: dict[Key, dict[str, Any]] = {}
        self._manifests: set[tuple[str, str]] = set()  # (uid, sweep dir) whose sweep.json is written
        self._tasks: list[asyncio.Task] = []
        self._pool: ThreadPoolExecutor | None = None
        self._api = None

    def attach(self, sweeps: Mapping, runs: Mapping, *jobs: Mapping | None) -> None:
        self.sweeps, self.runs, self.jobs = sweeps, runs, [j for j in jobs if j is not None]

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sweep")
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._resync()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def enqueue(self, key: Key) -> None:
        if key[0] in self.settings.ignored_namespaces:
            return
        if self._queue is not None and key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            for key in list((self.sweeps or {}).keys()):
                self.enqueue(key)

    async def _worker(self) -> None:
        assert self._queue is not None
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            body = self._body(key)
            if body is None:  # deleted
                self._errors.pop(key, None)
                metrics.set_sweep_points(*key, {})
                continue
            runs = [copy.deepcopy(r) for r in (self.runs or {}).get(key, [])]
            jobs = [copy.deepcopy(j) for index in self.jobs for j in index.get(key, [])]
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._decide_and_apply, key, body, runs, jobs
                )
            except Exception as err:  # API or storage trouble: retry with a growing delay
                n = self._errors[key] = self._errors.get(key, 0) + 1
                delay = min(
                    self.settings.max_error_backoff_seconds,
                    self.settings.error_backoff_seconds * 2 ** (n - 1),
                )
                log.warning("reconcile of sweep %s/%s failed (retry in %.0fs): %s", *key, delay, err)
                asyncio.get_running_loop().call_later(delay, self.enqueue, key)
            else:
                self._errors.pop(key, None)

    def _body(self, key: Key) -> dict[str, Any] | None:
        store = (self.sweeps or {}).get(key)
        indexed = next(iter(store), None) if store else None
        written = self._written.get(key)
        if indexed is None:
            return None
        if newest_body(indexed, written) is written:
            return written
        self._written.pop(key, None)
        return indexed

    def _clients(self):
        if self._api is None:
            from kubernetes import client

            api = api_client()
            self._api = (client.CustomObjectsApi(api), client.CoreV1Api(api))
        return self._api

    def _decide_and_apply(self, key: Key, body: dict[str, Any], runs: list, jobs: list) -> SweepDecision:
        namespace, name = key
        sweep = RunRef(name=name, namespace=namespace, uid=body["metadata"].get("uid", ""))
        d = reconcile_sweep(
            sweep, body, runs, jobs, progress.read_done, now_utc(), self.settings.policy.current()
        )
        api = self._clients()[0]
        if d.manifest:
            root = (
                ((body.get("spec") or {}).get("template") or {}).get("storage", {}).get("uri", "").rstrip("/")
            )
            if (sweep.uid, root) not in self._manifests:
                sweep_files.write_manifest(root, d.manifest)
                self._manifests.add((sweep.uid, root))
        for manifest in d.create_runs:
            self._create(
                lambda m=manifest: api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, m)
            )
        for child, patch in d.patch_runs:  # the sweep's spec.suspend, passed on to its runs
            api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, child, patch)
        for manifest in d.create_jobs:  # a PyTorchJob or a TrainJob (sweep_reconcile.report_launcher)
            kind = launchers.LAUNCHERS[manifest["kind"]]
            self._create(
                lambda m=manifest, k=kind: api.create_namespaced_custom_object(
                    k.group, k.version, namespace, k.plural, m
                )
            )
        old = body.get("status") or {}
        new = dict(d.status)
        if any(old.get(k) != v for k, v in new.items()):  # a None removes the key (merge patch)
            self._written[key] = api.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, SWEEP_PLURAL, name, {"status": new}
            )
        for event in d.events:
            self._post_event(sweep, event)
        metrics.set_sweep_points(namespace, name, {p["name"]: p["phase"] for p in d.status.get("points", [])})
        return d

    @staticmethod
    def _create(create) -> None:
        try:
            create()
        except Exception as err:
            if _status_code(err) != 409:  # 409: already there (an earlier reconcile created it)
                raise

    def _post_event(self, sweep: RunRef, event: Event) -> None:
        now = rfc3339(now_utc())
        body = event.to_object(KIND, sweep, now)
        try:
            self._clients()[1].create_namespaced_event(sweep.namespace, body)
        except Exception as err:  # best effort
            log.info(
                "could not post event %s for sweep %s/%s: %s", event.reason, sweep.namespace, sweep.name, err
            )
