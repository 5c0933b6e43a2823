"""The stage contract's two status files: `progress.json` (rewritten every few steps) and
`done.json` (written once, when the stage has finished).

Writers: every stage (rank 0). Readers: the operator (LLMRun status), the local executor (progress
bars), the report. One dataclass each, so writer and readers agree on the fields.

    <run-dir>/<stage>/progress.json   step, total_steps, loss, val_bpb, tokens_per_sec, mfu, eta_seconds, ...
    <run-dir>/<stage>/done.json       stage, seconds, metrics{...}, outputs{...}

Torch-free on purpose: the operator image imports it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from nanorun.trainer import storage

PROGRESS_FILE = "progress.json"
DONE_FILE = "done.json"


def stage_dir(run_dir: str, stage: str) -> str:
    return storage.join(run_dir, stage)


@dataclass
class Progress:
    stage: str
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    val_bpb: float | None = None
    tokens_per_sec: float | None = None
    mfu: float | None = None  # model FLOPs utilisation, 0..1 (None on CPU: no peak to compare with)
    eta_seconds: float | None = None
    elapsed_seconds: float = 0.0
    last_checkpoint: str | None = None
    world_size: int = 1
    message: str = ""
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Done:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def write_progress(run_dir: str, progress: Progress) -> None:
    progress.updated_at = time.time()
    storage.write_json(storage.join(run_dir, progress.stage, PROGRESS_FILE), progress.to_dict())


def read_progress(run_dir: str, stage: str) -> Progress | None:
    d = storage.read_json_or_none(storage.join(run_dir, stage, PROGRESS_FILE))
    return Progress.from_dict(d) if isinstance(d, dict) else None


def write_done(run_dir: str, done: Done) -> None:
    storage.write_json(storage.join(run_dir, done.stage, DONE_FILE), done.to_dict())


def read_done(run_dir: str, stage: str) -> Done | None:
    d = storage.read_json_or_none(storage.join(run_dir, stage, DONE_FILE))
    return Done.from_dict(d) if isinstance(d, dict) else None


def is_done(run_dir: str, stage: str) -> bool:
    return read_done(run_dir, stage) is not None
