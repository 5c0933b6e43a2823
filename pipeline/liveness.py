"""Per-rank liveness and attempt fencing: the files that let a reader tell a stalled stage from a slow
one, and that keep an old attempt's ranks from writing once a newer attempt has started.

Writers: every rank of a stage (its heartbeat thread, trainer/training/liveness.py); rank 0 of each
attempt claims the stage. Readers: the operator (stall detection, LLMRun status), the dashboard's
metrics, the report. Never the Kubernetes API: training pods hold no API credentials.

    <run-dir>/<stage>/ranks/rank-00000.json   one Heartbeat per rank, rewritten every beat
    <run-dir>/<stage>/stalls/attempt-2/rank-00001.txt   that rank's Python stacks, when it dumped them
    <run-dir>/<stage>/stalls/attempt-2/flight-recorder-rank-00001   its NCCL flight-recorder trace
    <run-dir>/<stage>/attempt.json            {"attempt": N, "claimed_at": t}: the newest attempt

A heartbeat separates two clocks. `beat_at` advances while the process lives (a thread writes it);
`progressed_at` advances only when the main thread does work that counts (a training step, an
evaluation batch, a chunk of a checkpoint). A process that is alive but not progressing is stuck (in
a collective, on storage, in a deadlock); a process whose beats stopped is gone or frozen.

Torch-free on purpose: the operator image imports it.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from nanorun.pipeline import storage
from nanorun.pipeline.errors import StageError
from nanorun.pipeline.layout import stage_dir

HEARTBEAT_SECONDS_ENV = "NANORUN_HEARTBEAT_SECONDS"  # how often a rank writes its heartbeat
HEARTBEAT_SECONDS = 15.0
COLLECTIVE_TIMEOUT_ENV = "NANORUN_COLLECTIVE_TIMEOUT_SECONDS"  # the process group's timeout
# A checkpoint upload, or a storage outage one rank rides out while the others wait in a barrier,
# must fit in it (pipeline/storage.py retries an unreachable store for OUTAGE_SECONDS, less than this).
COLLECTIVE_TIMEOUT_SECONDS = 1800.0
STALL_TIMEOUT_ENV = "NANORUN_STALL_TIMEOUT_SECONDS"  # after how long without progress a reader calls a stall
RANKS_DIR = "ranks"
STALLS_DIR = "stalls"
ATTEMPT_FILE = "attempt.json"
FLIGHT_RECORDER_PREFIX = "flight-recorder-rank-"  # `fr_trace --prefix` of torch.distributed.flight_recorder
_RANK_FILE = re.compile(r"^rank-(\d{5,})\.json$")

# Phases a rank reports. A reader allows a rank in a pausing phase as long as the longest such pause
# seen so far (`longest_pause_seconds`), since one compile or one evaluation is one long call.
STARTING, COMPILING, TRAINING, EVALUATING, CHECKPOINTING, FINISHED = (
    "starting",
    "compiling",
    "training",
    "evaluating",
    "checkpointing",
    "finished",
)
PAUSING_PHASES = (STARTING, COMPILING, EVALUATING, CHECKPOINTING)


def heartbeat_seconds() -> float:
    return float(os.environ.get(HEARTBEAT_SECONDS_ENV) or HEARTBEAT_SECONDS)


def collective_timeout_seconds() -> float:
    return float(os.environ.get(COLLECTIVE_TIMEOUT_ENV) or COLLECTIVE_TIMEOUT_SECONDS)


def stall_timeout_seconds() -> float | None:
    """The stall timeout the executor set (NANORUN_STALL_TIMEOUT_SECONDS), None when it set none."""
    value = os.environ.get(STALL_TIMEOUT_ENV)
    return float(value) if value else None


@dataclass
class Heartbeat:
    stage: str
    rank: int
    world_size: int = 1
    attempt: int = 0  # NANORUN_ATTEMPT of the process
    pod: str = ""  # the pod (HOSTNAME) the rank runs in
    step: int = 0  # the last step this rank completed
    phase: str = STARTING
    phase_since: float = field(default_factory=time.time)
    progressed_at: float = field(default_factory=time.time)  # the main thread's last progress
    beat_at: float = field(default_factory=time.time)  # when the file was written
    step_seconds: float | None = None  # recent mean time of one step
    longest_pause_seconds: float = 0.0  # longest compile, evaluation or checkpoint of this attempt
    stacks: str = ""  # storage URI of this rank's last stack dump ("" when none)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Heartbeat:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def ranks_dir(run_dir: str, stage: str) -> str:
    return storage.join(stage_dir(run_dir, stage), RANKS_DIR)


def heartbeat_path(run_dir: str, stage: str, rank: int) -> str:
    return storage.join(ranks_dir(run_dir, stage), f"rank-{rank:05d}.json")


def stalls_dir(run_dir: str, stage: str, attempt: int) -> str:
    """An attempt's stall evidence: every rank's stack dump and flight-recorder trace."""
    return storage.join(stage_dir(run_dir, stage), STALLS_DIR, f"attempt-{attempt}")


def stall_file_path(run_dir: str, stage: str, attempt: int, name: str) -> str:
    return storage.join(stalls_dir(run_dir, stage, attempt), name)


def stacks_path(run_dir: str, stage: str, attempt: int, rank: int) -> str:
    return stall_file_path(run_dir, stage, attempt, f"rank-{rank:05d}.txt")


def flight_recorder_path(run_dir: str, stage: str, attempt: int, rank: int) -> str:
    """A rank's NCCL flight-recorder trace (torch's pickle; read the folder with
    `python -m torch.distributed.flight_recorder.fr_trace DIR --prefix flight-recorder-rank-`)."""
    return stall_file_path(run_dir, stage, attempt, f"{FLIGHT_RECORDER_PREFIX}{rank:05d}")


def write_heartbeat(run_dir: str, beat: Heartbeat) -> None:
    beat.beat_at = time.time()
    storage.write_json(heartbeat_path(run_dir, beat.stage, beat.rank), beat.to_dict())


def read_heartbeats(run_dir: str, stage: str, attempt: int | None = None) -> list[Heartbeat]:
    """Every rank's last heartbeat, by rank; only `attempt`'s when given (a rank file of an earlier
    attempt is left from ranks that no longer exist)."""
    beats = []
    for uri in storage.list_files(ranks_dir(run_dir, stage)):
        if not _RANK_FILE.match(uri.rsplit("/", 1)[-1]):
            continue
        d = storage.read_json_or_none(uri)
        if isinstance(d, dict):
            beat = Heartbeat.from_dict(d)
            if attempt is None or beat.attempt == attempt:
                beats.append(beat)
    return sorted(beats, key=lambda b: b.rank)


class Superseded(StageError):
    """A newer attempt of this stage has started: this process must not write anything more (a stage
    ends on it with its one line, exit code 1)."""


def claim_attempt(run_dir: str, stage: str, attempt: int) -> None:
    """Rank 0 of `attempt` marks the stage as its own; a writer of an older attempt reads
    `claimed_attempt` before it writes, and stops."""
    storage.write_json(
        storage.join(stage_dir(run_dir, stage), ATTEMPT_FILE), {"attempt": attempt, "claimed_at": time.time()}
    )


def claimed_attempt(run_dir: str, stage: str) -> int:
    d = storage.read_json_or_none(storage.join(stage_dir(run_dir, stage), ATTEMPT_FILE))
    return int(d.get("attempt", 0)) if isinstance(d, dict) else 0


def superseded(run_dir: str, stage: str, attempt: int) -> bool:
    """Whether a newer attempt than `attempt` has claimed the stage (attempt 0, no executor: never)."""
    return attempt > 0 and claimed_attempt(run_dir, stage) > attempt


# --- the stall rule: what the operator decides from the heartbeats (pure, tested without a cluster) ---

# With no explicit timeout a stage may go this long without progress at least, and longer as its own
# steps and pauses say: many steps' time (a step can slow down), twice its longest pause so far.
STALL_FLOOR_SECONDS = 600.0
STEP_MARGIN = 10.0
PAUSE_MARGIN = 2.0
# A rank alive in a pausing phase whose length nothing measured yet (the attempt's first compile) is
# given at least this long: one compile of a large model takes minutes, and the others wait for it.
PAUSE_FLOOR_SECONDS = 1800.0
BEATS_MISSED = 3  # heartbeats a rank may miss (a slow write) before its beats count as stopped


def stall_timeout(explicit: float | None, beats: list[Heartbeat]) -> float:
    """Seconds a stage may go without progress: `explicit` (spec.retry.stallTimeoutSeconds), else
    derived from the stage itself: the floor, STEP_MARGIN steps, PAUSE_MARGIN × its longest compile,
    evaluation or checkpoint so far, whichever is longest."""
    if explicit:
        return float(explicit)
    step = max((b.step_seconds or 0.0 for b in beats), default=0.0)
    pause = max((b.longest_pause_seconds for b in beats), default=0.0)
    return max(STALL_FLOOR_SECONDS, STEP_MARGIN * step, PAUSE_MARGIN * pause)


def pause_timeout(timeout: float, beats: list[Heartbeat]) -> float:
    """Seconds a stage may go without progress while a live rank is in a pausing phase: one compile
    or evaluation is one long call, allowed PAUSE_MARGIN × the longest one seen, at least the floor."""
    pause = max((b.longest_pause_seconds for b in beats), default=0.0)
    return max(timeout, PAUSE_FLOOR_SECONDS, PAUSE_MARGIN * pause)


def stage_environment(explicit: float | None, beat_seconds: float) -> dict[str, str]:
    """What an executor (the operator, `nanorun run`) tells each stage process: how often to beat,
    how long a collective may block, and the shortest stall that may be called (ranks dump their
    stacks at half of it, so the stacks are in storage before any stall is)."""
    return {
        HEARTBEAT_SECONDS_ENV: f"{beat_seconds:g}",
        COLLECTIVE_TIMEOUT_ENV: f"{collective_timeout(explicit):g}",
        STALL_TIMEOUT_ENV: f"{stall_timeout(explicit, []):g}",  # the shortest stall_timeout can give
    }


def collective_timeout(explicit: float | None) -> float:
    """The process group's timeout (COLLECTIVE_TIMEOUT_ENV): longer than any stall the operator
    catches, so a rank stuck in a collective is the operator's stall (with every rank's stacks)
    while an operator is there, and the collective's error once nothing else ends it."""
    return max(PAUSE_FLOOR_SECONDS, 2.0 * stall_timeout(explicit, []))


