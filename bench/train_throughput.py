"""Training throughput: tokens/s and MFU of full training steps (forward, backward, MuonAdamW step).

Random tokens by default, so it measures the model and optimizer only, not data loading. With
`--text FILE` it trains on the file's bytes instead (vocabulary 256, random windows from the first
90%) and also reports the loss on fixed windows of the last 10%: a quick, CPU-sized way to compare
model flags on real text. Prints one JSON line.

    python bench/train_throughput.py --depth 4 --seq-len 256 --batch-size 4 --steps 5 --device cpu
    python bench/train_throughput.py --depth 20 --seq-len 2048 --batch-size 16 --steps 20 --device cuda
    python bench/train_throughput.py --depth 2 --seq-len 128 --batch-size 8 --steps 200 --text FILE

The model is compiled with torch.compile (`--no-compile` to run it eagerly); on CUDA its matmuls
run in bf16, on CPU in fp32. The first warm-up step compiles: its time is `compile_seconds`, apart
from the steps. `tokens_per_second` is the steady rate, from the median time of the timed steps.
`--vs-eager` also trains an eager copy (same weights, same batches), alternating blocks of
`--block` steps with the compiled one, and reports its numbers and the `speedup`: on a shared
machine both see the same load. MFU is model FLOPs (GPT.estimate_flops, the 6N + attention count)
over the device's dense bf16 peak; null where the peak is unknown (CPUs).

    OMP_NUM_THREADS=2 python bench/train_throughput.py --depth 4 --head-dim 64 --seq-len 256 \
        --batch-size 8 --vocab-size 8192 --steps 100 --warmup-steps 3 --device cpu --vs-eager
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from nanorun.trainer.model.attention import backend_name
from nanorun.trainer.model.gpt import GPTConfig, build_model

# Dense bf16 peak FLOP/s, matched against torch.cuda.get_device_name() (first match wins).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


class Trainer:
    """One model, its optimizer and its batches; `step()` runs one timed optimizer step."""

    def __init__(self, args: argparse.Namespace, config: GPTConfig, device: torch.device, compile_: bool):
        torch.manual_seed(args.seed)  # the same weights and batches for the eager and the compiled run
        self.args, self.device, self.compiled = args, device, compile_
        self.model = build_model(config, device)
        self.optimizer = self.model.setup_optimizer(
            matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5, weight_decay=0.2
        )
        self.forward = torch.compile(self.model, dynamic=False) if compile_ else self.model
        self.generator = torch.Generator().manual_seed(args.seed)
        self.fixed = None if args.text else self.next_batch()
        self.times: list[float] = []
        self.loss = torch.zeros(())

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        args, rows = self.args, self.args.seq_len + 1
        if args.text:
            train = args.train_data
            starts = torch.randint(0, len(train) - rows, (args.batch_size,), generator=self.generator)
            tokens = torch.stack([train[s : s + rows] for s in starts])
        else:
            tokens = torch.randint(0, args.vocab_size, (args.batch_size, rows), generator=self.generator)
        tokens = tokens.to(self.device)
        return tokens[:, :-1], tokens[:, 1:]

    def step(self) -> float:
        """One forward, backward and optimizer step; returns its wall time (synchronized)."""
        t0 = time.perf_counter()
        x, y = self.fixed or self.next_batch()
        loss = self.forward(x, y)
        loss.backward()
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        self.loss = loss.detach()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def summary(self, tokens_per_step: int, flops_per_token: float, peak: float | None) -> dict:
        step_seconds = statistics.median(self.times)
        tokens_per_second = tokens_per_step / step_seconds
        return {
            "compile": self.compiled,
            "step_seconds": round(step_seconds, 4),  # median of the timed steps
            "tokens_per_second": round(tokens_per_second, 1),
            "mfu": round(flops_per_token * tokens_per_second / peak, 4) if peak else None,
            "final_loss": round(float(self.loss), 4),
        }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4, help="model depth (width = depth x aspect ratio)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (per variant)")
    parser.add_argument(
        "--warmup-steps", type=int, default=2, help="untimed steps first; the first one compiles"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
    parser.add_argument("--aspect-ratio", type=int, default=64, help="width per layer of depth")
    parser.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    parser.add_argument("--window-pattern", default="L", help="sliding-window pattern, e.g. SSSL")
    parser.add_argument("--no-value-embeds", action="store_true", help="disable value embeddings")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile the model (as the trainer does on GPUs and on long CPU runs)",
    )
    parser.add_argument(
        "--vs-eager",
        action="store_true",
        help="also time the eager model, alternating blocks of steps with the compiled one, and "
        "report the speed-up (a fair ratio on a busy machine)",
    )
    parser.add_argument("--block", type=int, default=5, help="steps per alternating block (--vs-eager)")
    parser.add_argument("--text", help="train on this file's bytes and report a held-out loss")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and batches")
    args = parser.parse_args(argv)
    if args.text:
        args.vocab_size = 256

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    config = GPTConfig.from_depth(
        args.depth,
        args.vocab_size,
        args.seq_len,
        aspect_ratio=args.aspect_ratio,
        head_dim=args.head_dim,
        window_pattern=args.window_pattern,
        value_embeds=not args.no_value_embeds,
    )
    rows = args.seq_len + 1
    if args.text:
        with open(args.text, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
        split = int(0.9 * len(data))
        if split < 2 * rows:
            raise SystemExit(f"--text {args.text} is too short for --seq-len {args.seq_len}")
        args.train_data, val_data = data[:split], data[split:]
        starts = torch.arange(0, len(val_data) - rows, rows)[:64]
        val_batch = torch.stack([val_data[s : s + rows] for s in starts]).to(device)

    main_run = Trainer(args, config, device, args.compile)
    runs = [main_run] + ([Trainer(args, config, device, False)] if args.vs_eager and args.compile else [])
    # Warm-up: the first step of a compiled model compiles it; that step's time is its compile time.
    compile_seconds = None
    for run in runs:
        first = run.step()
        if run.compiled:
            compile_seconds = first
        for _ in range(args.warmup_steps - 1):
            run.step()
    # Timed steps, in alternating blocks when comparing, so both variants see the same machine load.
    done = 0
    while done < args.steps:
        n = min(args.block if len(runs) > 1 else args.steps, args.steps - done)
        for run in runs:
            run.times += [run.step() for _ in range(n)]
        done += n

    model = main_run.model
    flops_per_token = model.estimate_flops()
    peak = peak_flops(device)
    tokens_per_step = args.batch_size * args.seq_len
    result = {
        "benchmark": "train_throughput",
        "device": device_label(device),
        "depth": args.depth,
        "n_embd": config.n_embd,
        "params": model.num_params(),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "vocab_size": args.vocab_size,
        "window_pattern": args.window_pattern,
        "value_embeds": config.value_embeds,
        "attention": backend_name(device),
        "dtype": str(model.compute_dtype).removeprefix("torch."),
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        **main_run.summary(tokens_per_step, flops_per_token, peak),
        "compile_seconds": round(compile_seconds, 2) if compile_seconds is not None else None,
        "flops_per_token": flops_per_token,
        "peak_flops": peak,
        "torch": torch.__version__,
    }
    if len(runs) > 1:
        result["eager"] = runs[1].summary(tokens_per_step, flops_per_token, peak)
        result["speedup"] = round(result["eager"]["step_seconds"] / result["step_seconds"], 3)
    if args.text:
        with torch.no_grad():
            result["val_loss"] = round(float(model(val_batch[:, :-1], val_batch[:, 1:])), 4)
    if device.type == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
