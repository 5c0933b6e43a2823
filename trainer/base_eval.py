"""The `baseEval` stage: validation bits per byte, sample completions and CORE of the base model.

    python -m nanorun.trainer.base_eval --run-dir URI [--eval-bundle auto|DIR|ZIP] [--max-per-task 500]
    torchrun --nproc_per_node=8 -m nanorun.trainer.base_eval --run-dir URI

Evaluates the checkpoint `<run-dir>/pretrain/done.json` points at. Writes `<run-dir>/baseEval/`:
`core.csv` (per-task accuracy and centred accuracy, then CORE), `samples.json`, and done.json with
`val_bpb`, `core` and the per-task centred results. The DCLM eval bundle is downloaded when the
machine is online (`--eval-bundle auto`); offline, CORE is skipped with a note unless a local bundle
is given.
"""

from __future__ import annotations

import argparse
import sys

import torch
from nanorun.pipeline import defaults, storage
from nanorun.pipeline.errors import run_main
from nanorun.pipeline.liveness import EVALUATING
from nanorun.pipeline.stages import source_keys
from nanorun.trainer.base_train import SAMPLE_PROMPTS, greedy_sample
from nanorun.trainer.data.dataloader import validation_batches
from nanorun.trainer.evaluation import core_eval
from nanorun.trainer.evaluation.loss_eval import evaluate_bpb
from nanorun.trainer.training import liveness
from nanorun.trainer.training.checkpoint import final_checkpoint, load_model
from nanorun.trainer.training.common import add_common_args, setup_stage, teardown
from nanorun.trainer.training.compilation import CompileClock, add_compile_arg, compiled_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nanorun.trainer.base_eval", description=__doc__.split("\n")[0]
    )
    add_common_args(p)
    p.add_argument(
        "--source-stage",
        default=source_keys("baseEval"),
        help="stage whose final checkpoint is evaluated (its key; a module name like base_train works too)",
    )
    p.add_argument(
        "--data", default=None, help="shards for bpb (default: the training run's; last = validation)"
    )
    p.add_argument(
        "--device-batch-size",
        type=int,
        default=defaults.DEVICE_BATCH_SIZE,
        help="rows per forward pass for bpb",
    )
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens for bpb")
    p.add_argument("--max-per-task", type=int, default=500, help="CORE examples per task (-1 = all)")
    p.add_argument(
        "--eval-bundle", default="auto", help="DCLM eval bundle: dir, zip URI, or 'auto' (download)"
    )
    p.add_argument("--sample-tokens", type=int, default=24, help="tokens per greedy sample")
    add_compile_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = setup_stage("baseEval", args)
    if ctx.already_done:
        return teardown(ctx)
    liveness.set_phase(EVALUATING)  # the whole stage: each batch is progress
    from nanorun.trainer.data.tokenizer import Tokenizer

    checkpoint = final_checkpoint(ctx.run_dir, args.source_stage)
    model, meta = load_model(checkpoint, ctx.device)
    tokenizer = Tokenizer.from_run_dir(ctx.run_dir)
    ctx.print0(f"evaluating {checkpoint} (step {meta['step']})")
    metrics: dict = {"step": meta["step"]}
    outputs: dict = {"checkpoint": checkpoint}

    # -- validation bits per byte
    if args.data:
        from nanorun.trainer.data.dataset import resolve_shards

        val_shard = resolve_shards(args.data, ctx.run_dir)[-1]
    else:
        val_shard = meta["shards"][-1]
    T = model.config.sequence_len
    B = args.device_batch_size
    steps = max(1, args.eval_tokens // (B * T * ctx.world_size))
    batches = validation_batches(tokenizer, val_shard, B, T, ctx.rank, ctx.world_size, ctx.device)
    # Batches of one shape: compiled where it pays, by the training stages' rule (a forward pass is
    # a third of a training step's FLOPs). CORE and the samples (changing shapes) stay eager.
    eval_flops = model.estimate_flops() / 3 * steps * B * T * ctx.world_size
    forward = compiled_model(model, args.compile, ctx.device, eval_flops)
    clock = CompileClock(compiled=forward is not model)
    metrics["val_bpb"] = evaluate_bpb(forward, batches, steps, tokenizer.token_bytes(), clock=clock)
    metrics["compile_seconds"] = clock.seconds
    batches.close()
    ctx.print0(
        f"val bpb: {metrics['val_bpb']:.4f} ({steps * B * T * ctx.world_size:,} tokens of {val_shard})"
    )
    compiled = clock.seconds if clock.compiled else None
    ctx.progress(flush=True, step=1, total_steps=3, val_bpb=metrics["val_bpb"], compile_seconds=compiled)

    # -- samples
    if ctx.is_master:
        samples = [
            {"prompt": p, "completion": greedy_sample(model, tokenizer, p, args.sample_tokens, ctx.device)}
            for p in SAMPLE_PROMPTS
        ]
        for s in samples:
            ctx.print0(f"  {s['completion']!r}")
        uri = storage.join(ctx.stage_dir, "samples.json")
        storage.write_json(uri, samples)
        outputs["samples"] = uri
    ctx.progress(flush=True, step=2, total_steps=3)

    # -- CORE
    bundle = core_eval.bundle_or_none(args.eval_bundle, ctx.print0)
    if bundle is not None:
        ctx.print0(f"CORE on {bundle}:")
        with torch.no_grad():
            core = core_eval.evaluate_core(
                model, tokenizer, bundle, ctx.device, args.max_per_task, log=ctx.print0
            )
        metrics.update(core=core["core"], core_tasks=core["centered"])
        ctx.print0(f"CORE: {core['core']:.4f}")
        if ctx.is_master:
            uri = storage.join(ctx.stage_dir, "core.csv")
            storage.write_text(uri, core_eval.write_csv(core))
            outputs["core_csv"] = uri
    else:
        metrics["core"] = None
    ctx.progress(flush=True, step=3, total_steps=3)
    ctx.done(metrics, outputs)
    return teardown(ctx)


if __name__ == "__main__":
    sys.exit(run_main(main))
