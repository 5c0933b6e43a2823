"""What the post-training stages (`midtrain`, `sft`, `rl`) share: where they start from,
their optimizer and learning-rate schedule, their loop and their checkpoints.

    model, optimizer, start = start_training(ctx, sources=("midtrain", "pretrain"), init_lr_frac=0.8)
    outcome = run_loop(ctx, args, model, optimizer, start, steps, evaluate=..., train_step=...,
                       checkpoint_meta=...)       # the stage's own evaluation, step and loop state
    if outcome.preempted:
        return exit_preempted(ctx, outcome.checkpoint)
    return finish(ctx, outcome, metrics, summary)

- A stage resumes from its own newest committed checkpoint of the same configuration id (model,
  optimizer, step, loop state, history.jsonl up to that step); otherwise it starts from the final
  checkpoint of the first finished stage in `sources`.
- The loop evaluates at the end and every `--eval-every` steps, saves at the end, every
  `--save-every` steps and when preempted (SIGTERM: it then returns `preempted`), and reports each
  step to the log, progress.json, the metrics and history.jsonl.
- Learning rates are the pretraining run's (stored in every checkpoint's meta) times
  `--init-lr-frac`, so post-training inherits the scaling pretraining derived from the model size.
- Each checkpoint records `lr` and `source`, so the next stage inherits them too.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from nanorun.pipeline.progress import is_done
from nanorun.pipeline.stages import BY_KEY, stage_named
from nanorun.trainer.training import checkpoint as ckpt
from nanorun.trainer.training.common import teardown
from nanorun.trainer.training.compilation import CompileClock, add_compile_arg

# nanochat's base learning rates, for a source checkpoint that does not record its own
DEFAULT_LR = {
    "matrix_lr": 0.02,
    "embedding_lr": 0.3,
    "unembedding_lr": 0.004,
    "scalar_lr": 0.5,
    "weight_decay": 0.0,
}


def add_finetune_args(parser: argparse.ArgumentParser, *, source: str, init_lr_frac: float) -> None:
    g = parser.add_argument_group("training")
    g.add_argument(
        "--source", default=source, help="stage key(s) to start from, first finished wins (comma-separated)"
    )
    g.add_argument(
        "--num-iterations", type=int, default=-1, help="optimizer steps (-1 = one epoch of the data)"
    )
    g.add_argument("--device-batch-size", type=int, default=8, help="rows per forward/backward on one device")
    g.add_argument(
        "--init-lr-frac", type=float, default=init_lr_frac, help="LRs as a fraction of pretraining's"
    )
    g.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay")
    g.add_argument("--eval-every", type=int, default=-1, help="evaluate every N steps (-1 = only at the end)")
    g.add_argument(
        "--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)"
    )
    g.add_argument("--keep-checkpoints", type=int, default=3, help="committed checkpoints to keep")
    g.add_argument(
        "--limit", type=int, default=None, help="at most N examples per downloaded task (small runs)"
    )
    add_compile_arg(g)


@dataclass
class Start:
    step: int  # the first step to run (0 for a fresh start)
    checkpoint: str  # where the weights came from
    source_stage: str  # the stage post-training started from (kept across resumes)
    lr: dict[str, float]  # pretraining's learning rates (before --init-lr-frac)
    base_lrs: list[float] = field(default_factory=list)  # per parameter group, at multiplier 1
    loop: dict[str, Any] = field(default_factory=dict)  # the stage's own loop state, from its checkpoint
    resumed: bool = False

    def describe(self) -> str:
        return f"from {self.checkpoint} ({'resumed' if self.resumed else self.source_stage})"


def source_checkpoint(run_dir: str, sources: tuple[str, ...] | str) -> tuple[str, str]:
    """(stage key, final checkpoint) of the first finished stage in `sources` (keys; a stage's old
    module name, e.g. base_train, names it too)."""
    names = tuple(s.strip() for s in sources.split(",")) if isinstance(sources, str) else sources
    try:
        stages = tuple(stage_named(name).key for name in names)
    except ValueError as err:
        raise SystemExit(f"--source {','.join(names)}: {err}") from None
    for stage in stages:
        if is_done(run_dir, stage):
            return stage, ckpt.final_checkpoint(run_dir, stage)
    raise SystemExit(
        f"none of the source stages {', '.join(stages)} has finished in {run_dir}; run one of them first "
        f"(e.g. `python -m nanorun.trainer.{BY_KEY[stages[-1]].module} --run-dir {run_dir}`)"
    )


def start_training(
    ctx: Any, sources: tuple[str, ...] | str, init_lr_frac: float, weight_decay: float = 0.0
) -> tuple[torch.nn.Module, Any, Start]:
    """The model (train mode, on ctx.device), its MuonAdamW optimizer and where this run starts."""
    resume = ckpt.resumable_checkpoint(ctx.stage_dir)
    if resume:
        model, meta = ckpt.load_model(resume, ctx.device)
        start = Start(
            meta["step"], resume, meta["source"], meta["lr"], loop=meta.get("loop", {}), resumed=True
        )
    else:
        stage, uri = source_checkpoint(ctx.run_dir, sources)
        model, meta = ckpt.load_model(uri, ctx.device)
        lr = meta.get("lr") or meta.get("plan", {}).get("lr") or DEFAULT_LR
        start = Start(0, uri, stage, dict(lr))
    model.train()
    lr = {k: v * init_lr_frac for k, v in start.lr.items() if k != "weight_decay"}
    optimizer = model.setup_optimizer(**lr, weight_decay=weight_decay)
    start.base_lrs = [g["lr"] for g in optimizer.param_groups]
    if resume:
        ckpt.load_optimizer(resume, optimizer)
        ckpt.restore_rng(meta.get("rng"))
    ctx.load_history(before_step=start.step)
    return model, optimizer, start


def check_examples_per_step(examples_per_step: int, world_size: int) -> None:
    if examples_per_step % world_size:
        raise SystemExit(
            f"--examples-per-step {examples_per_step} must be a multiple of the world size {world_size}"
        )


def epoch_steps(start: Start, args: argparse.Namespace, examples: int) -> int:
    """Optimizer steps: a resumed run's own, else `--num-iterations`, else one epoch of `examples`
    at `--examples-per-step`."""
    return start.loop.get("num_iterations") or (
        args.num_iterations if args.num_iterations > 0 else max(1, examples // args.examples_per_step)
    )


def set_learning_rate(
    optimizer: Any, base_lrs: list[float], multiplier: float, momentum: float | None = None
) -> None:
    for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = lr * multiplier
        if momentum is not None and group.get("kind") == "muon":
            group["momentum"] = momentum


def save(
    ctx: Any,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    start: Start,
    meta: dict[str, Any],
    keep_last: int,
) -> str:
    full = {"source": start.source_stage, "lr": start.lr, "model_config": model.config.to_dict(), **meta}
    return ckpt.save_checkpoint(ctx.stage_dir, step, model, optimizer, full, keep_last=keep_last)


@dataclass
class StepReport:
    """One optimizer step, as the loop reports it to the log, progress.json, metrics and history."""

    lrm: float  # the step's learning-rate multiplier
    loss: float  # the loss shown as progress
    grad_norm: float
    tokens: int  # added to the tokens metric
    tokens_per_step: float  # all ranks' tokens of the step, for tokens/s
    log: str  # the log line between "step N/M" and the step's duration
    record: dict[str, float]  # the step's history.jsonl record, besides the step
    extra: dict[str, float] = field(default_factory=dict)  # more progress fields (after the loss)


@dataclass
class Outcome:
    checkpoint: str | None  # the last checkpoint saved
    evals: dict[str, float]  # the last evaluation's results
    preempted: bool = False
    compile_seconds: float = 0.0  # torch.compile time of this attempt (0 when the model ran eagerly)


def due(every: int, step: int, first_step: int) -> bool:
    """Whether a periodic action (evaluate, save) every `every` steps falls on `step`. Never on the
    step a run starts or resumes at: the run that saved that checkpoint did it already."""
    return every > 0 and step > first_step and step % every == 0


def report_checkpoint(ctx: Any, step: int, total_steps: int, checkpoint: str) -> None:
    """After saving `checkpoint`: report it in progress.json and write the history up to it, so a
    resumed run's history matches its checkpoint."""
    ctx.progress(flush=True, step=step, total_steps=total_steps, last_checkpoint=checkpoint)
    ctx.flush_history()


