"""Tokenizer evaluation: compression (characters and bytes per token) on held-out text.

    python -m nanorun.trainer.tok_eval --run-dir URI [--data URI] [--eval-chars 2000000]

Measures the run's tokenizer on the validation shard (the last shard of `--data`, never trained on)
and, when tiktoken can load them, GPT-2's and GPT-4's (cl100k_base) encodings on the same text. Those
encodings are downloaded by tiktoken on first use (or read from TIKTOKEN_CACHE_DIR); offline they are
reported as unavailable. Prints a table and writes `<run-dir>/tokenizer/tok_eval.json` for the report.
"""

from __future__ import annotations

import argparse
import sys

from nanorun.pipeline import layout, storage
from nanorun.pipeline.errors import run_main
from nanorun.trainer.data.dataset import resolve_shards
from nanorun.trainer.data.shards import iter_texts
from nanorun.trainer.data.tokenizer import Tokenizer

REFERENCE_ENCODINGS = {"gpt2": "gpt2", "gpt4": "cl100k_base"}


def measure(encode_batch, texts: list[str]) -> dict:
    tokens = sum(len(ids) for ids in encode_batch(texts))
    chars = sum(len(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "tokens": tokens,
        "chars_per_token": round(chars / max(tokens, 1), 4),
        "bytes_per_token": round(nbytes / max(tokens, 1), 4),
    }


def evaluate(tok: Tokenizer, texts: list[str]) -> dict:
    results = {"nanorun": {"vocab_size": tok.vocab_size, **measure(tok.encode_batch, texts)}}
    import tiktoken

    for label, name in REFERENCE_ENCODINGS.items():
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as err:  # offline: tiktoken cannot fetch the rank file
            results[label] = {"unavailable": f"{type(err).__name__}: {str(err)[:200]}"}
            continue
        results[label] = {"vocab_size": enc.n_vocab, **measure(enc.encode_ordinary_batch, texts)}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nanorun.trainer.tok_eval", description=__doc__.splitlines()[0]
    )
    p.add_argument("--run-dir", required=True, help="run directory holding tokenizer/ (local path or s3://)")
    p.add_argument("--data", default="bundled", help="data URI; its last shard is the held-out text")
    p.add_argument("--eval-chars", type=int, default=2_000_000, help="held-out characters to encode")
    args = p.parse_args(argv)
    tok = Tokenizer.from_run_dir(args.run_dir)
    texts = list(iter_texts(resolve_shards(args.data, args.run_dir)[-1:], max_chars=args.eval_chars))
    results = evaluate(tok, texts)
    print(f"{'tokenizer':<10} {'vocab':>8} {'chars/token':>12} {'bytes/token':>12}")
    for label, r in results.items():
        if "unavailable" in r:
            print(f"{label:<10} unavailable ({r['unavailable']})")
        else:
            print(
                f"{label:<10} {r['vocab_size']:>8} {r['chars_per_token']:>12.3f} {r['bytes_per_token']:>12.3f}"
            )
    storage.write_json(
        storage.join(layout.tokenizer_dir(args.run_dir), "tok_eval.json"),
        {"eval_chars": sum(len(t) for t in texts), "results": results},
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
