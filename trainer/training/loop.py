"""The training loop of every stage (pretrain, midtrain, sft, rl): one loop, the stage names its parts,
as torchtitan's trainer does (https://github.com/pytorch/torchtitan, torchtitan/train.py).

    outcome = run_loop(
        ctx, model, first_step=start_step, steps=steps, clock=clock,
        evaluations=[Evaluation("val", args.eval_every, val_bpb)],   # step -> {"val_bpb": ...}
        train_step=train_step,                                       # step -> StepReport
        save=save, save_every=args.save_every,                       # (step, evals) -> checkpoint
        checkpoint=resumed_from,
    )
    if outcome.preempted:
        return exit_preempted(ctx, outcome.checkpoint)

At each step, in this order:
- evaluations: each at the last step and every `every` steps, in eval mode with FP8 matmuls off.
  Periodic ones never run on the step a run starts or resumes at (the run that saved that checkpoint
  ran them) nor once SIGTERM arrived (the grace period goes to the checkpoint); the last step always
  evaluates. Their numbers are logged ("step N | val bpb 0.8123"), recorded in history.jsonl and
  handed to `save`. No evaluation draws from the training RNG (sampling ones seed a generator of their
  own), so skipping one leaves a resumed run on the uninterrupted run's path.
- save: at the last step, every `save_every` steps and when preempted; then progress.json names the
  checkpoint and history.jsonl is written up to it, so a resumed run's history matches its checkpoint.
- liveness (liveness.py): the loop is the `training` phase; evaluations run as `evaluating`, saves
  as `checkpointing` and the step that compiles the model as `compiling`: phases one long call may
  spend without progress, whose longest length each rank's heartbeat reports.
- one optimizer step, `train_step(step)`, timed: the step line (the stage's numbers, then ms, tokens/s,
  MFU where the device's peak is known, ETA), progress.json, the metrics and history.jsonl. The step
  that compiled the model counts as compile time, outside tokens/s and the ETA (nanochat's
  scripts/base_train.py likewise leaves its first steps out of the timing).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from nanorun.pipeline.liveness import CHECKPOINTING, COMPILING, EVALUATING, TRAINING
from nanorun.trainer.training import liveness
from nanorun.trainer.training.common import peak_flops
from nanorun.trainer.training.compilation import CompileClock


@dataclass
class Evaluation:
    """An evaluation the loop runs at the last step and every `every` steps (-1: only at the last)."""

    name: str
    every: int
    run: Callable[[int], dict[str, float]]  # step -> numbers to log and record ({} when it reports itself)


@dataclass
class StepReport:
    """One optimizer step, as `train_step` reports it to the loop."""

    log: str  # the step line's numbers, between "step N/M" and the timing
    loss: float  # the loss shown in progress.json
    lr: float  # the learning rate shown in progress.json
    grad_norm: float
    tokens: int  # all ranks' tokens of the step: added to the tokens metric, and tokens/s
    record: dict[str, float]  # the step's history.jsonl record, besides step, tokens/s and seconds
    progress: dict[str, float] = field(default_factory=dict)  # more progress.json fields (after the loss)


@dataclass
class Outcome:
    checkpoint: str | None  # the last checkpoint saved
    evals: dict[str, float]  # the last evaluations' numbers
    preempted: bool = False
    compile_seconds: float = 0.0  # torch.compile time of this attempt (0 when the model ran eagerly)


def due(every: int, step: int, first_step: int) -> bool:
    """Whether a periodic action (evaluate, save) every `every` steps falls on `step`. Never on the
    step a run starts or resumes at: the run that saved that checkpoint did it already."""
    return every > 0 and step > first_step and step % every == 0


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode with FP8 matmuls off (when --fp8 switched them on) for the block, then training again;
    nanochat evaluates in bf16 too."""
    from nanorun.trainer.model.fp8 import bf16_matmuls

    model.eval()
    try:
        with bf16_matmuls(model):
            yield
    finally:
        model.train()


