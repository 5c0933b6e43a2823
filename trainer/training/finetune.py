"""What the post-training stages (`midtrain`, `sft`, `rl`) share: where they start from,
their optimizer and learning-rate schedule, their loop and their checkpoints.

    model, optimizer, start = start_training(ctx, sources=("midtrain", "pretrain"), init_lr_frac=0.8)
    outcome = run_loop(ctx, model, first_step=start.step, ..., checkpoint=start.resumed_from)  # loop.py
    if outcome.preempted:
        return exit_preempted(ctx, outcome.checkpoint)
    return finish(ctx, outcome, metrics, summary)

- A stage resumes from its own newest committed checkpoint of the same configuration id (model,
  optimizer, step, loop state, history.jsonl up to that step); otherwise it starts from the final
  checkpoint of the first finished stage in `sources`.
- They run the loop of every stage (training/loop.py): evaluations at the end and every
  `--eval-every` steps, checkpoints at the end, every `--save-every` steps and when preempted.
- Learning rates are the pretraining run's (stored in every checkpoint's meta) times
  `--init-lr-frac`, so post-training inherits the scaling pretraining derived from the model size.
- Each checkpoint records `lr` and `source`, so the next stage inherits them too.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch
from nanorun.pipeline.progress import is_done
from nanorun.pipeline.stages import BY_KEY, by_key
from nanorun.trainer.training import checkpoint as ckpt
from nanorun.trainer.training.common import teardown
from nanorun.trainer.training.compilation import add_compile_arg
from nanorun.trainer.training.loop import Outcome

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

    @property
    def resumed_from(self) -> str | None:
        """The checkpoint a resumed run continues (None for a fresh start from a source stage)."""
        return self.checkpoint if self.resumed else None

    def describe(self) -> str:
        return f"from {self.checkpoint} ({'resumed' if self.resumed else self.source_stage})"


def source_checkpoint(run_dir: str, sources: tuple[str, ...] | str) -> tuple[str, str]:
    """(stage key, final checkpoint) of the first finished stage in `sources` (stage keys)."""
    names = tuple(s.strip() for s in sources.split(",")) if isinstance(sources, str) else sources
    try:
        stages = tuple(by_key(name).key for name in names)
    except ValueError as err:
        raise SystemExit(f"--source {','.join(names)}: {err}") from None
    for stage in stages:
        if is_done(run_dir, stage):
            return stage, ckpt.final_checkpoint(run_dir, stage)
    raise SystemExit(
        f"none of the source stages {', '.join(stages)} has finished in {run_dir}; run one of them first "
        f"(e.g. `python -m {BY_KEY[stages[-1]].entry_point} --run-dir {run_dir}`)"
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


def save_checkpoint(
    ctx: Any,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    start: Start,
    meta: dict[str, Any],
    keep_last: int,
) -> str:
    """A checkpoint of the stage: the stage's `meta` plus where post-training started and its LRs."""
    full = {"source": start.source_stage, "lr": start.lr, "model_config": model.config.to_dict(), **meta}
    return ckpt.save_checkpoint(ctx.stage_dir, step, model, optimizer, full, keep_last=keep_last)


def finish(ctx: Any, outcome: Outcome, metrics: dict[str, Any], summary: str) -> int:
    """Mark the stage done (its metrics, its final checkpoint) and end the process group."""
    ctx.done({**metrics, "compile_seconds": outcome.compile_seconds}, {"checkpoint": outcome.checkpoint})
    ctx.print0(f"{ctx.stage} done: {summary}, checkpoint {outcome.checkpoint}")
    return teardown(ctx)
