"""Prometheus metrics of a training stage, served on `--metrics-port`.

Every metric carries the labels `run` (env `NANORUN_RUN`, default "local"), `stage` and `rank`, so
one Grafana dashboard shows every stage and every rank of every run:

    llm_train_step, llm_train_total_steps, llm_train_loss, llm_train_val_bpb,
    llm_train_tokens_total (counter), llm_train_tokens_per_second, llm_train_mfu_ratio,
    llm_train_learning_rate, llm_train_grad_norm, llm_train_eta_seconds,
    llm_train_step_seconds (histogram),
    llm_train_status_reports_total{outcome} (counter; only in a TrainJob whose Kubeflow Trainer
    takes progress reports, see nanorun.pipeline.trainer_status)

and the rank's liveness (training/liveness.py), so a dashboard names the straggler or the silent rank:

    llm_train_progress_timestamp_seconds   when the main thread last progressed (a step, an
                                           evaluation batch, a checkpoint chunk), Unix time
    llm_train_heartbeat_timestamp_seconds  when the heartbeat thread last beat (written or not)
    llm_train_phase{phase}                 1 for the phase the rank is in, 0 for the others
    llm_train_heartbeat_failures_total     heartbeats storage refused (counter)

`time() - llm_train_progress_timestamp_seconds` is how long a rank has been stuck; a scrape that
fails altogether is a process that is gone or frozen (SIGSTOP).

Gauges are exported from their first value on; the token counter and the step-time histogram from
the start (at 0, so that `rate()` counts the first tokens).

Ports: each process serves on `--metrics-port + LOCAL_RANK`, so the processes torchrun starts on one
node (or in one PyTorchJob pod) do not collide, and local rank 0 of every node is on the port a
PodMonitor scrapes. Each `TrainMetrics` owns its own registry (several stages, or tests, can live
in one process).

Weights & Biases is optional: `WandbLogger` logs only when `WANDB_API_KEY` is set and `wandb` is
importable; nothing here depends on it otherwise.
"""

from __future__ import annotations

import os
from typing import Any

from nanorun.pipeline.liveness import FINISHED, PAUSING_PHASES, TRAINING
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PHASES = (*PAUSING_PHASES, TRAINING, FINISHED)
STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# progress field -> gauge name (fields without a gauge are only written to progress.json)
GAUGES = {
    "step": ("llm_train_step", "Optimizer steps completed"),
    "total_steps": ("llm_train_total_steps", "Optimizer steps planned for the stage"),
    "loss": ("llm_train_loss", "Training loss (smoothed, nats per token)"),
    "val_bpb": ("llm_train_val_bpb", "Validation bits per byte"),
    "tokens_per_sec": ("llm_train_tokens_per_second", "Training throughput of all ranks, tokens/s"),
    "mfu": ("llm_train_mfu_ratio", "Model FLOPs utilisation, 0..1"),
    "lr": ("llm_train_learning_rate", "Learning-rate multiplier times the base rate of the matrix group"),
    "grad_norm": ("llm_train_grad_norm", "Global gradient L2 norm"),
    "eta_seconds": ("llm_train_eta_seconds", "Estimated seconds until the stage finishes"),
}


def run_name() -> str:
    return os.environ.get("NANORUN_RUN", "local")


class TrainMetrics:
    """The trainer metrics of one process (one stage, one rank)."""

    def __init__(self, stage: str, rank: int, run: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"run": run or run_name(), "stage": stage, "rank": str(rank)}
        names = list(self.labels)
        # A gauge's series appears with its first value, not as 0 before it: a loss, ETA or MFU the
        # stage has not measured yet (MFU never is on a CPU) is no data on the dashboard, not a 0.
        self.gauges = {
            field: Gauge(name, help_, names, registry=self.registry)
            for field, (name, help_) in GAUGES.items()
        }
        self.tokens = Counter(
            "llm_train_tokens", "Tokens trained on by all ranks", names, registry=self.registry
        ).labels(**self.labels)
        self.step_seconds = Histogram(
            "llm_train_step_seconds",
            "Wall time of one optimizer step",
            names,
            buckets=STEP_SECONDS_BUCKETS,
            registry=self.registry,
        ).labels(**self.labels)
        self.status_reports = Counter(
            "llm_train_status_reports",
            "POSTs of the stage's progress to Kubeflow Trainer v2 (the TrainJob's status.trainerStatus)",
            [*names, "outcome"],
            registry=self.registry,
        )
        self.progress_time = Gauge(
            "llm_train_progress_timestamp_seconds",
            "When the rank's main thread last progressed (a step, an evaluation batch, a checkpoint chunk)",
            names,
            registry=self.registry,
        )
        self.heartbeat_time = Gauge(
            "llm_train_heartbeat_timestamp_seconds",
            "When the rank's heartbeat thread last beat",
            names,
            registry=self.registry,
        )
        self.phase = Gauge(
            "llm_train_phase",
            "1 for the phase the rank is in, 0 for the others",
            [*names, "phase"],
            registry=self.registry,
        )
        self.heartbeat_failures = Counter(
            "llm_train_heartbeat_failures",
            "Heartbeats of the rank that storage refused",
            names,
            registry=self.registry,
        ).labels(**self.labels)
        self.port: int | None = None

    def serve(self, port: int) -> int:
        """Start the HTTP endpoint on `port` (0 picks a free one); returns the port."""
        server, _ = start_http_server(port, registry=self.registry)
        self.port = server.server_port
        return self.port

    def count_status_report(self, outcome: str) -> None:
        """One POST to Trainer's status server ended: `outcome` "sent" or "failed"."""
        self.status_reports.labels(**self.labels, outcome=outcome).inc()

    def progressed(self, at: float) -> None:
        self.progress_time.labels(**self.labels).set(at)

    def beat(self, at: float) -> None:
        self.heartbeat_time.labels(**self.labels).set(at)

    def heartbeat_failed(self) -> None:
        self.heartbeat_failures.inc()

    def set_phase(self, phase: str) -> None:
        for name in PHASES:
            self.phase.labels(**self.labels, phase=name).set(1.0 if name == phase else 0.0)

    def update(self, fields: dict[str, Any]) -> None:
        for key, value in fields.items():
            if key in self.gauges and value is not None:
                self.gauges[key].labels(**self.labels).set(float(value))
        if fields.get("tokens"):
            self.tokens.inc(float(fields["tokens"]))
        if fields.get("step_seconds") is not None:
            self.step_seconds.observe(float(fields["step_seconds"]))


class WandbLogger:
    """Logs to Weights & Biases when WANDB_API_KEY is set and wandb is installed; otherwise a no-op."""

    def __init__(self, project: str, name: str, config: dict[str, Any] | None = None) -> None:
        self.run = None
        if not os.environ.get("WANDB_API_KEY"):
            return
        try:
            import wandb
        except ImportError:
            return
        self.run = wandb.init(project=project, name=name, config=config or {})

    def log(self, fields: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in fields.items() if isinstance(v, (int, float))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
