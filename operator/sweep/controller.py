"""The reconcile loop of LLMSweeps, on the work queue both loops share (loop/workqueue.py): each reconcile
takes the sweep and its children from kopf's indexes, runs the pure `reconcile_sweep()` in a thread
and applies it: writes `sweep.json` once, creates child LLMRuns and the report job (409 = already
there), patches the children's `spec.suspend` as the sweep asks, patches the status, posts Events.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

from nanorun.operator import metrics
from nanorun.operator.api import GROUP, PLURAL, VERSION
from nanorun.operator.children import launchers
from nanorun.operator.loop.controller import Settings, api_client, unless_status
from nanorun.operator.loop.workqueue import Key, WorkQueue
from nanorun.operator.reconcile.decision import Event
from nanorun.operator.reconcile.status import now_utc, rfc3339
from nanorun.operator.run_ref import RunRef
from nanorun.operator.sweep.api import KIND
from nanorun.operator.sweep.api import PLURAL as SWEEP_PLURAL
from nanorun.operator.sweep.reconcile import SweepDecision, reconcile_sweep
from nanorun.pipeline import progress
from nanorun.pipeline import sweep as sweep_files

log = logging.getLogger("nanorun.operator.sweep")


class SweepController(WorkQueue):
    """One per operator process; the indexes are kopf's live views, attached on first use."""

    kind = "LLMSweep"

    def __init__(self, settings: Settings | None = None, workers: int = 4) -> None:
        super().__init__(settings or Settings(), workers)
        self.sweeps: Mapping[Key, Any] | None = None
        self.runs: Mapping[Key, Any] | None = None
        self.jobs: list[Mapping[Key, Any]] = []  # one index per kind of job (PyTorchJob, TrainJob)
        self._manifests: set[tuple[str, str]] = set()  # (uid, sweep dir) whose sweep.json is written
        self._api = None

    def attach(self, sweeps: Mapping, runs: Mapping, *jobs: Mapping | None) -> None:
        self.sweeps, self.runs, self.jobs = sweeps, runs, [j for j in jobs if j is not None]

    def objects(self) -> Mapping[Key, Any] | None:
        return self.sweeps

    def snapshot(self, key: Key) -> tuple:
        """Copies of the sweep's child LLMRuns and jobs (its report job)."""
        runs = [copy.deepcopy(r) for r in (self.runs or {}).get(key, [])]
        jobs = [copy.deepcopy(j) for index in self.jobs for j in index.get(key, [])]
        return runs, jobs

    def handle(self, key: Key, body: dict[str, Any], runs: list, jobs: list) -> None:
        self._decide_and_apply(key, body, runs, jobs)

    def forget(self, key: Key) -> None:
        metrics.set_sweep_points(*key, {})

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
        for manifest in d.create_runs:  # 409: an earlier reconcile created it
            unless_status(
                409, api.create_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, manifest
            )
        for child, patch in d.patch_runs:  # the sweep's spec.suspend, passed on to its runs
            api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, child, patch)
        for manifest in d.create_jobs:  # a PyTorchJob or a TrainJob (reconcile.report_launcher)
            kind = launchers.LAUNCHERS[manifest["kind"]]
            unless_status(
                409,
                api.create_namespaced_custom_object,
                kind.group,
                kind.version,
                namespace,
                kind.plural,
                manifest,
            )
        old = body.get("status") or {}
        new = dict(d.status)
        if any(old.get(k) != v for k, v in new.items()):  # a None removes the key (merge patch)
            self.wrote(
                key,
                api.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, SWEEP_PLURAL, name, {"status": new}
                ),
            )
        for event in d.events:
            self._post_event(sweep, event)
        metrics.set_sweep_points(namespace, name, {p["name"]: p["phase"] for p in d.status.get("points", [])})
        return d

    def _post_event(self, sweep: RunRef, event: Event) -> None:
        now = rfc3339(now_utc())
        body = event.to_object(KIND, sweep, now)
        try:
            self._clients()[1].create_namespaced_event(sweep.namespace, body)
        except Exception as err:  # best effort
            log.info(
                "could not post event %s for sweep %s/%s: %s", event.reason, sweep.namespace, sweep.name, err
            )
