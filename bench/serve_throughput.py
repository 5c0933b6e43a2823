"""Serving throughput: continuous batching vs one request at a time, with the same model and engine.

    .venv/bin/python bench/serve_throughput.py                       # random small model, CPU
    .venv/bin/python bench/serve_throughput.py --checkpoint .runs/demo --device cuda

For 1, 4 and 16 concurrent clients, each sending requests back to back to the continuous-batching
`Scheduler` (what a serving replica runs), it measures generated tokens/s and per-request latency
(p50/p95). The baseline is sequential generation with `Engine.generate` (nanochat's one request
at a time). Every request generates exactly `--max-tokens` tokens (the random model's stop tokens
are muted), so both sides do the same work. Ray's HTTP proxy is not in the loop: this measures the
scheduler, not the network. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time

import torch
from nanorun.serving.batching import SamplingParams, Scheduler
from nanorun.trainer.chat.engine import Engine, load_chat_model


def random_model(depth: int, width: int, context: int, device: str):
    """A random GPT and a small trained tokenizer; stop tokens muted so every reply is full length."""
    from nanorun.trainer.data.tokenizer import Tokenizer
    from nanorun.trainer.model.gpt import GPT, GPTConfig

    texts = [(json.__doc__ or "") + (argparse.__doc__ or "") + (asyncio.__doc__ or "")] * 4
    tokenizer = Tokenizer.train_from_iterator(iter(texts), vocab_size=2048)
    torch.manual_seed(0)
    config = GPTConfig(
        sequence_len=context,
        vocab_size=tokenizer.vocab_size,
        n_layer=depth,
        n_head=max(1, width // 64),
        n_kv_head=max(1, width // 64),
        n_embd=width,
    )
    model = GPT(config).to(device)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05)
        for name in ("<|bos|>", "<|assistant_end|>"):
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    return model.eval(), tokenizer


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(latencies: list[float], tokens: int, seconds: float, cpu_seconds: float) -> dict:
    # cpu_seconds (this process's CPU time) shows the work done even when a busy machine stretches wall time
    return {
        "requests": len(latencies),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(percentile(latencies, 0.95), 3),
    }


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    base = tokenizer.encode("Tell me about the standard library modules and what each one is for. " * 8)
    return [[tokenizer.bos_token_id] + base[i % 7 : i % 7 + length - 1] for i in range(n)]


def sequential(engine: Engine, requests: list[list[int]], max_tokens: int) -> dict:
    latencies, tokens = [], 0
    start, cpu = time.perf_counter(), time.process_time()
    for prompt in requests:
        t0 = time.perf_counter()
        (completion,), _ = engine.generate_batch(prompt, max_tokens=max_tokens, temperature=0.8, top_k=50)
        latencies.append(time.perf_counter() - t0)
        tokens += len(completion) - len(prompt)
    return summary(latencies, tokens, time.perf_counter() - start, time.process_time() - cpu)


async def concurrent(scheduler: Scheduler, requests: list[list[int]], clients: int, max_tokens: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for prompt in requests:
        queue.put_nowait(prompt)
    latencies: list[float] = []
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while not queue.empty():
            prompt = queue.get_nowait()
            t0 = time.perf_counter()
            async for event in scheduler.stream(
                prompt, SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=50)
            ):
                if event.finish_reason is not None:
                    tokens += event.completion_tokens
            latencies.append(time.perf_counter() - t0)

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client() for _ in range(clients)))
    return summary(latencies, tokens, time.perf_counter() - start, time.process_time() - cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint/stage/run URI (default: a random model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--depth", type=int, default=4, help="random model: layers")
    p.add_argument("--width", type=int, default=256, help="random model: embedding width")
    p.add_argument("--context", type=int, default=512, help="random model: context length")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=32, help="requests per measurement")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (same for both sides)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.checkpoint:
        model, tokenizer, _ = load_chat_model(args.checkpoint, device=args.device)
    else:
        model, tokenizer = random_model(args.depth, args.width, args.context, args.device)
    engine = Engine(model, tokenizer)
    requests = prompts(tokenizer, args.requests, args.prompt_tokens)
    sequential(engine, requests[:2], 8)  # warm-up

    result = {
        "bench": "serve_throughput",
        "device": args.device,
        "machine": platform.machine(),
        "torch_threads": args.threads,
        "model": {
            "n_layer": model.config.n_layer,
            "n_embd": model.config.n_embd,
            "params": sum(p.numel() for p in model.parameters()),
        },
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
    }
    result["sequential"] = sequential(engine, requests, args.max_tokens)
    scheduler = Scheduler(model, tokenizer, slots=16).start()
    try:
        result["concurrent"] = {
            str(c): asyncio.run(concurrent(scheduler, requests, c, args.max_tokens)) for c in (1, 4, 16)
        }
    finally:
        scheduler.close()
    base = result["sequential"]["tokens_per_s"]
    result["speedup_vs_sequential"] = {
        c: round(r["tokens_per_s"] / base, 2) for c, r in result["concurrent"].items()
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
