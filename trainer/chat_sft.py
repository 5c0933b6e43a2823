"""The `sft` stage: supervised finetuning on conversations, shaped the way the model is prompted.

    python -m nanorun.trainer.chat_sft --run-dir URI [--num-iterations N] [--examples-per-step 32] ...
    torchrun --nproc_per_node=8 -m nanorun.trainer.chat_sft --run-dir s3://bucket/runs/d20

Starts from midtrain's final checkpoint, or pretrain's when there was no midtraining (or resumes
from its own). Unlike midtraining, rows are not packed: each row is one conversation, padded to the
longest in its micro-batch, and the loss covers only what the assistant must produce (the
conversation mask; padding and everything else are -1 targets). Each optimizer step sees
`--examples-per-step` conversations, split over ranks and micro-batches of `--device-batch-size`.
LR: pretraining's times `--init-lr-frac`, linear to zero over the last `--warmdown-ratio` of steps;
Muon momentum 0.85 -> 0.95 over the first 300 steps. Validation: bits per byte of the assistant
tokens of held-out conversations. Writes `<run-dir>/sft/`; SIGTERM saves and exits 143.
"""

from __future__ import annotations

import argparse
import sys

import torch
from nanorun.pipeline import layout
from nanorun.pipeline.errors import run_main
from nanorun.pipeline.stages import source_keys
from nanorun.trainer.chat.conversation import render_conversation
from nanorun.trainer.evaluation.loss_eval import evaluate_bpb
from nanorun.trainer.model.optim import lr_multiplier, muon_momentum
from nanorun.trainer.tasks.common import Task
from nanorun.trainer.tasks.mixtures import sft_mixture
from nanorun.trainer.training.common import add_common_args, exit_preempted, setup_stage, teardown
from nanorun.trainer.training.compilation import CompileClock, compiled_model
from nanorun.trainer.training.distributed import grad_norm, sum_across_ranks
from nanorun.trainer.training.finetune import (
    add_finetune_args,
    check_examples_per_step,
    epoch_steps,
    finish,
    save_checkpoint,
    set_learning_rate,
    start_training,
)
from nanorun.trainer.training.loop import Evaluation, StepReport, run_loop


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nanorun.trainer.chat_sft", description=__doc__.split("\n")[0])
    add_common_args(p)
    add_finetune_args(p, source=source_keys("sft"), init_lr_frac=0.8)
    p.add_argument(
        "--examples-per-step", type=int, default=32, help="conversations per optimizer step (all ranks)"
    )
    p.add_argument(
        "--max-seq-len", type=int, default=-1, help="longest row in tokens (-1 = the model's context)"
    )
    p.add_argument(
        "--warmdown-ratio", type=float, default=0.5, help="fraction of steps of linear LR decay to 0"
    )
    p.add_argument("--eval-examples", type=int, default=64, help="held-out conversations per validation")
    return p


