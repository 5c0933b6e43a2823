"""The `midtrain` stage: continue pretraining on conversations, so the base model learns the chat
format, multiple-choice answers, tool calls and who it is.

    python -m nanorun.trainer.mid_train --run-dir URI [--num-iterations N] [--limit N] ...
    torchrun --nproc_per_node=8 -m nanorun.trainer.mid_train --run-dir s3://bucket/runs/d20

Starts from pretrain's final checkpoint (or resumes from its own). The mixture is SmolTalk, MMLU
auxiliary_train, GSM8K, the identity set and the spelling tasks (offline: the tasks that need no
download, see tasks/mixtures.py). Conversations are rendered with the chat special tokens and packed
into rows exactly like pretraining (best-fit, every row starts at a document boundary, no padding),
and every token is trained. The LR is pretraining's times `--init-lr-frac`, constant, then linear to
zero over the last 20% of steps. Writes `<run-dir>/midtrain/` (progress.json, history.jsonl,
checkpoints/, done.json); SIGTERM saves a checkpoint and exits 143.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterator

import torch
from nanorun.pipeline import layout
from nanorun.pipeline.errors import run_main
from nanorun.pipeline.stages import source_keys
from nanorun.trainer.chat.conversation import render_conversation
from nanorun.trainer.data.dataloader import PackedBatches, SequenceDocuments, fit_streams, merge_states
from nanorun.trainer.evaluation.loss_eval import evaluate_bpb
from nanorun.trainer.model.optim import lr_multiplier
from nanorun.trainer.tasks.common import Task
from nanorun.trainer.tasks.mixtures import midtrain_mixture
from nanorun.trainer.training.common import add_common_args, exit_preempted, setup_stage, teardown
from nanorun.trainer.training.compilation import CompileClock, compiled_model
from nanorun.trainer.training.distributed import gather_objects, grad_norm, mean_across_ranks
from nanorun.trainer.training.finetune import (
    add_finetune_args,
    finish,
    save_checkpoint,
    set_learning_rate,
    start_training,
)
from nanorun.trainer.training.loop import Evaluation, StepReport, run_loop

WARMDOWN_RATIO = 0.2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nanorun.trainer.mid_train", description=__doc__.split("\n")[0]
    )
    add_common_args(p)
    add_finetune_args(p, source=source_keys("midtrain"), init_lr_frac=1.0)
    p.add_argument(
        "--max-seq-len", type=int, default=-1, help="row length in tokens (-1 = the model's context)"
    )
    p.add_argument(
        "--total-batch-size", type=int, default=-1, help="tokens per step (-1 = one device batch per rank)"
    )
    p.add_argument("--eval-tokens", type=int, default=2 * 524288, help="validation tokens per evaluation")
    p.add_argument("--data-streams", type=int, default=-1, help="independent data streams (-1 = auto)")
    return p


def packed(
    tokenizer,
    task: Task,
    seq_len: int,
    rows: int,
    streams: int,
    rank: int,
    world: int,
    B: int,
    device,
    state=None,
) -> PackedBatches:
    def document(i: int) -> list[int]:
        return render_conversation(tokenizer, task[i], max_tokens=seq_len + 1)[0]

    return PackedBatches(
        lambda k: SequenceDocuments(document, len(task), k, streams),
        device_batch_size=B,
        seq_len=seq_len,
        rows_per_step=rows,
        streams=streams,
        rank=rank,
        world_size=world,
        device=device,
        buffer_size=64,
        state=state,
    )


def close_loader(loader: PackedBatches) -> None:
    """Stop the packing threads and wait for them: a thread still inside torch when the interpreter
    exits aborts the process ("terminate called without an active exception")."""
    loader.close()
    for packer in loader.packers.values():
        packer.thread.join(timeout=60)


def validation(tokenizer, task: Task, seq_len: int, B: int, rank: int, world: int, device) -> Iterator:
    """The same validation rows on any world size: one stream, rank r keeps rows r, r+w, ..."""
    loader = packed(tokenizer, task, seq_len, B * world, 1, 0, 1, B * world, "cpu")
    try:
        while True:
            ((x, y),) = loader.step_batches()
            yield x[rank::world].to(device), y[rank::world].to(device)
    finally:
        close_loader(loader)


def estimate_tokens(tokenizer, task: Task, seq_len: int, sample: int = 500) -> float:
    """Tokens in one epoch of `task`, from a sample of its conversations."""
    indices = random.Random(0).sample(range(len(task)), min(sample, len(task)))
    lengths = [len(render_conversation(tokenizer, task[i], max_tokens=seq_len + 1)[0]) for i in indices]
    return sum(lengths) / len(lengths) * len(task)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = setup_stage("midtrain", args)
    if ctx.already_done:
        return teardown(ctx)
    from nanorun.trainer.data.tokenizer import Tokenizer

    model, optimizer, start = start_training(ctx, args.source, args.init_lr_frac, args.weight_decay)
    tokenizer = Tokenizer.from_run_dir(ctx.run_dir)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.float32, device=ctx.device)
    train, val, report = midtrain_mixture(layout.task_data_dir(ctx.run_dir), limit=args.limit)
    ctx.print0(str(report))

    plan = start.loop.get("plan")
    if plan is None:  # a fresh start derives the plan once; a resumed run keeps it
        T = args.max_seq_len if args.max_seq_len > 0 else model.config.sequence_len
        total = (
            args.total_batch_size
            if args.total_batch_size > 0
            else args.device_batch_size * T * ctx.world_size
        )
        rows = total // T
        streams = (
            args.data_streams
            if args.data_streams > 0
            else fit_streams(ctx.world_size, rows, len(train), "document(s)")
        )
        steps = (
            args.num_iterations
            if args.num_iterations > 0
            else max(1, int(estimate_tokens(tokenizer, train, T) // total))
        )
        plan = {
            "seq_len": T,
            "rows_per_step": rows,
            "total_batch_size": rows * T,
            "streams": streams,
            "num_iterations": steps,
        }
    T, rows, steps = plan["seq_len"], plan["rows_per_step"], plan["num_iterations"]
    B = min(args.device_batch_size, rows // ctx.world_size)
    accum = rows // (B * ctx.world_size)
    loader = packed(
        tokenizer,
        train,
        T,
        rows,
        plan["streams"],
        ctx.rank,
        ctx.world_size,
        B,
        ctx.device,
        start.loop.get("dataloader"),
    )
    loop = {"plan": plan, "smooth_loss": start.loop.get("smooth_loss", 0.0)}
    # Packed rows of one shape, as in pretraining: one compiled graph for training, one for evaluation.
    train_flops = model.estimate_flops() * plan["total_batch_size"] * (steps - start.step)
    forward = compiled_model(model, args.compile, ctx.device, train_flops)
    clock = CompileClock(compiled=forward is not model)
    ctx.print0(
        f"midtrain: {start.describe()}, {steps} steps x {plan['total_batch_size']:,} tokens; "
        f"device batch {B} x {T}, {accum} accumulation step(s); torch.compile {'on' if clock.compiled else 'off'}"
    )

    def evaluate(step: int) -> dict[str, float]:
        eval_steps = max(1, args.eval_tokens // (B * T * ctx.world_size))
        batches = validation(tokenizer, val, T, B, ctx.rank, ctx.world_size, ctx.device)
        val_bpb = evaluate_bpb(forward, batches, eval_steps, token_bytes, clock=clock)
        batches.close()  # stops and joins its packing thread
        ctx.progress(flush=True, step=step, total_steps=steps, val_bpb=val_bpb)
        return {"val_bpb": val_bpb}

    def train_step(step: int) -> StepReport:
        loss_sum = 0.0
        for x, y in loader.step_batches():
            loss = forward(x, y)
            loss_sum += loss.item()
            (loss / accum).backward()
        norm = grad_norm(model)
        lrm = lr_multiplier(step, steps, 0, WARMDOWN_RATIO, 0.0)
        set_learning_rate(optimizer, start.base_lrs, lrm)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        train_loss = mean_across_ranks(loss_sum / accum, ctx.device)
        loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * train_loss
        smooth = loop["smooth_loss"] / (1 - 0.9 ** (step + 1 - start.step))
        return StepReport(
            log=f"loss {train_loss:.4f} | lrm {lrm:.3f}",
            loss=smooth,
            lr=start.base_lrs[-1] * lrm,
            grad_norm=norm,
            tokens=plan["total_batch_size"],
            record={"loss": train_loss, "lrm": lrm, "grad_norm": norm},
        )

    def save(step: int, evals: dict[str, float]) -> str:
        states = gather_objects(loader.state_dict())
        meta = {"loop": {**loop, "dataloader": merge_states(states)}, "val_bpb": evals.get("val_bpb")}
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
    close_loader(loader)
    if outcome.preempted:
        return exit_preempted(ctx, outcome.checkpoint)
    val_bpb = outcome.evals["val_bpb"]
    metrics = {
        "val_bpb": val_bpb,
        "steps": steps,
        "tokens": steps * plan["total_batch_size"],
        "tasks": report.used,
    }
    return finish(ctx, outcome, metrics, f"val bpb {val_bpb:.4f}")


if __name__ == "__main__":
    sys.exit(run_main(main))
