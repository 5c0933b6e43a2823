"""The run directory's layout: every path a stage, the operator, `nanorun run` or the chat service
builds under `<run-dir>` (a local folder or `s3://bucket/prefix`) comes from here.

    <run-dir>/
      <key>/                        one folder per stage, named by its key (pipeline/stages.py), e.g. pretrain/
        progress.json  done.json    the stage contract (pipeline/progress.py)
        history.jsonl               one line per logged step
        checkpoints/step_NNNNNN/    model.safetensors, meta.json, optim/, COMMITTED
      tokenizer/                    the tokenizer (tokenizer.tiktoken, tokenizer.json)
      eval/results/, eval/samples/  chat evaluation's results and samples, one per evaluated stage
      task_data/                    evaluation and finetuning datasets, fetched once per run
      data/bundled/                 the bundled corpus, when a run uses it
      report/                       report.md and its charts

Writers use `stage_dir`. Runs written before stages had one name kept a stage's files in its module's
folder (`base_train/`, `tok_train/`, ...); for one release readers find them there through
`stage_dir_to_read`, which the progress files, the tokenizer and checkpoint lookups use.
"""

from __future__ import annotations

import re

from nanorun.pipeline import storage
from nanorun.pipeline.stages import TOKENIZER, stage_named

PROGRESS_FILE = "progress.json"
DONE_FILE = "done.json"
HISTORY_FILE = "history.jsonl"
CHECKPOINTS = "checkpoints"
TOKENIZER_FILE = "tokenizer.tiktoken"  # the tokenizer's merges (trainer/data/tokenizer.py writes it)
STEP_DIR = re.compile(r"^step_(\d{6,})$")


def stage_dir(run_dir: str, stage: str) -> str:
    """`<run-dir>/<key>/`, where a stage writes its files (`stage`: its key, or its old module name)."""
    return storage.join(run_dir, stage_named(stage).key)


def legacy_stage_dir(run_dir: str, stage: str) -> str:
    """`<run-dir>/<module>/`, the folder of a stage in runs written before stages had one name."""
    return storage.join(run_dir, stage_named(stage).module)


def stage_dir_to_read(run_dir: str, stage: str, marker: str = DONE_FILE) -> str:
    """The folder a reader finds a stage's files in: `stage_dir`, or, in a run written before stages
    had one name, the legacy folder when it holds `marker` and `stage_dir` does not."""
    new, old = stage_dir(run_dir, stage), legacy_stage_dir(run_dir, stage)
    if (
        new == old
        or storage.exists(storage.join(new, marker))
        or not storage.exists(storage.join(old, marker))
    ):
        return new
    return old


def checkpoints_dir(stage_dir_uri: str) -> str:
    return storage.join(stage_dir_uri, CHECKPOINTS)


def checkpoint_dir(stage_dir_uri: str, step: int) -> str:
    return storage.join(stage_dir_uri, CHECKPOINTS, f"step_{step:06d}")


def run_dir_of_checkpoint(checkpoint_uri: str) -> str:
    """`<run-dir>` of `<run-dir>/<stage>/checkpoints/step_NNNNNN`."""
    parts = checkpoint_uri.rstrip("/").rsplit("/", 3)
    if len(parts) != 4 or parts[2] != CHECKPOINTS or not STEP_DIR.match(parts[3]):
        raise ValueError(f"{checkpoint_uri} is not <run-dir>/<stage>/{CHECKPOINTS}/step_NNNNNN")
    return parts[0]


def tokenizer_dir(run_dir: str) -> str:
    """`<run-dir>/tokenizer/`, where the tokenizer stage writes the tokenizer."""
    return stage_dir(run_dir, TOKENIZER.key)


def tokenizer_dir_to_read(run_dir: str) -> str:
    """The folder a reader loads a run's tokenizer from (`tokenizer_dir`, or an older run's `tok_train/`)."""
    return stage_dir_to_read(run_dir, TOKENIZER.key, TOKENIZER_FILE)


def task_data_dir(run_dir: str) -> str:
    return storage.join(run_dir, "task_data")


def bundled_data_dir(run_dir: str) -> str:
    return storage.join(run_dir, "data", "bundled")


def report_dir(run_dir: str) -> str:
    return storage.join(run_dir, "report")
