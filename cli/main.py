"""The `nanorun` command line.

    nanorun data prepare|download ...   build or download pretraining shards
    nanorun crd                         print the LLMRun CustomResourceDefinition
    nanorun operator ...                run the Kubernetes operator (kopf)
    nanorun run FILE ...                run an LLMRun file on this machine, no cluster
    nanorun serve --checkpoint URI      serve a checkpoint: OpenAI-compatible API + web UI
    nanorun chat --checkpoint URI       chat in the terminal
    nanorun export --checkpoint URI --out DIR   a checkpoint as a Hugging Face model folder
    nanorun delete-run URI              delete a run's files (what storage.cleanupOnDelete runs)
    nanorun explain tokenizer TEXT ...  show how the run's tokenizer splits a text

Each command lives in the module that owns the concept and exposes `main(argv) -> int`; this file
only dispatches, and imports a command's module when that command runs (so `nanorun crd` never
loads torch).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("nanorun.trainer.data.dataset", "build (prepare) or download pretraining shards"),
    "crd": ("nanorun.operator.api.crd", "print the LLMRun CustomResourceDefinition (YAML)"),
    "operator": ("nanorun.operator.main", "run the Kubernetes operator"),
    "run": ("nanorun.cli.run", "run an LLMRun file on this machine, without a cluster"),
    "serve": ("nanorun.serving.cli", "serve a checkpoint: OpenAI-compatible API and web UI"),
    "chat": ("nanorun.trainer.chat_cli", "chat with a checkpoint in the terminal"),
    "export": (
        "nanorun.trainer.hf.export",
        "write a checkpoint as a Hugging Face model folder (transformers)",
    ),
    "delete-run": (
        "nanorun.pipeline.cleanup",
        "delete a run's files from its storage (storage.cleanupOnDelete)",
    ),
    "explain": ("nanorun.cli.explain", "show how a run's tokenizer splits a text (coloured tokens with ids)"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: nanorun COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `nanorun COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"nanorun: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