def run_loop(
    ctx: Any,
    args: argparse.Namespace,
    model: torch.nn.Module,
    optimizer: Any,
    start: Start,
    steps: int,
    *,
    evaluate: Callable[[int], dict[str, float]],
    train_step: Callable[[int], StepReport],
    checkpoint_meta: Callable[[dict[str, float]], dict[str, Any]],
    evals: dict[str, float] | None = None,
    log_seconds: bool = False,
    clock: CompileClock | None = None,
) -> Outcome:
    """Run the stage from `start.step` to `steps` optimizer steps.

    `evaluate(step)` (model in eval mode) returns the evaluation's numbers, logged and recorded;
    `train_step(step)` runs one optimizer step; `checkpoint_meta(evals)` is the meta saved with a
    checkpoint (with the last evaluation's numbers). `evals`: a resumed run's last evaluation.
    `log_seconds`: log step durations in seconds rather than milliseconds. `clock`: when the stage
    compiled its model, splits compile time from step time (the first step's time is compile time,
    left out of tokens/s and the ETA).
    """
    step, evals = start.step, evals or {}
    clock = clock or CompileClock(compiled=False)
    checkpoint, preempted, t_start = start.checkpoint if start.resumed else None, False, time.time()
    while True:
        last_step = step == steps
        if last_step or due(args.eval_every, step, start.step):
            model.eval()
            evals = evaluate(step)
            # val_bpb is logged as "val bpb"
            ctx.print0(
                f"step {step:06d} | " + " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in evals.items())
            )
            ctx.record(step=step, **evals)
            model.train()
        if last_step or preempted or due(args.save_every, step, start.step):
            checkpoint = save(
                ctx, step, model, optimizer, start, checkpoint_meta(evals), args.keep_checkpoints
            )
            report_checkpoint(ctx, step, steps, checkpoint)
        if preempted:
            return Outcome(checkpoint, evals, preempted=True, compile_seconds=clock.seconds)
        if last_step:
            return Outcome(checkpoint, evals, compile_seconds=clock.seconds)

        t0 = time.time()
        report = train_step(step)
        step += 1
        dt = time.time() - t0
        steady = clock.step_seconds(dt)  # None: the step compiled the model
        eta = (time.time() - t_start - clock.seconds) / (step - start.step) * (steps - step)
        if steady is None:
            took = f"compile + first step {dt:.1f} s"
        else:
            took = f"{dt:.1f} s" if log_seconds else f"{dt * 1000:.0f} ms"
        ctx.print0(f"step {step:06d}/{steps} | {report.log} | {took}")
        ctx.progress(
            step=step,
            total_steps=steps,
            loss=report.loss,
            **report.extra,
            tokens_per_sec=report.tokens_per_step / steady if steady else None,
            eta_seconds=eta,
            lr=start.base_lrs[-1] * report.lrm,
            grad_norm=report.grad_norm,
            tokens=report.tokens,
            step_seconds=steady,
            compile_seconds=clock.seconds if clock.compiled else None,
        )
        ctx.record(step=step, **report.record)
        preempted = ctx.should_stop()


def finish(ctx: Any, outcome: Outcome, metrics: dict[str, Any], summary: str) -> int:
    """Mark the stage done (its metrics, its final checkpoint) and end the process group."""
    ctx.done({**metrics, "compile_seconds": outcome.compile_seconds}, {"checkpoint": outcome.checkpoint})
    ctx.print0(f"{ctx.stage} done: {summary}, checkpoint {outcome.checkpoint}")
    return teardown(ctx)
