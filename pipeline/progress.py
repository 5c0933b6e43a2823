"""The stage contract's two status files: `progress.json` (rewritten every few steps) and
`done.json` (written once, when the stage has finished).

Writers: every stage (rank 0). Readers: the operator (LLMRun status), the local executor (progress
bars), the report. One dataclass each, so writer and readers agree on the fields.

    <run-dir>/<stage>/progress.json   stage, step, total_steps, loss, ..., attempt, stopped
    <run-dir>/<stage>/done.json       stage, seconds, metrics{...}, outputs{...}, config_id

`<stage>` and the `stage` field are the stage's key (pipeline/stages.py).

Two settings come from the executor (the operator or `nanorun run`), read here and nowhere else:

    NANORUN_ATTEMPT     which attempt of the stage this process is (1, 2, ...; unset: 0). Every
                        progress.json carries it, so a reader can tell this attempt's file from an
                        earlier one's; `stopped="preempted"` marks an attempt that exited on SIGTERM
                        after saving its checkpoint (under torchrun the exit code is torchrun's, not 143).
    NANORUN_CONFIG_ID   an opaque id of the stage's configuration and of every stage before it
                        (unset: ""). done.json and checkpoints record it; a finished stage counts as
                        done, and a checkpoint as resumable, only for the same id (`is_current`).

In a Kubeflow Trainer v2 TrainJob whose Trainer reports progress, both writers also hand their
record to `trainer_status`, which sends it on as the TrainJob's `status.trainerStatus`.

Torch-free on purpose: the operator image imports it.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from nanorun.pipeline import storage, trainer_status
from nanorun.pipeline.layout import DONE_FILE, PROGRESS_FILE, stage_dir

ATTEMPT_ENV = "NANORUN_ATTEMPT"
CONFIG_ID_ENV = "NANORUN_CONFIG_ID"
PREEMPTED = "preempted"  # Progress.stopped of an attempt that saved its checkpoint on SIGTERM and exited


def current_attempt() -> int:
    """This process's attempt of its stage (NANORUN_ATTEMPT), 0 when no executor set it."""
    return int(os.environ.get(ATTEMPT_ENV) or 0)


def current_config_id() -> str:
    """The configuration id of this process's stage (NANORUN_CONFIG_ID), "" when none was given."""
    return os.environ.get(CONFIG_ID_ENV, "").strip()


@dataclass
class Progress:
    stage: str
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    val_bpb: float | None = None
    tokens_per_sec: float | None = None
    mfu: float | None = None  # model FLOPs utilisation, 0..1 (None on CPU: no peak to compare with)
    compile_seconds: float | None = None  # torch.compile time so far, apart from step time (None: eager)
    eta_seconds: float | None = None
    elapsed_seconds: float = 0.0
    last_checkpoint: str | None = None
    world_size: int = 1
    message: str = ""
    attempt: int = 0  # NANORUN_ATTEMPT of the process that wrote the file
    stopped: str = ""  # "preempted": the attempt saved a checkpoint on SIGTERM and exited
    updated_at: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Done:
    stage: str
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)  # e.g. {"checkpoint": "s3://.../step_000700"}
    finished_at: float = field(default_factory=time.time)
    config_id: str = ""  # NANORUN_CONFIG_ID of the run that finished the stage

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Done:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def write_progress(run_dir: str, progress: Progress) -> None:
    progress.updated_at = time.time()
    storage.write_json(storage.join(stage_dir(run_dir, progress.stage), PROGRESS_FILE), progress.to_dict())
    trainer_status.publish(progress)


def read_progress(run_dir: str, stage: str) -> Progress | None:
    d = storage.read_json_or_none(storage.join(stage_dir(run_dir, stage), PROGRESS_FILE))
    return Progress.from_dict(d) if isinstance(d, dict) else None


def write_done(run_dir: str, done: Done) -> None:
    storage.write_json(storage.join(stage_dir(run_dir, done.stage), DONE_FILE), done.to_dict())
    trainer_status.publish_done(done)


def read_done(run_dir: str, stage: str) -> Done | None:
    d = storage.read_json_or_none(storage.join(stage_dir(run_dir, stage), DONE_FILE))
    return Done.from_dict(d) if isinstance(d, dict) else None


def is_done(run_dir: str, stage: str) -> bool:
    return read_done(run_dir, stage) is not None


def is_current(done: Done | None, config_id: str) -> bool:
    """Whether a finished stage counts as done for configuration `config_id`.

    The one rule every reader of done.json applies (the stages, `nanorun run`, the operator): done
    when the ids are equal, or when no id is given (`config_id` "": a stage run by hand, with no
    executor). A done.json of another configuration (its flags, or an earlier stage's, changed)
    means: run the stage again.
    """
    return done is not None and (not config_id or done.config_id == config_id)


def rerun_reason(done: Done, config_id: str) -> str:
    """The line a stage (or `nanorun run`) prints when it runs a finished stage again."""
    return (
        f"{done.stage}: re-running after a spec change: done.json is of config "
        f"{done.config_id or '(none)'}, this run is config {config_id}"
    )
