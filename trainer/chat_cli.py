"""`nanorun chat`: talk to a checkpoint in the terminal.

    nanorun chat --checkpoint .runs/demo                 # a run dir: its newest trained stage
    nanorun chat --checkpoint s3://bucket/runs/d20/sft -p "Why is the sky blue?"

Replies stream as they are generated; the conversation is multi-turn. Commands: `/clear` (new
conversation), `/temperature X`, `/topk N` (0 = off), `/help`, `/quit`. A conversation longer than
the model's context is trimmed from its oldest turns (the system message stays) and a note says so.
Tool calls show as `<<expression=result>>` and stay tool calls in the history the model sees.
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import Any, TextIO

HELP = """commands:
  /clear          start a new conversation
  /temperature X  sampling temperature, 0 (greedy) to 2
  /topk N         sample from the N most likely tokens, 0 to 200 (0 = all)
  /help           this help
  /quit           leave (or Ctrl-D)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nanorun chat", description="Chat with a nanorun checkpoint in the terminal."
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint dir, stage dir or run dir (local path or s3://)"
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: <run-dir>/tokenizer)")
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("--system", default="", help="system message prepended to the conversation")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="top-k sampling (0 = off)")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one per reply)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="compute device")
    return p


def assistant_parts(tokens: list[int], tokenizer: Any, special: Any) -> list[dict[str, str]]:
    """A reply's tokens as conversation parts (text / python / python_output), so a tool call the
    model made is rendered back as a tool call in the next turn's prompt."""
    parts: list[dict[str, str]] = []
    kind, current = "text", []

    def close() -> None:
        if current:
            parts.append({"type": kind, "text": tokenizer.decode(current)})

    for token in tokens:
        if token in (special.python_start, special.output_start):
            close()
            kind, current = ("python" if token == special.python_start else "python_output"), []
        elif token in (special.python_end, special.output_end):
            close()
            kind, current = "text", []
        elif token not in special.stop:
            current.append(token)
    close()
    return parts or [{"type": "text", "text": ""}]


class ChatSession:
    """The state of one terminal chat: settings and the conversation so far."""

    def __init__(self, engine: Any, args: argparse.Namespace, out: TextIO) -> None:
        from nanorun.trainer.chat.engine import context_length

        self.engine = engine
        self.args = args
        self.out = out
        self.temperature = args.temperature
        self.top_k = args.top_k
        self.messages: list[dict[str, Any]] = []
        self.context = context_length(engine.model)

    def command(self, line: str) -> bool:
        """Handle a /command; returns False when the session should end."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/clear":
            self.messages = []
            print("(conversation cleared)", file=self.out)
        elif name == "/help":
            print(HELP, file=self.out)
        elif name == "/temperature":
            try:
                value = float(arg)
                if not 0 <= value <= 2:
                    raise ValueError
                self.temperature = value
                print(f"(temperature = {value})", file=self.out)
            except ValueError:
                print("usage: /temperature X with X between 0 and 2", file=self.out)
        elif name == "/topk":
            try:
                value = int(arg)
                if not 0 <= value <= 200:
                    raise ValueError
                self.top_k = value
                print(f"(top-k = {value})", file=self.out)
            except ValueError:
                print("usage: /topk N with N an integer between 0 and 200", file=self.out)
        else:
            print(f"unknown command {name}\n{HELP}", file=self.out)
        return True

    def reply(self, user_text: str) -> str:
        """Stream the model's answer to `user_text` and add both turns to the conversation."""
        from nanorun.trainer.chat.engine import TextStream, fit_conversation

        engine = self.engine
        self.messages.append({"role": "user", "content": user_text})
        system = [{"role": "system", "content": self.args.system}] if self.args.system else []
        reserve = min(self.args.max_tokens, self.context // 2)
        prompt, notice = fit_conversation(
            engine.tokenizer, {"messages": system + self.messages}, self.context - reserve
        )
        if notice:
            print(f"(note: {notice})", file=self.out)
        stream = TextStream(engine.tokenizer, engine.special)
        tokens: list[int] = []
        text = []
        seed = self.args.seed if self.args.seed is not None else random.getrandbits(63)
        for column, _ in engine.generate(
            prompt,
            max_tokens=self.args.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k or None,
            seed=seed,
        ):
            token = column[0]
            piece = stream.push(token)
            text.append(piece)
            print(piece, end="", file=self.out, flush=True)
            if token in engine.special.stop:
                break
            tokens.append(token)
        tail = stream.flush()
        text.append(tail)
        print(tail, file=self.out, flush=True)
        self.messages.append(
            {"role": "assistant", "content": assistant_parts(tokens, engine.tokenizer, engine.special)}
        )
        return "".join(text)


def main(argv: list[str] | None = None, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    if args.max_tokens < 1 or not 0 <= args.temperature <= 2 or not 0 <= args.top_k <= 200:
        print(
            "nanorun chat: need --max-tokens >= 1, --temperature in [0, 2], --top-k in [0, 200]",
            file=sys.stderr,
        )
        return 2

    from nanorun.trainer.chat.engine import Engine, default_device, load_chat_model
    from nanorun.trainer.training.checkpoint import CheckpointError

    device = default_device() if args.device == "auto" else args.device
    try:
        model, tokenizer, info = load_chat_model(args.checkpoint, args.tokenizer, device)
    except (CheckpointError, FileNotFoundError, OSError, ValueError) as e:
        print(f"nanorun chat: cannot load {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    session = ChatSession(Engine(model, tokenizer), args, out)

    if args.prompt is not None:
        session.reply(args.prompt)
        return 0

    interactive = stdin.isatty()
    print(
        f"nanorun chat: {info['checkpoint']} (context {info['context']} tokens). /help for commands.",
        file=out,
    )
    while True:
        if interactive:
            print("\nyou> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line:  # end of input (Ctrl-D)
            print(file=out)
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line):
                return 0
            continue
        if interactive:
            print("assistant> ", end="", file=out, flush=True)
        session.reply(line)


if __name__ == "__main__":
    sys.exit(main())
