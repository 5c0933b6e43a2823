"""Shared setup of every stage: processes, device, seeds, metrics, status files, preemption.

A stage's file is about what the stage does; everything every stage needs lives here:

    parser = argparse.ArgumentParser(...)
    add_common_args(parser)                 # --run-dir, --metrics-port, --device, --seed
    ctx = setup_stage("pretrain", parser.parse_args())
    if ctx.already_done:                    # the stage finished before: a no-op (idempotent)
        return teardown(ctx)
    resume = resumable_checkpoint(ctx.stage_dir)  # (checkpoint.py) this configuration's newest
    ...                                     # the loop: ctx.progress(...), ctx.should_stop()
    if preempted:                           # after saving the SIGTERM checkpoint
        return exit_preempted(ctx, checkpoint)
    ctx.done(metrics, outputs)
    teardown(ctx)

Processes: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` are read exactly as
torchrun and a Kubeflow PyTorchJob inject them; with WORLD_SIZE > 1 the default process group is
created (NCCL on CUDA, gloo on CPU). Without them the stage is one plain process.

Preemption: SIGTERM (what Kubernetes sends before killing a pod) only sets a flag.
`ctx.should_stop()` agrees on it across ranks, so every rank leaves the loop after the same step;
the stage then saves a checkpoint and calls `exit_preempted`: rank 0 rewrites progress.json with
`stopped="preempted"` and this attempt's number, prints how long the checkpoint took (what
terminationGracePeriodSeconds must cover), and the process exits with `PREEMPTED_EXIT_CODE` (143 =
128 + SIGTERM, which a PyTorchJob's ExitCode restart policy treats as retryable). Under torchrun the
pod's exit code is torchrun's (1), so the operator tells a preemption from a failure by the marker.

Liveness: every rank of a stage that runs starts its heartbeat thread here (liveness.py); rank 0
first claims the stage for its attempt. `ctx.progress` marks the rank's progress on every rank, and
every status file rank 0 commits (progress.json, history.jsonl, done.json) is fenced: a rank of an
attempt a newer one has replaced raises `Superseded` instead of writing.

Configuration ids: a done.json counts as "already done" only for the same NANORUN_CONFIG_ID
(`progress.is_current`); with another id the stage runs again from its input (spec change).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from nanorun.pipeline import layout, storage, trainer_status
from nanorun.pipeline.layout import HISTORY_FILE
from nanorun.pipeline.progress import (
    PREEMPTED,
    Done,
    Progress,
    current_attempt,
    current_config_id,
    is_current,
    read_done,
    rerun_reason,
    write_done,
    write_progress,
)
from nanorun.pipeline.stages import by_key
from nanorun.trainer.training import distributed, liveness
from nanorun.trainer.training.metrics import TrainMetrics, WandbLogger

PREEMPTED_EXIT_CODE = 143
PROGRESS_MIN_INTERVAL_S = 2.0  # progress.json is rewritten at most this often, unless flushed
HISTORY_MIN_INTERVAL_S = 30.0  # history.jsonl likewise (it grows with the run)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("stage")
    g.add_argument("--run-dir", required=True, help="run directory: a local path or s3://bucket/prefix")
    g.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on PORT+LOCAL_RANK"
    )
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="compute device")
    g.add_argument("--seed", type=int, default=42, help="random seed (the same on every rank)")


@dataclass
class StageContext:
    stage: str
    run_dir: str
    stage_dir: str
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    device_type: str
    is_master: bool
    dtype: torch.dtype  # compute dtype: bf16 on CUDA with bf16 support, fp32 otherwise
    attempt: int = 0  # NANORUN_ATTEMPT: written into every progress.json
    config_id: str = ""  # NANORUN_CONFIG_ID: written into done.json (and checkpoints)
    already_done: Done | None = None  # set when done.json of this config exists: the stage is a no-op
    metrics: TrainMetrics | None = None
    wandb: WandbLogger | None = None
    started_at: float = field(default_factory=time.time)
    _progress: Progress | None = None
    _progress_written_at: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    _history_written_at: float = 0.0
    _stop_flag: list[bool] = field(default_factory=lambda: [False])
    _sigterm_at: float | None = None  # when this rank got SIGTERM
    _stop_agreed_at: float | None = None  # when should_stop() first said yes: the SIGTERM checkpoint starts

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def print0(self, *args: Any, **kwargs: Any) -> None:
        if self.is_master:
            print(*args, **kwargs, flush=True)

    def barrier(self) -> None:
        distributed.barrier()

    @property
    def stop_requested(self) -> bool:
        return self._stop_flag[0]

    def request_stop(self) -> None:
        self._sigterm_at = self._sigterm_at or time.time()
        self._stop_flag[0] = True

    def should_stop(self) -> bool:
        """True on every rank when SIGTERM reached any rank (a collective: call it on all ranks)."""
        stop = distributed.any_rank(self.stop_requested, self.device)
        if stop and self._stop_agreed_at is None:
            self._stop_agreed_at = time.time()
        return stop

    def progress(self, flush: bool = False, **fields: Any) -> None:
        """Record progress: metrics on this rank; rank 0 also (re)writes progress.json.

        Known `Progress` fields (step, total_steps, loss, val_bpb, tokens_per_sec, mfu, compile_seconds,
        eta_seconds, last_checkpoint, message) are merged into the stage's progress; anything else goes to
        `extra` (and to a metric where one exists: lr, grad_norm, tokens, step_seconds).
        """
        if self.metrics is not None:
            self.metrics.update(fields)
        liveness.progressed(step=fields.get("step"), step_seconds=fields.get("step_seconds"))
        if not self.is_master:
            return
        if self.wandb is not None:
            self.wandb.log(fields, step=fields.get("step"))
        p = self._progress or Progress(stage=self.stage, world_size=self.world_size, attempt=self.attempt)
        for key, value in fields.items():
            if key in ("tokens", "step_seconds"):
                continue
            if key in Progress.__dataclass_fields__ and key not in (
                "stage",
                "extra",
                "updated_at",
                "attempt",
            ):
                setattr(p, key, value)
            else:
                p.extra[key] = value
        p.elapsed_seconds = time.time() - self.started_at
        self._progress = p
        now = time.time()
        if flush or now - self._progress_written_at >= PROGRESS_MIN_INTERVAL_S:
            liveness.ensure_current()
            write_progress(self.run_dir, p)
            self._progress_written_at = now

    def load_history(self, before_step: int) -> None:
        """On resume from the checkpoint of step `before_step`: keep the records written before that
        checkpoint was saved (steps up to and including `before_step`), drop those of later steps."""
        uri = storage.join(self.stage_dir, HISTORY_FILE)
        if self.is_master and storage.exists(uri):
            lines = storage.read_text(uri).splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
            self.history = [r for r in records if r.get("step", 0) <= before_step]

    def record(self, flush: bool = False, **fields: Any) -> None:
        """Append one record (a step's numbers) to `<stage>/history.jsonl`, the curves of the run."""
        if not self.is_master:
            return
        self.history.append(fields)
        if flush or time.time() - self._history_written_at >= HISTORY_MIN_INTERVAL_S:
            self.flush_history()

    def flush_history(self) -> None:
        if self.is_master and self.history:
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history)
            liveness.ensure_current()
            storage.write_text(storage.join(self.stage_dir, HISTORY_FILE), text)
            self._history_written_at = time.time()

    def done(self, metrics: dict[str, Any], outputs: dict[str, Any]) -> None:
        """Mark the stage finished (rank 0 writes done.json, after a final progress.json)."""
        self.barrier()
        if self.is_master:
            self.flush_history()
            if self._progress is not None:
                self.progress(flush=True, message="done")
            liveness.ensure_current()
            write_done(
                self.run_dir,
                Done(
                    stage=self.stage,
                    seconds=time.time() - self.started_at,
                    metrics=metrics,
                    outputs=outputs,
                    config_id=self.config_id,
                ),
            )
        self.barrier()


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was requested but CUDA is not available on this machine")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, for MFU. Unknown devices: None.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # MFU is a GPU notion; a CPU has no comparable tensor-core peak
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def setup_stage(stage: str, args: argparse.Namespace) -> StageContext:
    """Start a stage process: distributed init, device, seeds, metrics server, SIGTERM handler.
    `stage` is the stage's key (pipeline/stages.py), the name of its folder, files, metrics and logs."""
    stage = by_key(stage).key
    storage.wait_out_outages()  # a storage outage of minutes costs a stage time, not the run
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(args.device, local_rank)
    if world_size > 1 and not distributed.is_distributed():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise SystemExit(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} is not set (launch with torchrun)"
            )
        trace_prefix = liveness.scratch_dir() / liveness.FLIGHT_RECORDER_PREFIX
        distributed.init_process_group(device, rank, world_size, trace_prefix)
    seed_everything(args.seed)
    run_dir = str(args.run_dir).rstrip("/")
    ctx = StageContext(
        stage=stage,
        run_dir=run_dir,
        stage_dir=layout.stage_dir(run_dir, stage),
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        device=device,
        device_type=device.type,
        is_master=rank == 0,
        dtype=compute_dtype(device),
        attempt=current_attempt(),
        config_id=current_config_id(),
    )
    done = read_done(run_dir, stage)
    if is_current(done, ctx.config_id):
        ctx.already_done = done
        ctx.print0(f"{stage}: already done ({storage.join(ctx.stage_dir, 'done.json')}); nothing to do")
        return ctx
    if done is not None:
        ctx.print0(rerun_reason(done, ctx.config_id))
    ctx.metrics = TrainMetrics(stage, rank)
    if args.metrics_port is not None:
        port = ctx.metrics.serve(args.metrics_port + local_rank if args.metrics_port else 0)
        print(f"[rank {rank}] metrics on http://0.0.0.0:{port}/metrics", flush=True)
    liveness.start(run_dir, stage, rank, world_size, ctx.attempt, ctx.metrics)
    if ctx.is_master and (status := trainer_status.reporter()) is not None:
        status.listeners.append(ctx.metrics.count_status_report)
        ctx.print0(f"{stage}: reporting progress to Kubeflow Trainer at {status.url}")
    if ctx.is_master:
        ctx.wandb = WandbLogger(project="nanorun", name=f"{os.environ.get('NANORUN_RUN', 'local')}-{stage}")

    def on_sigterm(signum: int, frame: Any) -> None:
        print(f"[rank {rank}] SIGTERM: will checkpoint after this step and exit", file=sys.stderr, flush=True)
        ctx.request_stop()

    signal.signal(signal.SIGTERM, on_sigterm)
    ctx.print0(f"{stage}: rank {rank}/{world_size} on {device} ({ctx.dtype}), run dir {run_dir}")
    return ctx


