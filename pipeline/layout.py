"""The run directory's layout: the paths a stage, the operator, `nanorun run` or the chat service
builds under `<run-dir>` (a local folder or `s3://bucket/prefix`) come from here, and a stage's
liveness files from pipeline/liveness.py, below `stage_dir`.

    <run-dir>/
      <key>/                        one folder per stage, named by its key (pipeline/stages.py), e.g. pretrain/
        progress.json  done.json    the stage contract (pipeline/progress.py)
        history.jsonl               one line per logged step
        checkpoints/step_NNNNNN/    model.safetensors, meta.json, optim/, COMMITTED
        attempt.json                the attempt that claimed the stage         } pipeline/liveness.py
        ranks/rank-NNNNN.json       each rank's last heartbeat                 }
        stalls/attempt-N/           stack dumps and flight-recorder traces     }
      export/model/                 the Hugging Face folder of the export stage (trainer/export.py)
      tokenizer/                    the tokenizer (tokenizer.tiktoken, tokenizer.json)
      eval/results/, eval/samples/  chat evaluation's results and samples, one per evaluated stage
      task_data/                    evaluation and finetuning datasets, fetched once per run
      data/bundled/                 the bundled corpus, when a run uses it
      report/                       report.md and its charts
"""

from __future__ import annotations

import re

from nanorun.pipeline import storage
from nanorun.pipeline.stages import TOKENIZER, by_key

PROGRESS_FILE = "progress.json"
DONE_FILE = "done.json"
HISTORY_FILE = "history.jsonl"
CHECKPOINTS = "checkpoints"
TOKENIZER_FILE = "tokenizer.tiktoken"  # the tokenizer's merges (trainer/data/tokenizer.py writes it)
STEP_DIR = re.compile(r"^step_(\d{6,})$")


def stage_dir(run_dir: str, stage: str) -> str:
    """`<run-dir>/<key>/`, where the stage `stage` (its key) keeps its files."""
    return storage.join(run_dir, by_key(stage).key)


def checkpoints_dir(stage_dir_uri: str) -> str:
    return storage.join(stage_dir_uri, CHECKPOINTS)


def checkpoint_dir(stage_dir_uri: str, step: int) -> str:
    return storage.join(stage_dir_uri, CHECKPOINTS, f"step_{step:06d}")


class NotACheckpointPath(ValueError):
    """A checkpoint's URI that is not `<run-dir>/<stage>/checkpoints/step_NNNNNN`."""


def run_dir_of_checkpoint(checkpoint_uri: str) -> str:
    """`<run-dir>` of `<run-dir>/<stage>/checkpoints/step_NNNNNN`."""
    parts = checkpoint_uri.rstrip("/").rsplit("/", 3)
    if len(parts) != 4 or parts[2] != CHECKPOINTS or not STEP_DIR.match(parts[3]):
        raise NotACheckpointPath(f"{checkpoint_uri} is not <run-dir>/<stage>/{CHECKPOINTS}/step_NNNNNN")
    return parts[0]


def tokenizer_dir(run_dir: str) -> str:
    """`<run-dir>/tokenizer/`, where the tokenizer stage writes the tokenizer."""
    return stage_dir(run_dir, TOKENIZER.key)


def task_data_dir(run_dir: str) -> str:
    return storage.join(run_dir, "task_data")


def bundled_data_dir(run_dir: str) -> str:
    return storage.join(run_dir, "data", "bundled")


def report_dir(run_dir: str) -> str:
    return storage.join(run_dir, "report")
