"""Benchmark: BPE training speed and peak memory, nanorun's Rust trainer vs HuggingFace `tokenizers`.

    .venv/bin/python bench/tokenizer_train.py [--data bundled] [--vocab-size 32768] [--max-chars N]

Both trainers read the same documents (the bundled corpus by default, ~32 MB of English prose) through
the same streaming iterator, with the same split regex (GPT-4 style, digits in groups of 1-2) and the
same vocab size. Each runs in its own child process, so "peak RSS" is that trainer's own high-water
mark (reading the parquet shards included, for both). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from nanorun.trainer.data.dataset import resolve_shards
from nanorun.trainer.data.shards import iter_texts


def texts(data: str, max_chars: int | None):
    return iter_texts(resolve_shards(data), max_chars=max_chars)


def train_nanorun(data: str, vocab_size: int, max_chars: int | None) -> dict:
    from nanorun.trainer.data.tokenizer import Tokenizer

    t0 = time.perf_counter()
    tok = Tokenizer.train_from_iterator(texts(data, max_chars), vocab_size)
    return {
        "seconds": time.perf_counter() - t0,
        "vocab_size": tok.vocab_size,
        "chars": tok.train_stats["chars_seen"],
    }


def train_hf(data: str, vocab_size: int, max_chars: int | None) -> dict:
    from nanorun.trainer.data.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN
    from tokenizers import Regex, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = HFTokenizer(BPE(byte_fallback=True, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        min_frequency=0,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
    )
    t0 = time.perf_counter()
    tok.train_from_iterator(texts(data, max_chars), trainer)
    return {"seconds": time.perf_counter() - t0, "vocab_size": tok.get_vocab_size()}


def run_child(which: str, args: argparse.Namespace) -> dict:
    """Runs one trainer in a fresh process; returns its result plus its peak RSS in MiB."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        which,
        "--data",
        args.data,
        "--vocab-size",
        str(args.vocab_size),
    ]
    if args.max_chars:
        cmd += ["--max-chars", str(args.max_chars)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"{which} trainer failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peak_rss_mib"] = round(result.pop("maxrss_kib") / 1024, 1)
    result["seconds"] = round(result["seconds"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default="bundled", help="data URI (see nanorun.trainer.data.dataset.resolve_shards)"
    )
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--max-chars", type=int, default=None, help="stop after this many characters")
    parser.add_argument("--child", choices=["nanorun", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fn = train_nanorun if args.child == "nanorun" else train_hf
        result = fn(args.data, args.vocab_size, args.max_chars)
        result["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(result))
        return
    resolve_shards(args.data)  # build the bundled corpus first, outside the timings
    ours, hf = run_child("nanorun", args), run_child("hf", args)
    print(
        json.dumps(
            {
                "bench": "tokenizer_train",
                "data": args.data,
                "chars": ours["chars"],
                "vocab_size": args.vocab_size,
                "nanorun": ours,
                "hf_tokenizers": hf,
                "speedup": round(hf["seconds"] / ours["seconds"], 2),
                "rss_ratio": round(ours["peak_rss_mib"] / hf["peak_rss_mib"], 2),
                "threads": os.cpu_count(),
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
