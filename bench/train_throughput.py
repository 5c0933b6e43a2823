"""Training throughput: tokens/s and MFU of full training steps (forward, backward, MuonAdamW step).

Random tokens by default, so it measures the model and optimizer only, not data loading. With
`--text FILE` it trains on the file's bytes instead (vocabulary 256, random windows from the first
90%) and also reports the loss on fixed windows of the last 10%: a quick, CPU-sized way to compare
model flags on real text. Prints one JSON line.

    python bench/train_throughput.py --depth 4 --seq-len 256 --batch-size 4 --steps 5 --device cpu
    python bench/train_throughput.py --depth 20 --seq-len 2048 --batch-size 16 --steps 20 --device cuda
    python bench/train_throughput.py --depth 2 --seq-len 128 --batch-size 8 --steps 200 --text FILE

On CUDA the model runs its matmuls in bf16 and is compiled with torch.compile (`--no-compile` to
skip); on CPU it runs in fp32, eagerly by default. MFU is model FLOPs (GPT.estimate_flops, the
6N + attention count) over the device's dense bf16 peak; null where the peak is unknown (CPUs).
"""

from __future__ import annotations

import argparse
import json
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4, help="model depth (width = depth x aspect ratio)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
    parser.add_argument("--aspect-ratio", type=int, default=64, help="width per layer of depth")
    parser.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    parser.add_argument("--window-pattern", default="L", help="sliding-window pattern, e.g. SSSL")
    parser.add_argument("--no-value-embeds", action="store_true", help="disable value embeddings")
    parser.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="torch.compile the model (default: on for CUDA)",
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false")
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
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    config = GPTConfig.from_depth(
        args.depth,
        args.vocab_size,
        args.seq_len,
        aspect_ratio=args.aspect_ratio,
        head_dim=args.head_dim,
        window_pattern=args.window_pattern,
        value_embeds=not args.no_value_embeds,
    )
    torch.manual_seed(args.seed)
    model = build_model(config, device)
    optimizer = model.setup_optimizer(
        matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5, weight_decay=0.2
    )
    forward = torch.compile(model, dynamic=False) if use_compile else model
    rows = args.seq_len + 1
    if args.text:
        with open(args.text, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
        split = int(0.9 * len(data))
        if split < 2 * rows:
            raise SystemExit(f"--text {args.text} is too short for --seq-len {args.seq_len}")
        train_data, val_data = data[:split], data[split:]
        starts = torch.arange(0, len(val_data) - rows, rows)[:64]
        val_batch = torch.stack([val_data[s : s + rows] for s in starts]).to(device)
    generator = torch.Generator().manual_seed(args.seed)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        if args.text:
            starts = torch.randint(0, len(train_data) - rows, (args.batch_size,), generator=generator)
            tokens = torch.stack([train_data[s : s + rows] for s in starts])
        else:
            tokens = torch.randint(0, args.vocab_size, (args.batch_size, rows), generator=generator)
        tokens = tokens.to(device)
        return tokens[:, :-1], tokens[:, 1:]

    inputs, targets = next_batch()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step() -> torch.Tensor:
        x, y = next_batch() if args.text else (inputs, targets)
        loss = forward(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup_steps):
        train_step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step()
    sync()
    elapsed = time.perf_counter() - start

    tokens_per_second = args.batch_size * args.seq_len * args.steps / elapsed
    flops_per_token = model.estimate_flops()
    peak = peak_flops(device)
    result = {
        "benchmark": "train_throughput",
        "device": device_label(device),
        "depth": args.depth,
        "n_embd": config.n_embd,
        "params": model.num_params(),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "window_pattern": args.window_pattern,
        "value_embeds": config.value_embeds,
        "attention": backend_name(device),
        "compile": use_compile,
        "dtype": str(model.compute_dtype).removeprefix("torch."),
        "steps": args.steps,
        "step_seconds": round(elapsed / args.steps, 4),
        "tokens_per_second": round(tokens_per_second, 1),
        "flops_per_token": flops_per_token,
        "peak_flops": peak,
        "mfu": round(flops_per_token * tokens_per_second / peak, 4) if peak else None,
        "final_loss": round(float(loss), 4),
        "torch": torch.__version__,
    }
    if args.text:
        with torch.no_grad():
            result["val_loss"] = round(float(model(val_batch[:, :-1], val_batch[:, 1:])), 4)
    if device.type == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
