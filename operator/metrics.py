"""The operator's Prometheus metrics (names shared with the Grafana dashboard; keep them exact).

    llmrun_reconciles_total{result}              reconciles by result: ok | requeue | invalid | error
    llmrun_reconcile_errors_total                reconciles that raised (API or storage trouble)
    llmrun_runs{phase}                           LLMRuns by phase
    llmrun_stage_duration_seconds{stage}         seconds from a stage's first job to its success
    llmrun_time_to_first_job_seconds             seconds from LLMRun creation to its first PyTorchJob
    llmrun_stage_info{namespace,run,stage,phase,sweep}
                                                 1 for each run's current stage (the stage timeline);
                                                 `sweep`: the LLMSweep the run is a point of, or ""
    llmrun_attempts_ended_total{stage,outcome}   stage attempts that ended before their stage did: preempted
                                                 (not counted against retry.maxAttempts) | failed (counted)
                                                 | stalled (stopped progressing; counted apart)
    llmsweep_point_info{namespace,sweep,run,phase} 1 for each point of each LLMSweep (the dashboard's
                                                 sweep selector)

`serve(port)` exposes them over HTTP (`nanorun operator --metrics-port`).
"""

from __future__ import annotations

from nanorun.operator.api import Phase
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client import Counter as PromCounter

REGISTRY = CollectorRegistry()
PHASES: tuple[str, ...] = Phase.__args__

RECONCILES = PromCounter(
    "llmrun_reconciles_total", "LLMRun reconciles by result.", ["result"], registry=REGISTRY
)
RECONCILE_ERRORS = PromCounter(
    "llmrun_reconcile_errors_total", "LLMRun reconciles that failed with an error.", registry=REGISTRY
)
RUNS = Gauge("llmrun_runs", "LLMRuns by phase.", ["phase"], registry=REGISTRY)
STAGE_DURATION = Histogram(
    "llmrun_stage_duration_seconds",
    "Seconds from a stage's first job to its success.",
    ["stage"],
    registry=REGISTRY,
    buckets=(10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 172800),
)
TIME_TO_FIRST_JOB = Histogram(
    "llmrun_time_to_first_job_seconds",
    "Seconds from LLMRun creation to its first PyTorchJob.",
    registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
ATTEMPTS_ENDED = PromCounter(
    "llmrun_attempts_ended_total",
    "Stage attempts that ended early, by outcome: preempted (not counted), failed or stalled.",
    ["stage", "outcome"],
    registry=REGISTRY,
)
STAGE_INFO = Gauge(
    "llmrun_stage_info",
    "1 for the stage each run is at, with its phase (and the sweep it is a point of, if any).",
    ["namespace", "run", "stage", "phase", "sweep"],
    registry=REGISTRY,
)

SWEEP_POINT_INFO = Gauge(
    "llmsweep_point_info",
    "1 for each point of each LLMSweep, with its LLMRun and phase.",
    ["namespace", "sweep", "run", "phase"],
    registry=REGISTRY,
)

_stage_labels: dict[tuple[str, str], tuple[str, str, str, str, str]] = {}
_sweep_labels: dict[tuple[str, str], set[tuple[str, str, str, str]]] = {}


def set_sweep_points(namespace: str, sweep: str, phases: dict[str, str]) -> None:
    """A sweep's points (run → phase) as llmsweep_point_info series, replacing its previous ones;
    an empty dict forgets the sweep."""
    labels = {(namespace, sweep, run, phase) for run, phase in phases.items()}
    for gone in _sweep_labels.get((namespace, sweep), set()) - labels:
        SWEEP_POINT_INFO.remove(*gone)
    for series in labels:
        SWEEP_POINT_INFO.labels(*series).set(1)
    if labels:
        _sweep_labels[(namespace, sweep)] = labels
    else:
        _sweep_labels.pop((namespace, sweep), None)


_run_phase: dict[tuple[str, str], str] = {}


def set_run_phase(namespace: str, run: str, phase: str) -> None:
    """Record a run's phase; llmrun_runs{phase} counts them."""
    previous = _run_phase.get((namespace, run))
    if previous == phase:
        return
    _run_phase[(namespace, run)] = phase
    if previous is not None:
        RUNS.labels(phase=previous).dec()
    RUNS.labels(phase=phase).inc()


def set_stage(namespace: str, run: str, stage: str, phase: str, sweep: str = "") -> None:
    """Point the run's stage_info series at (stage, phase), dropping its previous one. `sweep` (the
    run's `nanorun.io/sweep` label) lets the dashboard list a sweep's points by that label."""
    labels = (namespace, run, stage, phase, sweep)
    previous = _stage_labels.get((namespace, run))
    if previous == labels:
        return
    if previous is not None:
        STAGE_INFO.remove(*previous)
    STAGE_INFO.labels(*labels).set(1)
    _stage_labels[(namespace, run)] = labels


def forget_run(namespace: str, run: str) -> None:
    previous = _stage_labels.pop((namespace, run), None)
    if previous is not None:
        STAGE_INFO.remove(*previous)
    phase = _run_phase.pop((namespace, run), None)
    if phase is not None:
        RUNS.labels(phase=phase).dec()


for _phase in PHASES:  # every phase is exported, 0 when no run is in it
    RUNS.labels(phase=_phase).set(0)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr, registry=REGISTRY)
