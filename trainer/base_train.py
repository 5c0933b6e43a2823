"""The `pretrain` stage: pretrain the GPT on parquet shards with Muon + AdamW.

    python -m nanorun.trainer.base_train --run-dir URI [--data bundled|URI] [--depth 20] ...
    torchrun --nproc_per_node=8 -m nanorun.trainer.base_train --run-dir s3://bucket/runs/d20 ...

Same code on a laptop CPU, one GPU and several 8-GPU nodes (a PyTorchJob): one process, or one per
device under torchrun. Reads the tokenizer from `<run-dir>/tokenizer/`, writes
`<run-dir>/pretrain/` (progress.json, history.jsonl, checkpoints/, done.json).

Everything derived from `--depth` is computed in `plan_run`, nanochat's recipe (scripts/base_train.py in
https://github.com/karpathy/nanochat):
  - horizon: --num-iterations, else --target-flops, else --target-param-data-ratio x scaling params;
  - total batch: 2^19 tokens at the d12 reference horizon, x (D / D_ref)^0.383, a power of two;
  - learning rates x sqrt(B / 2^19); Muon weight decay x sqrt(B / 2^19) x D_ref / D;
  - gradient accumulation = total batch / (device batch x seq len x world size).
The plan is stored in every checkpoint and a resumed run uses the stored plan, so changing flags
cannot silently change a run half-way. Resume is automatic from the newest committed checkpoint,
on any world size that divides the run's data streams (see dataloader.py), with exactly the batches
the uninterrupted run would have seen. SIGTERM saves a checkpoint and exits 143 (retryable).
The loop is the one every training stage runs (training/loop.py); this stage hands it its step,
its evaluations (val bpb every --eval-every, CORE every --core-metric-every, greedy samples every
--sample-every) and its save (weights, optimizer, plan, loop state, the data loader's position).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch
import torch.distributed as dist
from nanorun.pipeline import defaults
from nanorun.pipeline.errors import run_main
from nanorun.trainer.data.dataloader import PackedBatches, merge_states, validation_batches
from nanorun.trainer.evaluation import core_eval
from nanorun.trainer.evaluation.loss_eval import evaluate_bpb
from nanorun.trainer.training import checkpoint as ckpt
from nanorun.trainer.training.common import add_common_args, exit_preempted, setup_stage, teardown
from nanorun.trainer.training.compilation import CompileClock, add_compile_arg, compiled_model
from nanorun.trainer.training.distributed import gather_objects, grad_norm, mean_across_ranks
from nanorun.trainer.training.loop import Evaluation, StepReport, run_loop

B_REF = 2**19  # tokens per step at the d12 reference (nanochat, measured)
D_REF_DEPTH = 12
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nanorun.trainer.base_train", description=__doc__.split("\n")[0]
    )
    add_common_args(p)
    p.add_argument(
        "--data", default="bundled", help="pretraining shards: 'bundled', a dir/prefix URI, or hf URL"
    )
    p.add_argument(
        "--shards", type=int, default=-1, help="use the first N shards (the last of them validates; -1 = all)"
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--depth", type=int, default=defaults.DEPTH, help="transformer layers; width and heads follow from it"
    )
    m.add_argument(
        "--aspect-ratio", type=int, default=defaults.ASPECT_RATIO, help="model width = depth x aspect ratio"
    )
    m.add_argument("--head-dim", type=int, default=defaults.HEAD_DIM, help="attention head dimension")
    m.add_argument("--max-seq-len", type=int, default=defaults.MAX_SEQ_LEN, help="context length in tokens")
    m.add_argument(
        "--window-pattern",
        default="auto",
        help="per-layer sliding-window pattern (S short, L long); auto: SSSL where Flash Attention 3 "
        "runs (it skips the masked blocks), L elsewhere (a band mask saves nothing under SDPA)",
    )
    m.add_argument(
        "--fp8",
        action="store_true",
        help="FP8 matmuls in the block linears (GPUs with FP8 tensor cores, e.g. H100; ignored elsewhere)",
    )
    m.add_argument(
        "--n-kv-head",
        type=int,
        default=None,
        help="key/value heads (grouped-query attention; default = heads)",
    )
    add_compile_arg(m)
    h = p.add_argument_group("horizon (first one set wins)")
    h.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = derive)")
    h.add_argument("--target-flops", type=float, default=-1.0, help="training FLOPs to spend (-1 = off)")
    h.add_argument(
        "--target-param-data-ratio",
        type=float,
        default=defaults.PARAM_DATA_RATIO,
        help="tokens per scaling parameter",
    )
    o = p.add_argument_group("optimization")
    o.add_argument(
        "--device-batch-size",
        type=int,
        default=defaults.DEVICE_BATCH_SIZE,
        help="rows per forward/backward on one device",
    )
    o.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1 = auto)")
    o.add_argument("--embedding-lr", type=float, default=0.3, help="AdamW LR of the token embedding")
    o.add_argument("--unembedding-lr", type=float, default=0.008, help="AdamW LR of the LM head")
    o.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices")
    o.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW LR of the per-layer scalars")
    o.add_argument("--weight-decay", type=float, default=0.28, help="Muon weight decay at the d12 reference")
    o.add_argument("--warmup-steps", type=int, default=40, help="linear LR warmup steps")
    o.add_argument(
        "--warmdown-ratio", type=float, default=0.65, help="fraction of steps of linear LR warmdown"
    )
    o.add_argument(
        "--final-lr-frac", type=float, default=0.05, help="LR at the end, as a fraction of the peak"
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data-streams",
        type=int,
        default=-1,
        help="independent data streams (-1 = fit the data: up to 8, or a multiple of the world size)",
    )
    d.add_argument(
        "--doc-buffer", type=int, default=256, help="tokenized documents per stream for best-fit packing"
    )
    e = p.add_argument_group("evaluation and checkpoints")
    e.add_argument(
        "--eval-every", type=int, default=250, help="validation bpb every N steps (-1 = only at the end)"
    )
    e.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per evaluation")
    e.add_argument(
        "--sample-every", type=int, default=2000, help="print greedy samples every N steps (-1 = off)"
    )
    e.add_argument(
        "--core-metric-every", type=int, default=-1, help="CORE every N steps (-1 = off; baseEval runs it)"
    )
    e.add_argument("--core-metric-max-per-task", type=int, default=500, help="CORE examples per task")
    e.add_argument(
        "--eval-bundle", default="auto", help="DCLM eval bundle: dir, zip URI, or 'auto' (download)"
    )
    e.add_argument(
        "--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)"
    )
    e.add_argument("--keep-checkpoints", type=int, default=3, help="committed checkpoints to keep")
    return p


def window_pattern_for(flag: str, device: torch.device) -> str:
    """The window pattern a fresh run trains with (a resumed one keeps its checkpoint's): `auto`
    is nanochat's SSSL where FA3 makes short windows cheaper, and L where they would only add a mask."""
    if flag != "auto":
        return flag
    from nanorun.trainer.model.attention import fa3_available

    return "SSSL" if fa3_available(device) else "L"


def model_config(args: argparse.Namespace, vocab_size: int, depth: int | None = None):
    from nanorun.trainer.model.gpt import GPTConfig

    return GPTConfig.from_depth(
        depth or args.depth,
        vocab_size,
        args.max_seq_len,
        aspect_ratio=args.aspect_ratio,
        head_dim=args.head_dim,
        n_kv_head=args.n_kv_head if depth is None else None,
        window_pattern=args.window_pattern,
    )


def scaling_params(config) -> int:
    from nanorun.trainer.model.gpt import GPT

    with torch.device("meta"):
        return GPT(config).num_scaling_params()


def plan_run(args: argparse.Namespace, config, flops_per_token: float, world_size: int) -> dict[str, Any]:
    """Horizon, batch size, learning rates and weight decay, derived from the model (nanochat's recipe)."""
    ratio = args.target_param_data_ratio if args.target_param_data_ratio > 0 else defaults.PARAM_DATA_RATIO
    # The token budget: ratio x the parameters that do matmuls per token (block matrices and LM head;
    # embedding rows are looked up, not multiplied, so they do not count).
    target_tokens = ratio * scaling_params(config)
    # The budget the same ratio gives the d12 reference model, whose batch (B_REF) and learning rates
    # were tuned: everything below scales from there by how much longer this run is.
    d_ref = ratio * scaling_params(model_config(args, config.vocab_size, depth=D_REF_DEPTH))
    total_batch = args.total_batch_size
    if total_batch <= 0:
        # The best batch grows with the budget, but sublinearly (nanochat's exponent, 0.383); a power
        # of two divides evenly into ranks, sequences and micro-batches.
        total_batch = 2 ** round(math.log2(B_REF * (target_tokens / d_ref) ** 0.383))
    if total_batch % args.max_seq_len:
        raise SystemExit(
            f"--total-batch-size {total_batch} must be a multiple of --max-seq-len {args.max_seq_len}"
        )
    if args.num_iterations > 0:
        steps = args.num_iterations
    elif args.target_flops > 0:
        steps = round(
            args.target_flops / (flops_per_token * total_batch)
        )  # FLOPs = steps x batch x FLOPs/token
    else:
        steps = int(target_tokens // total_batch)
    # A bigger batch averages away more gradient noise, so it takes bigger steps: for Adam-type
    # optimizers the learning rate scales with the square root of the batch (Malladi et al. 2022,
    # arXiv:2205.10287).
    lr_scale = math.sqrt(total_batch / B_REF)
    return {
        "num_iterations": max(1, steps),
        "total_batch_size": total_batch,
        "rows_per_step": total_batch // args.max_seq_len,
        "seq_len": args.max_seq_len,
        "data_streams": max(0, args.data_streams),  # 0: fitted to the data when the loader opens it
        "doc_buffer": args.doc_buffer,
        "lr": {
            "matrix_lr": args.matrix_lr * lr_scale,
            "embedding_lr": args.embedding_lr * lr_scale,
            "unembedding_lr": args.unembedding_lr * lr_scale,
            "scalar_lr": args.scalar_lr * lr_scale,
            # Decoupled weight decay shrinks the weights by lr x wd every step; a run with more tokens
            # than the reference decays less per token, so that the decay's timescale stays a fixed
            # fraction of the run (Wang & Aitchison 2024, arXiv:2405.13698).
            "weight_decay": args.weight_decay * lr_scale * d_ref / target_tokens,
        },
        "warmup_steps": args.warmup_steps,
        "warmdown_ratio": args.warmdown_ratio,
        "final_lr_frac": args.final_lr_frac,
    }


@torch.no_grad()
def greedy_sample(
    model: torch.nn.Module, tokenizer: Any, prompt: str, max_tokens: int, device: torch.device
) -> str:
    """Greedy continuation of `prompt` (full forward per token: fine for a few short samples)."""
    ids = tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    for _ in range(max_tokens):
        nxt = model(x[:, -model.config.sequence_len :])[0, -1].argmax()
        x = torch.cat([x, nxt.view(1, 1)], dim=1)
    return tokenizer.decode(x[0, 1:].tolist())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = setup_stage("pretrain", args)
    args.window_pattern = window_pattern_for(args.window_pattern, ctx.device)
    if ctx.already_done:
        return teardown(ctx)
    from nanorun.trainer.data.dataset import resolve_shards
    from nanorun.trainer.data.tokenizer import Tokenizer
    from nanorun.trainer.model.gpt import build_model
    from nanorun.trainer.model.optim import lr_multiplier, muon_momentum

    tokenizer = Tokenizer.from_run_dir(ctx.run_dir)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.float32, device=ctx.device)

    # -- model, plan and optimizer: fresh, or as this configuration's newest committed checkpoint left them
    resume_uri = ckpt.resumable_checkpoint(ctx.stage_dir)
    if resume_uri:
        model, meta = ckpt.load_model(resume_uri, ctx.device)
        model.train()
    else:
        model, meta = build_model(model_config(args, tokenizer.vocab_size), ctx.device), None
        if ctx.distributed:  # no DDP wrapper: make sure every rank starts from rank 0's weights
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)
    config = model.config
    flops_per_token = model.estimate_flops()
    plan = meta["plan"] if meta else plan_run(args, config, flops_per_token, ctx.world_size)
    shards = meta["shards"] if meta else resolve_shards(args.data, ctx.run_dir)
    if not meta and args.shards > 0:
        shards = shards[: args.shards]
    if len(shards) < 2:
        raise SystemExit(
            f"--data {args.data} resolved to {len(shards)} shard(s); need 2+ (the last is validation)"
        )
    optimizer = model.setup_optimizer(**plan["lr"])
    if meta:
        ckpt.load_optimizer(resume_uri, optimizer)
        ckpt.restore_rng(meta.get("rng"))
    base_lr = [g["lr"] for g in optimizer.param_groups]
    base_wd = [g.get("weight_decay", 0.0) for g in optimizer.param_groups]
    fp8 = False
    if args.fp8:
        from nanorun.trainer.model.fp8 import enable_fp8, native_fp8

        fp8 = native_fp8(ctx.device)
        if fp8:
            # Before torch.compile, so the compiled graph holds the FP8 matmuls. Evaluation and
            # sampling run the eager model with FP8 off (loop.evaluating), as nanochat evaluates in bf16.
            ctx.print0(f"fp8: {enable_fp8(model)} block linears switched to FP8 matmuls")
        else:
            ctx.print0("fp8: this device has no FP8 tensor cores; training in the default precision")
    step = meta["step"] if meta else 0
    num_iterations, T = plan["num_iterations"], plan["seq_len"]
    train_flops = flops_per_token * plan["total_batch_size"] * (num_iterations - step)
    train_model = compiled_model(model, args.compile, ctx.device, train_flops)
    clock = CompileClock(compiled=train_model is not model)
    # bpb evaluation runs the compiled module too (a no-grad graph of its own, compiled at the first
    # evaluation); with FP8 on it runs the eager model in bf16 instead, leaving the training graph as is.
    eval_model = model if fp8 else train_model
    B = min(args.device_batch_size, plan["rows_per_step"] // ctx.world_size)
    loader = PackedBatches.for_shards(
        tokenizer,
        shards[:-1],
        device_batch_size=B,
        seq_len=T,
        rows_per_step=plan["rows_per_step"],
        streams=plan["data_streams"],
        rank=ctx.rank,
        world_size=ctx.world_size,
        device=ctx.device,
        buffer_size=plan["doc_buffer"],
        state=meta["dataloader"] if meta else None,
    )
    plan["data_streams"] = (
        loader.streams
    )  # recorded in every checkpoint: a resumed run reads the same batches
    accum = plan["rows_per_step"] // (B * ctx.world_size)
    loop = (
        meta["loop"]
        if meta
        else {"min_val_bpb": None, "smooth_loss": 0.0, "train_seconds": 0.0, "timed_steps": 0}
    )
    ctx.load_history(before_step=step)
    ctx.print0(
        f"model: depth {config.n_layer}, width {config.n_embd}, {model.num_params():,} parameters, "
        f"{flops_per_token:.3e} FLOPs/token"
    )
    ctx.print0(
        f"plan: {num_iterations} steps x {plan['total_batch_size']:,} tokens; device batch {B} x {T}, "
        f"{accum} accumulation step(s) x {ctx.world_size} rank(s); lr {plan['lr']}; "
        f"torch.compile {'on' if clock.compiled else 'off'}"
    )
    if meta:
        ctx.print0(f"resuming from {resume_uri} (step {step}, saved on {meta['world_size']} rank(s))")

    def validate(step: int) -> dict[str, float]:
        eval_steps = max(1, args.eval_tokens // (B * T * ctx.world_size))
        batches = validation_batches(tokenizer, shards[-1], B, T, ctx.rank, ctx.world_size, ctx.device)
        val_bpb = evaluate_bpb(eval_model, batches, eval_steps, token_bytes, clock=clock)
        batches.close()
        loop["min_val_bpb"] = val_bpb if loop["min_val_bpb"] is None else min(loop["min_val_bpb"], val_bpb)
        ctx.progress(flush=True, step=step, total_steps=num_iterations, val_bpb=val_bpb)
        return {"val_bpb": val_bpb}

    bundle = None  # the DCLM eval bundle, opened at the first CORE evaluation

    def core_metric(step: int) -> dict[str, float]:
        nonlocal bundle
        bundle = bundle or core_eval.bundle_or_none(args.eval_bundle, ctx.print0)
        if bundle is None:
            return {}
        core = core_eval.evaluate_core(model, tokenizer, bundle, ctx.device, args.core_metric_max_per_task)
        loop["core"] = core["core"]
        return {"core": core["core"]}

    def samples(step: int) -> dict[str, float]:
        texts = [
            {"prompt": p, "text": greedy_sample(model, tokenizer, p, 16, ctx.device)} for p in SAMPLE_PROMPTS
        ]
        for sample in texts:
            ctx.print0("  sample:", repr(sample["text"]))
        # In the history too: the explainer's training page shows English emerging step by step.
        ctx.record(step=step, samples=texts)
        return {}

    evaluations = [Evaluation("val", args.eval_every, validate)]
    if args.core_metric_every > 0:
        evaluations.append(Evaluation("core", args.core_metric_every, core_metric))
    if ctx.is_master and args.sample_every > 0:
        evaluations.append(Evaluation("samples", args.sample_every, samples))

    def train_step(step: int) -> StepReport:
        """One optimizer step: accumulate gradients over this rank's micro-batches."""
        batches = loader.step_batches()
        loss_sum = torch.zeros((), device=ctx.device)
        for x, y in batches:
            loss = train_model(x, y)
            loss_sum += loss.detach()
            (loss / accum).backward()
        norm = grad_norm(model)
        lrm = lr_multiplier(
            step, num_iterations, plan["warmup_steps"], plan["warmdown_ratio"], plan["final_lr_frac"]
        )
        for g, lr, wd in zip(optimizer.param_groups, base_lr, base_wd, strict=True):
            g["lr"] = lr * lrm
            if g.get("kind") == "muon":
                g["momentum"] = muon_momentum(step)
                g["weight_decay"] = wd * 0.5 * (1 + math.cos(math.pi * step / num_iterations))
        optimizer.step()
        model.zero_grad(set_to_none=True)
        train_loss = mean_across_ranks((loss_sum / len(batches)).item(), ctx.device)
        loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * train_loss
        smooth = loop["smooth_loss"] / (1 - 0.9 ** (step + 1))
        return StepReport(
            log=f"loss {train_loss:.4f} (smooth {smooth:.4f}) | lrm {lrm:.3f} | grad norm {norm:.3f}",
            loss=smooth,
            lr=plan["lr"]["matrix_lr"] * lrm,
            grad_norm=norm,
            tokens=plan["total_batch_size"],
            record={"loss": train_loss, "lrm": lrm, "grad_norm": norm},
        )

    def save(step: int, evals: dict[str, float]) -> str:
        saved = {
            "plan": plan,
            "shards": shards,
            "loop": loop,
            "val_bpb": evals.get("val_bpb"),
            "dataloader": merge_states(gather_objects(loader.state_dict())),
            "model_config": model.config.to_dict(),
        }
        return ckpt.save_checkpoint(
            ctx.stage_dir, step, model, optimizer, saved, keep_last=args.keep_checkpoints
        )

    outcome = run_loop(
        ctx,
        model,
        first_step=step,
        steps=num_iterations,
        train_step=train_step,
        evaluations=evaluations,
        save=save,
        save_every=args.save_every,
        checkpoint=resume_uri,
        evals={"val_bpb": meta["val_bpb"]} if meta and meta.get("val_bpb") is not None else None,
        clock=clock,
        timing=loop,  # its train_seconds and timed_steps travel in the checkpoint
        flops_per_token=flops_per_token,
    )
    loader.close()
    if outcome.preempted:
        return exit_preempted(ctx, outcome.checkpoint)
    val_bpb = outcome.evals["val_bpb"]
    metrics = {
        "val_bpb": val_bpb,
        "min_val_bpb": loop["min_val_bpb"],
        "core": loop.get("core"),
        "steps": num_iterations,
        "tokens": num_iterations * plan["total_batch_size"],
        "params": model.num_params(),
        "scaling_params": model.num_scaling_params(),  # what the horizon and a sweep's fits count
        "train_seconds": loop["train_seconds"],
        "compile_seconds": outcome.compile_seconds,  # this attempt's, like done.json's seconds
        "flops": flops_per_token * num_iterations * plan["total_batch_size"],
    }
    ctx.done(metrics, {"checkpoint": outcome.checkpoint})
    ctx.print0(f"pretrain done: val bpb {val_bpb:.4f}, checkpoint {outcome.checkpoint}")
    return teardown(ctx)


if __name__ == "__main__":
    sys.exit(run_main(main))