def exit_preempted(ctx: StageContext, checkpoint: str | None) -> int:
    """The end of a stage stopped by SIGTERM, once its checkpoint is committed (on every rank).

    Rank 0 rewrites progress.json with `stopped="preempted"` (and this attempt's number): the marker
    the operator reads, since under torchrun the pod exits with torchrun's code, not ours. Prints how
    long the checkpoint took, which terminationGracePeriodSeconds must cover. Returns
    `PREEMPTED_EXIT_CODE` after `teardown`.
    """
    now = time.time()
    saved_in = now - (ctx._stop_agreed_at or now)
    since = f" ({now - ctx._sigterm_at:.2f} s after SIGTERM)" if ctx._sigterm_at else ""
    ctx.print0(f"SIGTERM checkpoint saved in {saved_in:.2f} s{since}")
    ctx.flush_history()
    ctx.progress(
        flush=True,
        stopped=PREEMPTED,
        last_checkpoint=checkpoint,
        message=f"preempted: checkpoint saved in {saved_in:.2f} s",
    )
    ctx.print0(f"preempted: saved {checkpoint}; exiting {PREEMPTED_EXIT_CODE} so the job is retried")
    return teardown(ctx, PREEMPTED_EXIT_CODE)


def teardown(ctx: StageContext, exit_code: int = 0) -> int:
    """Release the process group and loggers; returns `exit_code` so a stage can `return teardown(ctx)`."""
    if ctx.wandb is not None:
        ctx.wandb.finish()
    liveness.stop()
    distributed.destroy_process_group()
    return exit_code
