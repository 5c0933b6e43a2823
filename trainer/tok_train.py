"""Stage `tokenizer`: train the BPE tokenizer on the first characters of the pretraining shards.

    python -m nanorun.trainer.tok_train --run-dir URI --data bundled --vocab-size 32768 \\
        --max-chars 2000000000 --doc-cap 10000 [--metrics-port N]

Reads the training shards (all but the last) through a streaming iterator into the Rust trainer, cuts
every document to `--doc-cap` characters and stops after `--max-chars`; then measures compression
(characters per token) on the validation shard. With `--from RUN_DIR` it copies that run's tokenizer
instead (spec.tokenizer.from: a sweep's points share one). Writes, per the stage contract:

    <run-dir>/tokenizer/tokenizer.tiktoken, tokenizer.json   the tokenizer (see tokenizer.py)
    <run-dir>/tokenizer/progress.json                         characters read so far (rewritten ~1/s)
    <run-dir>/tokenizer/done.json                             chars seen, seconds, compression, vocab size

A finished stage (done.json of the same NANORUN_CONFIG_ID, see progress.is_current) is a no-op; a
done.json of another configuration is replaced by a new run. The stage is short (no checkpoints): an
interrupted run starts over.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator

from nanorun.pipeline import layout
from nanorun.pipeline.errors import run_main
from nanorun.pipeline.progress import (
    Done,
    Progress,
    current_attempt,
    current_config_id,
    is_current,
    read_done,
    rerun_reason,
    write_done,
    write_progress,
)
from nanorun.pipeline.stages import TOKENIZER
from nanorun.trainer.data.dataset import iter_texts, resolve_shards
from nanorun.trainer.data.tokenizer import Tokenizer

STAGE = TOKENIZER.key


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nanorun.trainer.tok_train", description=__doc__.splitlines()[0]
    )
    p.add_argument("--run-dir", required=True, help="run directory (local path or s3://)")
    p.add_argument(
        "--data", default="bundled", help="pretraining data: dir, s3:// prefix, hf://owner/name or 'bundled'"
    )
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size, special tokens included")
    p.add_argument(
        "--max-chars", type=int, default=2_000_000_000, help="train on at most this many characters"
    )
    p.add_argument("--doc-cap", type=int, default=10_000, help="cut every document to this many characters")
    p.add_argument(
        "--eval-chars", type=int, default=2_000_000, help="validation characters for the compression ratio"
    )
    p.add_argument(
        "--from",
        dest="from_run",
        default="",
        help="copy the tokenizer of this run directory instead of training one (--data etc. unused)",
    )
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    return p.parse_args(argv)


def start_metrics(port: int | None):
    """Step gauges for the dashboard (step = characters read); None when no port is given."""
    if port is None:
        return None
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    labels = {"run": os.environ.get("NANORUN_RUN", "local"), "stage": STAGE, "rank": "0"}
    step = Gauge("llm_train_step", "characters read so far", list(labels), registry=registry).labels(**labels)
    total = Gauge("llm_train_total_steps", "characters to read", list(labels), registry=registry).labels(
        **labels
    )
    start_http_server(port, registry=registry)
    return step, total


def tracked(texts: Iterator[str], run_dir: str, max_chars: int, t0: float, gauges) -> Iterator[str]:
    """Passes `texts` through, rewriting progress.json about once a second."""
    seen, last = 0, 0.0
    if gauges:
        gauges[1].set(max_chars)
    for text in texts:
        seen += len(text)
        now = time.time()
        if now - last >= 1.0:
            last = now
            elapsed = now - t0
            eta = elapsed * (max_chars - seen) / seen if seen else None
            write_progress(
                run_dir,
                Progress(
                    stage=STAGE,
                    step=seen,
                    total_steps=max_chars,
                    elapsed_seconds=elapsed,
                    eta_seconds=eta,
                    message="counting chunks",
                    attempt=current_attempt(),
                ),
            )
            if gauges:
                gauges[0].set(seen)
        yield text


def compression(tok: Tokenizer, val_uri: str, eval_chars: int) -> dict:
    texts = list(iter_texts([val_uri], max_chars=eval_chars))
    chars = sum(len(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return {
        "val_chars": chars,
        "val_tokens": tokens,
        "compression_ratio": round(chars / max(tokens, 1), 4),
        "bytes_per_token": round(nbytes / max(tokens, 1), 4),
    }


def copy_from(source_run: str, run_dir: str, config_id: str) -> int:
    """Take another run's tokenizer: runs that are compared with each other (the points of a sweep)
    must share one vocabulary, and training it once is enough. The files are copied, so this run's
    directory stays self-contained (evaluating or serving it never reads the other run)."""
    t0 = time.time()
    tok = Tokenizer.from_run_dir(source_run)  # fails naming the directory when there is none
    out_dir = layout.tokenizer_dir(run_dir)
    tok.save(out_dir)
    seconds = round(time.time() - t0, 2)
    metrics = {"vocab_size": tok.vocab_size, "seconds": seconds}
    write_done(
        run_dir,
        Done(
            stage=STAGE,
            seconds=seconds,
            metrics=metrics,
            outputs={"tokenizer": out_dir, "copied_from": source_run},
            config_id=config_id,
        ),
    )
    print(f"{STAGE}: copied the tokenizer of {source_run} (vocab {tok.vocab_size}) -> {out_dir}")
    return 0


def run(args: argparse.Namespace) -> int:
    done, config_id = read_done(args.run_dir, STAGE), current_config_id()
    if is_current(done, config_id):
        print(f"{STAGE}: already done ({done.metrics.get('vocab_size')} tokens); nothing to do")
        return 0
    if done is not None:
        print(rerun_reason(done, config_id))
    if args.from_run:
        return copy_from(args.from_run, args.run_dir, config_id)
    t0 = time.time()
    gauges = start_metrics(args.metrics_port)
    shards = resolve_shards(args.data, args.run_dir)
    train_shards, val_shard = shards[:-1], shards[-1]
    print(
        f"{STAGE}: {len(train_shards)} training shards, vocab {args.vocab_size}, up to {args.max_chars:,} chars"
    )
    texts = tracked(
        iter_texts(train_shards, args.max_chars, args.doc_cap), args.run_dir, args.max_chars, t0, gauges
    )
    tok = Tokenizer.train_from_iterator(texts, args.vocab_size)
    train_seconds = time.time() - t0
    out_dir = layout.tokenizer_dir(args.run_dir)
    tok.save(out_dir)
    metrics = {
        "chars_seen": tok.train_stats["chars_seen"],
        "unique_chunks": tok.train_stats["unique_chunks"],
        "vocab_size": tok.vocab_size,
        "train_seconds": round(train_seconds, 2),
        **compression(tok, val_shard, args.eval_chars),
    }
    seconds = round(time.time() - t0, 2)
    metrics["seconds"] = seconds
    write_progress(
        args.run_dir,
        Progress(
            stage=STAGE,
            step=metrics["chars_seen"],
            total_steps=metrics["chars_seen"],
            elapsed_seconds=seconds,
            message="done",
            attempt=current_attempt(),
        ),
    )
    write_done(
        args.run_dir,
        Done(
            stage=STAGE, seconds=seconds, metrics=metrics, outputs={"tokenizer": out_dir}, config_id=config_id
        ),
    )
    print(
        f"{STAGE}: {metrics['chars_seen']:,} chars in {train_seconds:.1f}s, vocab {tok.vocab_size}, "
        f"{metrics['compression_ratio']:.2f} chars/token on validation -> {out_dir}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