def report_checkpoint(ctx: Any, step: int, total_steps: int, checkpoint: str) -> None:
    """After saving `checkpoint`: report it in progress.json and write the history up to it, so a
    resumed run's history matches its checkpoint."""
    ctx.progress(flush=True, step=step, total_steps=total_steps, last_checkpoint=checkpoint)
    ctx.flush_history()


def run_loop(
    ctx: Any,
    model: torch.nn.Module,
    *,
    first_step: int,
    steps: int,
    train_step: Callable[[int], StepReport],
    evaluations: list[Evaluation],
    save: Callable[[int, dict[str, float]], str],
    save_every: int,
    checkpoint: str | None = None,
    evals: dict[str, float] | None = None,
    clock: CompileClock | None = None,
    timing: dict[str, Any] | None = None,
    flops_per_token: float | None = None,
) -> Outcome:
    """Run optimizer steps `first_step` .. `steps` of the stage.

    `save(step, evals)` writes a checkpoint and returns it. `checkpoint`: the one a resumed run started
    from; `evals`: its last evaluations' numbers. `clock`: splits compile time from step time.
    `timing`: `train_seconds` and `timed_steps` so far, updated in place (a stage that keeps them in its
    checkpoint gets an ETA and done.json's train_seconds across resumes). `flops_per_token`: for MFU.
    """
    step, evals = first_step, dict(evals or {})
    clock = clock or CompileClock(compiled=False)
    timing = timing if timing is not None else {"train_seconds": 0.0, "timed_steps": 0}
    device_peak = peak_flops(ctx.device) if flops_per_token else None  # None off GPUs it knows
    peak = device_peak * ctx.world_size if device_peak else None
    preempted = False
    liveness.set_phase(TRAINING)
    while True:
        last_step = step == steps
        for evaluation in evaluations:
            if last_step or (not preempted and due(evaluation.every, step, first_step)):
                with liveness.pausing(EVALUATING), evaluating(model):
                    results = evaluation.run(step)
                if results:
                    # val_bpb is logged as "val bpb"
                    numbers = " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in results.items())
                    ctx.print0(f"step {step:06d} | {numbers}")
                    ctx.record(step=step, **results)
                    evals.update(results)
        if last_step or preempted or due(save_every, step, first_step):
            with liveness.pausing(CHECKPOINTING):
                checkpoint = save(step, evals)
            report_checkpoint(ctx, step, steps, checkpoint)
        if preempted or last_step:
            return Outcome(checkpoint, evals, preempted=preempted, compile_seconds=clock.seconds)

        t0 = time.time()
        with liveness.pausing(COMPILING) if clock.compiling else nullcontext():
            report = train_step(step)
            if ctx.device_type == "cuda":
                torch.cuda.synchronize()
        dt = time.time() - t0
        step += 1

        steady = clock.step_seconds(dt)  # None: the step compiled the model
        if steady is not None:
            timing["train_seconds"] += steady
            timing["timed_steps"] += 1
        average = timing["train_seconds"] / timing["timed_steps"] if timing["timed_steps"] else dt
        eta = average * (steps - step)
        tok_s = report.tokens / steady if steady else None
        mfu = flops_per_token * tok_s / peak if peak and tok_s else None
        took = f"{dt * 1000:.0f} ms | {tok_s:,.0f} tok/s" if tok_s else f"compile + first step {dt:.1f} s"
        ctx.print0(
            f"step {step:06d}/{steps} | {report.log} | {took}"
            + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else "")
            + f" | eta {eta / 60:.1f} min"
        )
        ctx.progress(
            step=step,
            total_steps=steps,
            loss=report.loss,
            **report.progress,
            tokens_per_sec=tok_s,
            mfu=mfu,
            eta_seconds=eta,
            lr=report.lr,
            grad_norm=report.grad_norm,
            tokens=report.tokens,
            step_seconds=steady,
            compile_seconds=clock.seconds if clock.compiled else None,
        )
        ctx.record(step=step, **report.record, tokens_per_sec=tok_s, seconds=dt)
        preempted = ctx.should_stop()
