"""`nanorun explain`: the explainer pages' views in the terminal.

    nanorun explain tokenizer "Hello world" --checkpoint .runs/demo
    nanorun explain tokenizer "Hello world" --checkpoint .runs/demo --merges 50   # BPE with 50 merges

Prints the text as the run's tokenizer cuts it, one coloured span per token, then each token's id
and text, and the counts. The tokenizer is the run's (`<run-dir>/tokenizer/`), found from a run,
stage or checkpoint URI as `nanorun serve` finds it, or given with `--tokenizer`. The spans and the
replay are the ones `/explain/tokenizer` shows (`nanorun.serving.explain`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

COLOURS = ("on dark_blue", "on dark_green", "on dark_red", "on purple4", "on dark_orange3", "on grey30")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanorun explain", description="Explain a trained run in the terminal.")
    sub = p.add_subparsers(dest="view", required=True)
    tok = sub.add_parser("tokenizer", help="show how the run's tokenizer splits a text into tokens")
    tok.add_argument("text", help="the text to tokenize")
    tok.add_argument("--checkpoint", help="run, stage or checkpoint dir (local path or s3://)")
    tok.add_argument("--tokenizer", help="tokenizer dir (default: the run's tokenizer/)")
    tok.add_argument(
        "--merges", type=int, default=None, help="replay BPE with only the first N merges (default: all)"
    )
    return p


def load_tokenizer(checkpoint: str | None, tokenizer_dir: str | None) -> Any:
    """The tokenizer of `--tokenizer`, or of the run `--checkpoint` names (a run directory's own
    tokenizer/ first, so a run with a tokenizer but no checkpoint yet works too)."""
    from nanorun.pipeline import layout, storage
    from nanorun.trainer.chat.engine import resolve_checkpoint, tokenizer_dir_for
    from nanorun.trainer.data.tokenizer import TIKTOKEN_FILE, Tokenizer

    if tokenizer_dir:
        return Tokenizer.load(tokenizer_dir)
    if not checkpoint:
        raise ValueError("give --checkpoint (a run, stage or checkpoint dir) or --tokenizer")
    own = layout.tokenizer_dir(checkpoint.rstrip("/"))
    if storage.exists(storage.join(own, TIKTOKEN_FILE)):
        return Tokenizer.load(own)
    return Tokenizer.load(tokenizer_dir_for(resolve_checkpoint(checkpoint)))


def render_tokens(tokens: list[dict[str, Any]]) -> tuple[Any, Any]:
    """(the text as coloured spans, the tokens as coloured `id:text` labels)."""
    from nanorun.serving.explain import readable
    from rich.text import Text

    spans, labels = Text(), Text()
    for i, token in enumerate(tokens):
        style = COLOURS[i % len(COLOURS)]
        spans.append(token["text"], style=style)
        piece = readable(bytes(token["bytes"])).replace(" ", "·").replace("\n", "↵").replace("\t", "→")
        labels.append(f"{token['id']}:{piece}", style=style)
        labels.append(" ")
    return spans, labels


def tokenizer_view(args: argparse.Namespace) -> int:
    from nanorun.serving import explain
    from rich.console import Console

    tokenizer = load_tokenizer(args.checkpoint, args.tokenizer)
    console = Console(highlight=False, soft_wrap=True)  # the spans must stay the text, unbroken
    if args.merges is None:
        out = explain.tokenize(tokenizer, args.text)
        title = "tokens"
    else:
        out = explain.bpe_replay(tokenizer, args.text, max(0, args.merges), list_merges=0)
        title = f"tokens after {out['merges']} of {out['total_merges']} merges"
    spans, labels = render_tokens(out["tokens"])
    console.print(spans)
    console.print(labels)
    per_token = f"{len(args.text) / out['count']:.2f}" if out["count"] else "-"
    console.print(
        f"{out['count']} {title}, {len(args.text)} characters, {per_token} chars/token "
        f"(vocabulary {tokenizer.vocab_size})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from nanorun.pipeline.errors import StageError

    args = build_parser().parse_args(argv)
    try:
        return tokenizer_view(args)
    except (OSError, ValueError, StageError) as e:  # a missing run, checkpoint or tokenizer
        print(f"nanorun explain: {e}", file=sys.stderr)
        return 2
