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

It runs as every stage does (`setup_stage`: the no-op when done.json is of this configuration,
metrics, SIGTERM, progress.json and done.json through the stage context), with characters read as
its steps. The stage is short (no checkpoints): an interrupted run starts over.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

from nanorun.pipeline import defaults, layout
from nanorun.pipeline.errors import run_main
from nanorun.pipeline.stages import TOKENIZER
from nanorun.trainer.data.dataset import resolve_shards
from nanorun.trainer.data.shards import iter_texts
from nanorun.trainer.data.tokenizer import Tokenizer
from nanorun.trainer.training.common import StageContext, add_common_args, setup_stage, teardown

STAGE = TOKENIZER.key


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nanorun.trainer.tok_train", description=__doc__.splitlines()[0]
    )
    add_common_args(p)
    p.add_argument(
        "--data", default="bundled", help="pretraining data: dir, s3:// prefix, hf://owner/name or 'bundled'"
    )
    p.add_argument(
        "--vocab-size", type=int, default=defaults.VOCAB_SIZE, help="vocabulary size, special tokens included"
    )
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
    return p.parse_args(argv)


def tracked(texts: Iterator[str], ctx: StageContext, max_chars: int) -> Iterator[str]:
    """Passes `texts` through, reporting characters read as the stage's steps about once a second."""
    seen, last = 0, 0.0
    for text in texts:
        seen += len(text)
        now = time.time()
        if now - last >= 1.0:
            last = now
            eta = (now - ctx.started_at) * (max_chars - seen) / seen if seen else None
            ctx.progress(step=seen, total_steps=max_chars, eta_seconds=eta, message="counting chunks")
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


def copy_from(ctx: StageContext, source_run: str) -> None:
    """Take another run's tokenizer: runs that are compared with each other (the points of a sweep)
    must share one vocabulary, and training it once is enough. The files are copied, so this run's
    directory stays self-contained (evaluating or serving it never reads the other run)."""
    tok = Tokenizer.from_run_dir(source_run)  # fails naming the directory when there is none
    out_dir = layout.tokenizer_dir(ctx.run_dir)
    tok.save(out_dir)
    metrics = {"vocab_size": tok.vocab_size, "seconds": round(time.time() - ctx.started_at, 2)}
    ctx.done(metrics, {"tokenizer": out_dir, "copied_from": source_run})
    print(f"{STAGE}: copied the tokenizer of {source_run} (vocab {tok.vocab_size}) -> {out_dir}")


def run(args: argparse.Namespace) -> int:
    ctx = setup_stage(STAGE, args)
    if ctx.already_done:
        return teardown(ctx)
    if args.from_run:
        copy_from(ctx, args.from_run)
        return teardown(ctx)
    shards = resolve_shards(args.data, args.run_dir)
    train_shards, val_shard = shards[:-1], shards[-1]
    print(
        f"{STAGE}: {len(train_shards)} training shards, vocab {args.vocab_size}, up to {args.max_chars:,} chars"
    )
    texts = tracked(iter_texts(train_shards, args.max_chars, args.doc_cap), ctx, args.max_chars)
    tok = Tokenizer.train_from_iterator(texts, args.vocab_size)
    train_seconds = time.time() - ctx.started_at
    out_dir = layout.tokenizer_dir(args.run_dir)
    tok.save(out_dir)
    metrics = {
        "chars_seen": tok.train_stats["chars_seen"],
        "unique_chunks": tok.train_stats["unique_chunks"],
        "vocab_size": tok.vocab_size,
        "train_seconds": round(train_seconds, 2),
        **compression(tok, val_shard, args.eval_chars),
    }
    metrics["seconds"] = round(time.time() - ctx.started_at, 2)
    ctx.progress(step=metrics["chars_seen"], total_steps=metrics["chars_seen"], eta_seconds=0)
    ctx.done(metrics, {"tokenizer": out_dir})
    print(
        f"{STAGE}: {metrics['chars_seen']:,} chars in {train_seconds:.1f}s, vocab {tok.vocab_size}, "
        f"{metrics['compression_ratio']:.2f} chars/token on validation -> {out_dir}"
    )
    return teardown(ctx)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