def silent(beats: list[Heartbeat], now: float, beat_seconds: float = HEARTBEAT_SECONDS) -> list[Heartbeat]:
    """The unfinished ranks whose beats stopped for BEATS_MISSED heartbeats: frozen, or gone with
    their node, long before they count as stuck; a reader may look at their pods meanwhile."""
    return [b for b in beats if b.phase != FINISHED and now - b.beat_at > BEATS_MISSED * beat_seconds]


@dataclass(frozen=True)
class Stall:
    """A stage that stopped progressing: the ranks that stopped (`stuck`), every rank's heartbeat
    (`beats`, for the evidence), the step it stopped at and the timeout it was judged by."""

    stuck: tuple[Heartbeat, ...]
    beats: tuple[Heartbeat, ...]
    step: int
    timeout: float


def find_stall(
    beats: list[Heartbeat],
    now: float,
    explicit_timeout: float | None = None,
    beat_seconds: float = HEARTBEAT_SECONDS,
) -> Stall | None:
    """Whether one attempt's ranks (`beats`, that attempt's heartbeats) have stalled at `now`.

    A rank is stuck when its beats stopped (frozen, or gone with its node) for longer than the
    timeout, or when it lives but made no progress for longer than the stage's limit: the timeout,
    or the pause timeout while some live rank is compiling, evaluating, checkpointing or starting
    (the others wait for it in a collective). Finished ranks are never stuck; no heartbeat at all
    (the pods have not started) is no evidence of a stall."""
    live = [b for b in beats if b.phase != FINISHED]
    if not live:
        return None
    timeout = stall_timeout(explicit_timeout, beats)
    # A rank whose beats stopped for the whole timeout is stuck (`silent` above flags it sooner,
    # for a reader to look at its pod, but is no stall by itself).
    gone_after = max(timeout, BEATS_MISSED * beat_seconds)

    def gone(b: Heartbeat) -> bool:
        return now - b.beat_at > gone_after

    pausing = any(b.phase in PAUSING_PHASES and not gone(b) for b in live)
    limit = pause_timeout(timeout, beats) if pausing else timeout
    stuck = tuple(b for b in live if gone(b) or now - b.progressed_at > limit)
    if not stuck:
        return None
    return Stall(stuck=stuck, beats=tuple(beats), step=max(b.step for b in beats), timeout=timeout)
