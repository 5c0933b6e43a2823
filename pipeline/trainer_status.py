"""A stage's progress, reported to Kubeflow Trainer v2 as its TrainJob's `status.trainerStatus`.

Trainer v2.3 (behind its alpha `TrainJobStatus` feature gate) runs a status server beside its
controller and gives every trainer container of a TrainJob three settings (KEP-2779,
github.com/kubeflow/trainer/tree/v2.3.0/proposals/2779-trainjob-progress):

    KUBEFLOW_TRAINER_SERVER_URL      https://<service>.<namespace>.svc:10443/apis/trainer.kubeflow.org/
                                     v1alpha1/namespaces/<ns>/trainjobs/<name>/status
    KUBEFLOW_TRAINER_SERVER_CA_CERT  file of the CA that signed the server's certificate
    KUBEFLOW_TRAINER_SERVER_TOKEN    file of a projected ServiceAccount token whose audience is this
                                     TrainJob (the kubelet rotates it: it is read again for every POST)

The stage contract's writers (`progress.write_progress`, `progress.write_done`) hand every record
to `publish` / `publish_done`; without the settings (a PyTorchJob, `nanorun run`, Trainer without
the gate) both do nothing. With them, rank 0 (the only writer) POSTs

    {"trainerStatus": {"progressPercentage": 45, "estimatedRemainingSeconds": 795,
                       "metrics": [{"name": "loss", "value": "3.214"}, ...],
                       "lastUpdatedTime": "2026-12-02T10:30:45Z"}}

from a background thread, at most once every `MIN_INTERVAL_S` (the server shares 5 requests/s
among all TrainJobs) and always with the newest record: a slow or absent server never slows a step.
The record of a finished stage (100%, no time left, done.json's metrics) is sent at once, and the
stage waits up to `DONE_WAIT_S` for it before exiting; so is a preempted attempt's last record
(`STOPPED_WAIT_S`). A failed POST is printed once (and again
when the error changes), counted (`sent`/`failed`, and `listeners`, which the trainer's metrics
use), and never raised: progress.json stays the record nanorun itself reads.

Torch-free and standard-library only, like the rest of pipeline/.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # progress.py imports this module
    from nanorun.pipeline.progress import Done, Progress

URL_ENV = "KUBEFLOW_TRAINER_SERVER_URL"
CA_CERT_ENV = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
TOKEN_ENV = "KUBEFLOW_TRAINER_SERVER_TOKEN"

MIN_INTERVAL_S = 10.0  # between two POSTs of running progress; a finished stage's goes at once
TIMEOUT_S = 5.0  # one POST
DONE_WAIT_S = 10.0  # how long a finishing stage waits for its last record to be taken
STOPPED_WAIT_S = 3.0  # the same for a preempted attempt, within its termination grace period
MAX_METRICS = 256  # the API's limits: items, and characters of a name or a value
MAX_CHARS = 64

# progress.json fields sent as metrics, in this order (then the numeric `extra` fields: lr, ...)
PROGRESS_METRICS = (
    "step",
    "total_steps",
    "loss",
    "val_bpb",
    "tokens_per_sec",
    "mfu",
    "compile_seconds",
    "attempt",
)


def metric_value(value: Any) -> str | None:
    """A metric's value as the API takes it (a string of at most 64 characters); None for what is
    not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        return f"{value:.6g}"
    return str(value)[:MAX_CHARS]


def metrics_list(values: Mapping[str, Any]) -> list[dict[str, str]]:
    """[{name, value}] of the numeric entries of `values`, in order, within the API's limits."""
    out = []
    for name, value in values.items():
        text = metric_value(value)
        if text is not None and 0 < len(name) <= MAX_CHARS:
            out.append({"name": name, "value": text})
    return out[:MAX_METRICS]


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def progress_metrics(progress: Progress) -> dict[str, Any]:
    fields = {name: getattr(progress, name) for name in PROGRESS_METRICS}
    fields.update({k: v for k, v in progress.extra.items() if k not in fields})
    return fields


def trainer_status(progress: Progress) -> dict[str, Any]:
    """The `trainerStatus` of a progress.json record."""
    status: dict[str, Any] = {
        "metrics": metrics_list(progress_metrics(progress)),
        "lastUpdatedTime": rfc3339(progress.updated_at),
    }
    if progress.total_steps > 0:
        status["progressPercentage"] = max(0, min(100, int(100 * progress.step / progress.total_steps)))
    if progress.eta_seconds is not None and progress.eta_seconds == progress.eta_seconds:
        status["estimatedRemainingSeconds"] = max(0, min(2**31 - 1, round(progress.eta_seconds)))
    return status


