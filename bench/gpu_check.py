"""GPU check: the trainer's and the engine's GPU paths, run for real on one GPU in a few minutes.

    python bench/gpu_check.py                 (or `make gpu-check`)
    python bench/gpu_check.py --smoke         the same code on a tiny model, on CPU when there is no GPU

On one GPU it prints the device and then, as one JSON line at the end:

- `train`: for depth 12 and 20 at sequence 2048, bf16 and torch.compile, the largest device batch
  (32, 16, 8, ... rows) whose step fits in memory; its tokens/s, MFU against the device's dense
  bf16 peak (bench/train_throughput.py), the compile seconds (the first step) apart from the step
  time, and the attention kernel (FA3 or SDPA);
- `fp8`: on a GPU with FP8 tensor cores, the same steps from the same weights in bf16 and with FP8
  matmuls (trainer/model/fp8.py), and how far their losses drift apart;
- `resume`: a checkpoint written by the trainer's own code (trainer/training/checkpoint.py) after a
  few steps, loaded into a fresh model and optimizer, continues with bit-identical losses;
- `decode`: KV-cache decoding, the engine's path (trainer/chat/engine.py), at batch 1, 8 and 32:
  tokens/s.

Without CUDA (and without --smoke) it says so and exits 0. --smoke shrinks every size so the whole
check runs in seconds on a CPU: the tests run it that way, so the code a GPU runs is code that ran.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from nanorun.trainer.chat.engine import new_kv_cache
from nanorun.trainer.model.attention import backend_name
from nanorun.trainer.model.fp8 import enable_fp8, native_fp8
from nanorun.trainer.model.gpt import GPTConfig, build_model
from nanorun.trainer.training import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import device_label, peak_flops  # noqa: E402

LR = {"matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008, "scalar_lr": 0.5, "weight_decay": 0.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_for(depth: int, seq_len: int, vocab: int, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    config = GPTConfig.from_depth(depth, vocab, seq_len)
    return build_model(config, device)


def batch(
    vocab: int, rows: int, seq_len: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, seq_len + 1), generator=g).to(device)
    return tokens[:, :-1], tokens[:, 1:]


def train_steps(model, forward, optimizer, batches) -> list[float]:
    losses = []
    for x, y in batches:
        loss = forward(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def throughput(
    depth: int, seq_len: int, vocab: int, device: torch.device, compile_: bool, rows_options, steps: int
):
    """The largest batch of `rows_options` that fits, timed: compile (first step) apart from steps."""
    for rows in rows_options:
        model = forward = optimizer = None
        try:
            model = model_for(depth, seq_len, vocab, device)
            optimizer = model.setup_optimizer(**LR)
            forward = torch.compile(model, dynamic=False) if compile_ else model
            x, y = batch(vocab, rows, seq_len, device, seed=1)
            t0 = time.perf_counter()
            train_steps(model, forward, optimizer, [(x, y)])
            sync(device)
            compile_seconds = time.perf_counter() - t0
            train_steps(model, forward, optimizer, [(x, y)])  # a second warm step (optimizer state exists)
            sync(device)
            t0 = time.perf_counter()
            losses = train_steps(model, forward, optimizer, [(x, y)] * steps)
            sync(device)
            step_seconds = (time.perf_counter() - t0) / steps
        except torch.OutOfMemoryError:
            del model, forward, optimizer
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        tokens_per_second = rows * seq_len / step_seconds
        flops = model.estimate_flops()
        peak = peak_flops(device)
        out = {
            "depth": depth,
            "params": model.num_params(),
            "seq_len": seq_len,
            "device_batch": rows,
            "compile": compile_,
            "compile_seconds": round(compile_seconds, 2),
            "step_seconds": round(step_seconds, 4),
            "tokens_per_second": round(tokens_per_second, 1),
            "mfu": round(flops * tokens_per_second / peak, 4) if peak else None,
            "final_loss": round(losses[-1], 4),
            "max_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda"
            else None,
        }
        del model, forward, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        return out
    return {"depth": depth, "seq_len": seq_len, "error": f"no device batch of {list(rows_options)} fits"}


def fp8_drift(
    depth: int, seq_len: int, vocab: int, rows: int, steps: int, device: torch.device, force: bool
) -> dict:
    """Training in the model's own precision (bf16 on a GPU) and with FP8 matmuls, from the same
    weights on the same batches: how far the losses drift apart."""
    if not (native_fp8(device) or force):
        return {"skipped": f"{device_label(device)} has no FP8 tensor cores"}
    batches = [batch(vocab, rows, seq_len, device, seed=s) for s in range(steps)]
    runs = {}
    for name in ("baseline", "fp8"):
        model = model_for(depth, seq_len, vocab, device)
        switched = enable_fp8(model) if name == "fp8" else 0
        optimizer = model.setup_optimizer(**LR)
        runs[name] = (train_steps(model, model, optimizer, batches), switched)
    (bf16, _), (fp8, switched) = runs["baseline"], runs["fp8"]
    diffs = [abs(a - b) for a, b in zip(bf16, fp8, strict=True)]
    return {
        "linears_in_fp8": switched,
        "baseline_dtype": str(model_for(1, 8, 16, device).compute_dtype).removeprefix("torch."),
        "baseline_losses": [round(v, 4) for v in bf16],
        "fp8_losses": [round(v, 4) for v in fp8],
        "max_abs_diff": round(max(diffs), 4),
        "final_rel_diff": round(diffs[-1] / bf16[-1], 4),
    }


def resume_exact(depth: int, seq_len: int, vocab: int, rows: int, device: torch.device) -> dict:
    """Train 3 steps, checkpoint with the trainer's code, train 3 more; a fresh model and optimizer
    loaded from the checkpoint must give the same 3 losses, bit for bit."""
    batches = [batch(vocab, rows, seq_len, device, seed=10 + s) for s in range(6)]
    model = model_for(depth, seq_len, vocab, device)
    optimizer = model.setup_optimizer(**LR)
    train_steps(model, model, optimizer, batches[:3])
    with tempfile.TemporaryDirectory(prefix="nanorun-gpu-check-") as stage_dir:
        uri = ckpt.save_checkpoint(stage_dir, 3, model, optimizer, {"model_config": model.config.to_dict()})
        straight = train_steps(model, model, optimizer, batches[3:])
        loaded, _ = ckpt.load_model(uri, device)
        loaded.train()
        loaded_optimizer = loaded.setup_optimizer(**LR)
        ckpt.load_optimizer(uri, loaded_optimizer)
        resumed = train_steps(loaded, loaded, loaded_optimizer, batches[3:])
    return {"straight": straight, "resumed": resumed, "bit_exact": straight == resumed}


@torch.inference_mode()
def decode(
    depth: int, vocab: int, prompt_len: int, new_tokens: int, batches, device: torch.device
) -> list[dict]:
    """Tokens/s of KV-cache decoding (prefill once, then one token per row per step, greedy)."""
    model = model_for(depth, prompt_len + new_tokens, vocab, device)
    model.eval()
    out = []
    for rows in batches:
        cache = new_kv_cache(model, rows, prompt_len + new_tokens)
        prompt, _ = batch(vocab, rows, prompt_len, device, seed=rows)
        logits = model(prompt, kv_cache=cache)[:, -1, :]
        sync(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            ids = logits.argmax(dim=-1, keepdim=True)
            logits = model(ids, kv_cache=cache)[:, -1, :]
        sync(device)
        seconds = time.perf_counter() - t0
        out.append({"batch": rows, "tokens_per_second": round(rows * new_tokens / seconds, 1)})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds, runs on CPU too)")
    parser.add_argument("--device", default="", help="cuda, cuda:N or cpu (default: cuda when there is one)")
    args = parser.parse_args(argv)
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.smoke:
        device = torch.device("cpu")
    else:
        print("gpu_check: no CUDA device on this machine; nothing to check (--smoke runs the code on CPU)")
        return {"benchmark": "gpu_check", "device": None}
    if args.smoke:
        depths, seq_len, vocab, rows_options, steps = (2, 3), 64, 512, (4, 2), 2
        fp8_shape, decode_shape, decode_batches = (2, 64, 512, 4, 3), (2, 512, 16, 8), (1, 4)
    else:
        depths, seq_len, vocab, rows_options, steps = (12, 20), 2048, 32768, (32, 16, 8, 4, 2, 1), 10
        fp8_shape, decode_shape, decode_batches = (12, 2048, 32768, 8, 20), (20, 32768, 512, 256), (1, 8, 32)
    print(
        f"gpu_check: {device_label(device)}, torch {torch.__version__}, attention {backend_name(device)}",
        flush=True,
    )
    compile_ = device.type == "cuda"  # as the trainer; a CPU smoke run is far too small to repay a compile
    result: dict[str, Any] = {
        "benchmark": "gpu_check",
        "device": device_label(device),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device)))
        if device.type == "cuda"
        else None,
        "torch": torch.__version__,
        "attention": backend_name(device),
        "train": [throughput(d, seq_len, vocab, device, compile_, rows_options, steps) for d in depths],
    }
    depth, s, v, r, n = fp8_shape
    result["fp8"] = fp8_drift(depth, s, v, r, n, device, force=args.smoke)
    result["resume"] = resume_exact(fp8_shape[0], 128 if not args.smoke else 32, vocab, 4, device)
    d, v, p, n = decode_shape
    result["decode"] = decode(d, v, p, n, decode_batches, device)
    result["ok"] = (
        bool(result["resume"]["bit_exact"])
        and all("error" not in t for t in result["train"])
        and all(math.isfinite(t.get("final_loss", math.nan)) for t in result["train"])
    )
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main().get("ok", True) else 1)