def sft_batch(
    tokenizer, conversations: list[dict], max_len: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of padded rows; targets are -1 wherever the mask is 0 and on padding."""
    pad = tokenizer.encode_special("<|assistant_end|>")
    rendered = [render_conversation(tokenizer, c, max_tokens=max_len + 1) for c in conversations]
    width = max(len(ids) for ids, _ in rendered) - 1
    x = torch.full((len(rendered), width), pad, dtype=torch.long)
    y = torch.full((len(rendered), width), -1, dtype=torch.long)
    for row, (ids, mask) in enumerate(rendered):
        n = len(ids) - 1
        x[row, :n] = torch.tensor(ids[:-1])
        targets = torch.tensor(ids[1:])
        targets[torch.tensor(mask[1:]) == 0] = -1
        y[row, :n] = targets
    return x.to(device), y.to(device)


def step_examples(task: Task, step: int, per_step: int, rank: int, world: int) -> list[dict]:
    """This rank's conversations of optimizer step `step` (the data wraps around after an epoch)."""
    first = step * per_step
    return [task[(first + i) % len(task)] for i in range(rank, per_step, world)]


def validation_bpb(model, tokenizer, task: Task, n: int, B: int, T: int, ctx, token_bytes) -> float:
    mine = [task[i % len(task)] for i in range(ctx.rank, n, ctx.world_size)]
    batches = [sft_batch(tokenizer, mine[i : i + B], T, ctx.device) for i in range(0, len(mine), B)]
    return evaluate_bpb(model, batches, len(batches), token_bytes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = setup_stage("sft", args)
    if ctx.already_done:
        return teardown(ctx)
    from nanorun.trainer.data.tokenizer import Tokenizer

    check_examples_per_step(args.examples_per_step, ctx.world_size)
    model, optimizer, start = start_training(ctx, args.source, args.init_lr_frac, args.weight_decay)
    tokenizer = Tokenizer.from_run_dir(ctx.run_dir)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.float32, device=ctx.device)
    train, val, report = sft_mixture(layout.task_data_dir(ctx.run_dir), limit=args.limit)
    ctx.print0(str(report))
    T = args.max_seq_len if args.max_seq_len > 0 else model.config.sequence_len
    per_rank = args.examples_per_step // ctx.world_size
    B = min(args.device_batch_size, per_rank)
    steps = epoch_steps(start, args, len(train))
    loop = {"num_iterations": steps}
    # Rows are padded to the longest conversation of their batch, so shapes change from batch to
    # batch: compiled only with --compile (then with dynamic shapes), since each shape would recompile.
    forward = compiled_model(model, args.compile, ctx.device, 0, static_shapes=False)
    clock = CompileClock(compiled=forward is not model)
    ctx.print0(
        f"sft: {start.describe()}, {steps} steps x {args.examples_per_step} conversations "
        f"({len(train)} in the mixture)"
    )

    def evaluate(step: int) -> dict[str, float]:
        val_bpb = validation_bpb(forward, tokenizer, val, args.eval_examples, B, T, ctx, token_bytes)
        ctx.progress(flush=True, step=step, total_steps=steps, val_bpb=val_bpb)
        return {"val_bpb": val_bpb}

    def train_step(step: int) -> StepReport:
        examples = step_examples(train, step, args.examples_per_step, ctx.rank, ctx.world_size)
        micro = [sft_batch(tokenizer, examples[i : i + B], T, ctx.device) for i in range(0, len(examples), B)]
        # weight each micro-batch by its share of this rank's trained tokens: a token-level mean per rank
        trained = sum(int((y >= 0).sum()) for _, y in micro)
        loss_sum, tokens = 0.0, 0
        for x, y in micro:
            n = int((y >= 0).sum())
            if n == 0:
                continue
            loss = forward(x, y)
            (loss * n / trained).backward()
            loss_sum += loss.item() * n
            tokens += n
        norm = grad_norm(model)
        lrm = lr_multiplier(step, steps, 0, args.warmdown_ratio, 0.0)
        set_learning_rate(optimizer, start.base_lrs, lrm, momentum=muon_momentum(step))
        optimizer.step()
        model.zero_grad(set_to_none=True)
        # Every rank's rows differ in length: the step's tokens and its token-level mean loss are
        # sums over all ranks, not this rank's count times the world size.
        loss_sum, all_tokens = sum_across_ranks([loss_sum, tokens], ctx.device)
        train_loss = loss_sum / max(all_tokens, 1)
        return StepReport(
            log=f"loss {train_loss:.4f} | lrm {lrm:.3f} | {int(all_tokens)} tokens",
            loss=train_loss,
            lr=start.base_lrs[-1] * lrm,
            grad_norm=norm,
            tokens=int(all_tokens),
            record={"loss": train_loss, "lrm": lrm, "grad_norm": norm},
        )

    def save(step: int, evals: dict[str, float]) -> str:
        meta = {"loop": loop, "val_bpb": evals.get("val_bpb")}
        return save_checkpoint(ctx, step, model, optimizer, start, meta, args.keep_checkpoints)

    outcome = run_loop(
        ctx,
        model,
        first_step=start.step,
        steps=steps,
        train_step=train_step,
        evaluations=[Evaluation("val", args.eval_every, evaluate)],
        save=save,
        save_every=args.save_every,
        checkpoint=start.resumed_from,
        clock=clock,
    )
    if outcome.preempted:
        return exit_preempted(ctx, outcome.checkpoint)
    val_bpb = outcome.evals["val_bpb"]
    metrics = {
        "val_bpb": val_bpb,
        "steps": steps,
        "examples": steps * args.examples_per_step,
        "tasks": report.used,
    }
    return finish(ctx, outcome, metrics, f"val bpb {val_bpb:.4f}")


if __name__ == "__main__":
    sys.exit(run_main(main))
