"""The `export` stage: the run's final model as a Hugging Face folder, `<run-dir>/export/model/`.

    python -m nanorun.trainer.export --run-dir URI [--source sft] [--dtype bfloat16]

- `--source` names the model stage whose final checkpoint is exported (the operator and `nanorun
  run` pass the spec's last enabled model stage); without it, the newest finished one of rl, sft,
  midtrain, pretrain.
- The folder is what `nanorun export` writes (trainer/hf/export.py): config, weights in `--dtype`,
  the model's code for `trust_remote_code`, the tokenizer with its chat template, a generation
  config. A re-run after a spec change replaces it; it appears whole or not at all.
- done.json's outputs: `model` (the folder) and `checkpoint` (what it was exported from); the
  report links the folder.

Off by default (`spec.stages.export.enabled`); one process, no GPU needed.
"""

from __future__ import annotations

import argparse
import sys

from nanorun.pipeline import storage
from nanorun.pipeline.errors import run_main
from nanorun.pipeline.progress import is_done
from nanorun.pipeline.stages import MODEL_KEYS
from nanorun.trainer.training.common import add_common_args, setup_stage, teardown

MODEL_FOLDER = "model"  # <run-dir>/export/model/: the Hugging Face folder, apart from the stage's own files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nanorun.trainer.export", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument(
        "--source", default=None, help=f"the model stage to export ({', '.join(MODEL_KEYS)}; default: newest)"
    )
    p.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16", help="dtype of the weights"
    )
    return p


def source_stage(run_dir: str, source: str | None) -> str:
    """The key of the model stage to export: `source`, or the newest that finished."""
    from nanorun.trainer.training.checkpoint import CheckpointError

    if source is None:
        finished = [key for key in reversed(MODEL_KEYS) if is_done(run_dir, key)]  # newest first
        if not finished:
            raise CheckpointError(
                f"nothing to export: none of {', '.join(MODEL_KEYS)} has finished in {run_dir}"
            )
        return finished[0]
    if source not in MODEL_KEYS:
        raise CheckpointError(f"--source must be one of {', '.join(MODEL_KEYS)}, got {source!r}")
    return source


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = setup_stage("export", args)
    if ctx.already_done:
        return teardown(ctx)
    from nanorun.trainer.hf.export import export_checkpoint
    from nanorun.trainer.training.checkpoint import final_checkpoint

    source = source_stage(ctx.run_dir, args.source)
    checkpoint = final_checkpoint(ctx.run_dir, source)
    ctx.progress(flush=True, step=0, total_steps=1, message=f"exporting {source}: {checkpoint}")
    out = export_checkpoint(checkpoint, storage.join(ctx.stage_dir, MODEL_FOLDER), args.dtype, replace=True)
    ctx.print0(f"export: {checkpoint} -> {out}")
    ctx.progress(flush=True, step=1, total_steps=1)
    ctx.done({"source": source, "dtype": args.dtype}, {"model": out, "checkpoint": checkpoint})
    return teardown(ctx)


if __name__ == "__main__":
    sys.exit(run_main(main))