def done_status(done: Done, last: Progress | None) -> dict[str, Any]:
    """The `trainerStatus` of a finished stage: 100%, nothing left, done.json's metrics (after the
    last progress record's, which they override)."""
    values = progress_metrics(last) if last is not None else {}
    values.update(done.metrics)
    return {
        "progressPercentage": 100,
        "estimatedRemainingSeconds": 0,
        "metrics": metrics_list(values),
        "lastUpdatedTime": rfc3339(done.finished_at),
    }


class StatusReporter:
    """POSTs the newest `trainerStatus` to Trainer's status server from one background thread."""

    def __init__(
        self,
        url: str,
        ca_file: str | None,
        token_file: str | None,
        interval_s: float = MIN_INTERVAL_S,
        timeout_s: float = TIMEOUT_S,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self.token_file = token_file
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.ca_file = ca_file
        self._context: ssl.SSLContext | None = None  # made at the first POST (the CA file may come later)
        self.sent = 0
        self.failed = 0
        self.last_error = ""
        self.listeners: list[Callable[[str], None]] = []  # called with "sent" or "failed"
        self.last_progress: Progress | None = None
        self._cond = threading.Condition()
        self._pending: dict[str, Any] | None = None
        self._urgent = False
        self._busy = False
        self._last_post = float("-inf")
        self._thread: threading.Thread | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> StatusReporter | None:
        url = env.get(URL_ENV, "").strip()
        if not url:
            return None
        return cls(url, env.get(CA_CERT_ENV) or None, env.get(TOKEN_ENV) or None)

    def publish(self, progress: Progress) -> bool:
        """Queue a progress record; the one of a stopped (preempted) attempt goes at once, and the
        caller, about to exit, waits up to `STOPPED_WAIT_S` for it."""
        self.last_progress = progress
        self.submit({"trainerStatus": trainer_status(progress)}, urgent=bool(progress.stopped))
        return self.flush(STOPPED_WAIT_S) if progress.stopped else True

    def publish_done(self, done: Done, wait_s: float = DONE_WAIT_S) -> bool:
        self.submit({"trainerStatus": done_status(done, self.last_progress)}, urgent=True)
        return self.flush(wait_s)

    def submit(self, payload: dict[str, Any], urgent: bool = False) -> None:
        """Queue `payload` in place of any not yet sent; `urgent` skips the wait between POSTs."""
        with self._cond:
            self._pending = payload
            self._urgent = self._urgent or urgent
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="trainer-status", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued payload has been POSTed (or has failed); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._pending is not None:
                        wait = 0.0 if self._urgent else self._last_post + self.interval_s - time.monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                payload, self._pending, self._urgent, self._busy = self._pending, None, False, True
            outcome = self._post(payload)
            with self._cond:
                self._last_post = time.monotonic()
                self._busy = False
                self._cond.notify_all()
            for listener in self.listeners:
                listener(outcome)

    def _post(self, payload: dict[str, Any]) -> str:
        try:
            headers = {"Content-Type": "application/json"}
            if self.token_file:
                headers["Authorization"] = "Bearer " + Path(self.token_file).read_text().strip()
            request = urllib.request.Request(
                self.url, data=json.dumps(payload).encode(), headers=headers, method="POST"
            )
            if self._context is None:
                self._context = ssl.create_default_context(cafile=self.ca_file or None)
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self._context) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            return self._failed(f"HTTP {e.code}: {_status_message(e)}")
        except (OSError, ValueError) as e:  # URLError, TLS, timeout, an unreadable token file
            return self._failed(f"{type(e).__name__}: {getattr(e, 'reason', None) or e}")
        self.sent += 1
        if self.last_error:
            self.log(f"trainer status: reporting to {self.url} again")
            self.last_error = ""
        return "sent"

    def _failed(self, error: str) -> str:
        self.failed += 1
        if error != self.last_error:
            self.log(
                f"trainer status: POST {self.url} failed ({error}); training goes on, "
                "progress.json is unaffected"
            )
            self.last_error = error
        return "failed"


def _status_message(e: urllib.error.HTTPError) -> str:
    """The message of the metav1.Status the server answers with, else the HTTP reason."""
    try:
        return str(json.loads(e.read().decode() or "{}").get("message") or e.reason)
    except (OSError, ValueError, AttributeError):
        return str(e.reason)


@cache
def reporter() -> StatusReporter | None:
    """This process's reporter: one when Trainer's settings are in the environment, else None."""
    return StatusReporter.from_env()


def publish(progress: Progress) -> None:
    if (r := reporter()) is not None:
        r.publish(progress)


def publish_done(done: Done) -> None:
    if (r := reporter()) is not None:
        r.publish_done(done)
