"""The liveness of one stage process (one rank): its heartbeat thread, what the main thread reports
to it, the stacks it dumps and the attempt fencing every commit goes through. The files and their
readers: pipeline/liveness.py.

    start(run_dir, stage, rank, world_size, attempt, metrics)   (common.setup_stage, every rank)
    progressed(step=..., step_seconds=...)   a training step, an evaluation batch, a checkpoint chunk
    with pausing(EVALUATING): ...            a phase one long call may spend without progress
    ensure_current()                         Superseded when a newer attempt claimed the stage
    stop()                                   the stage finished: a last beat, the thread ends

One process holds one `Liveness` (module state, as it is one per rank): the helpers are no-ops
without it (a unit test calling a stage's parts without `setup_stage`).

The heartbeat thread wakes every second (`WAKE_SECONDS`) and:
- every `heartbeat_seconds()` writes this rank's `Heartbeat` (inside `storage.impatient()`: a write
  the store refuses is logged and tried at the next beat, it never stops the rank), and with an
  attempt reads attempt.json: once a newer attempt claimed the stage it writes no more heartbeats
  (the rank file is the newer attempt's now) and the main thread's next `progressed` raises
  `Superseded`;
- when the main thread has not progressed for `stack_dump_seconds()`, dumps every thread's Python
  stack (`faulthandler.dump_traceback`, which reads the interpreter's frames: no ptrace, so it
  works under Pod Security `restricted`) to `stacks_path` and names it in `Heartbeat.stacks`;
  again after twice as long while the rank stays stuck (so never at the collective timeout itself,
  where the dump would show the process's teardown instead of the hang);
- uploads what appeared in this process's scratch directory: a stack dump `kill -USR1 PID` asked
  for (`faulthandler.register`), and the NCCL flight recorder's trace, which the watchdog writes
  there on a collective timeout (distributed.nccl_environment) and then waits a minute before it
  tears the process down: enough for the next wake to copy it into the run directory. A process
  that ends on an error without `stop` copies what is left at exit.

A rank frozen by SIGSTOP, or whose node is gone, writes nothing: the silence of its heartbeat file
is the evidence a reader reports.

Fencing: rank 0 of an attempt claims the stage at start (an attempt older than the claim refuses to
start). Before every commit (progress.json, history.jsonl, done.json; a checkpoint's files and its
COMMITTED marker, which is written last) the writer calls `ensure_current()`, which reads the claim
again: a rank of an older attempt still running on a lost node then raises `Superseded` instead of
writing. Attempt 0 (no executor) is never fenced.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from nanorun.pipeline import storage
from nanorun.pipeline.liveness import (
    FINISHED,
    FLIGHT_RECORDER_PREFIX,
    PAUSING_PHASES,
    STARTING,
    TRAINING,
    Heartbeat,
    Superseded,
    claim_attempt,
    claimed_attempt,
    collective_timeout_seconds,
    flight_recorder_path,
    heartbeat_seconds,
    stacks_path,
    stall_timeout_seconds,
    write_heartbeat,
)

WAKE_SECONDS = 1.0  # how often the thread looks at the main thread's progress and the scratch directory
STEP_WINDOW = 20  # steps in the mean of `Heartbeat.step_seconds`
SIGNAL_STACKS_FILE = "stacks-on-signal.txt"  # where SIGUSR1's dump lands in the scratch directory


def stack_dump_seconds() -> float:
    """How long the main thread may go without progress before the thread dumps its stacks: half the
    stall timeout when the executor set one, and half the collective timeout at most. Stacks are then
    in storage before a reader declares the stall, and before a hung collective tears the process
    down; never less than two beats, so one slow step does not dump."""
    timeouts = [collective_timeout_seconds(), stall_timeout_seconds() or float("inf")]
    return max(2 * heartbeat_seconds(), min(timeouts) / 2)


def scratch_dir() -> Path:
    """This process's local directory for dumps on their way to the run directory."""
    return Path(tempfile.gettempdir()) / f"nanorun-liveness-{os.getpid()}"


class Liveness:
    """The heartbeat of one rank: the main thread marks, the thread writes (see the module doc)."""

    def __init__(
        self,
        run_dir: str,
        stage: str,
        rank: int,
        world_size: int,
        attempt: int,
        metrics: Any | None = None,
    ) -> None:
        self.run_dir, self.stage, self.attempt = run_dir, stage, attempt
        self.beat = Heartbeat(
            stage=stage,
            rank=rank,
            world_size=world_size,
            attempt=attempt,
            pod=os.environ.get("HOSTNAME", ""),
        )
        self.metrics = metrics
        self.scratch = scratch_dir()
        self.superseded_by = 0  # the newer attempt that claimed the stage, once the thread saw it
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._steps: deque[float] = deque(maxlen=STEP_WINDOW)
        self._dumped_at = 0.0  # when the thread last dumped stacks for lack of progress
        self._uploaded: dict[str, tuple[int, float]] = {}  # scratch file -> (size, mtime) uploaded
        self._signal_file: Any = None
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank-{rank}", daemon=True)

    @property
    def rank(self) -> int:
        return self.beat.rank

    # --- the main thread --------------------------------------------------------------------------

    def start(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._signal_file = open(self.scratch / SIGNAL_STACKS_FILE, "w")  # noqa: SIM115 (held until stop)
        faulthandler.register(signal.SIGUSR1, file=self._signal_file, all_threads=True, chain=False)
        if self.metrics is not None:
            self.metrics.set_phase(self.beat.phase)
            self.metrics.progressed(self.beat.progressed_at)
        self._write()
        self._thread.start()
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        """A process ending without `stop` (a stage that failed): what the scratch directory holds
        goes up, the directory goes."""
        with suppress(Exception):  # the process is ending on an error of its own already
            self._upload_scratch()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def stop(self) -> None:
        atexit.unregister(self._at_exit)
        self.set_phase(FINISHED)
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        faulthandler.unregister(signal.SIGUSR1)
        try:
            self._upload_scratch()
        except Exception as err:  # a finished stage does not fail for evidence it could not upload
            print(
                f"[rank {self.rank}] dumps not uploaded: {type(err).__name__}: {err}",
                file=sys.stderr,
                flush=True,
            )
        if self.superseded_by == 0:
            self._write()
        if self._signal_file is not None:
            self._signal_file.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def progressed(self, step: int | None = None, step_seconds: float | None = None) -> None:
        """The main thread did work that counts; raises Superseded once a newer attempt claimed the
        stage (a rank of an old attempt stops at its next step)."""
        if self.superseded_by:
            raise Superseded(self._superseded_message(self.superseded_by))
        now = time.time()
        with self._lock:
            self.beat.progressed_at = now
            if step is not None:
                self.beat.step = step
            if step_seconds is not None:
                self._steps.append(step_seconds)
                self.beat.step_seconds = sum(self._steps) / len(self._steps)
        if self.metrics is not None:
            self.metrics.progressed(now)

    def set_phase(self, phase: str) -> None:
        """Enter `phase`; leaving a pausing phase records its length in `longest_pause_seconds`."""
        now = time.time()
        with self._lock:
            if self.beat.phase in PAUSING_PHASES:
                paused = now - self.beat.phase_since
                self.beat.longest_pause_seconds = max(self.beat.longest_pause_seconds, paused)
            self.beat.phase, self.beat.phase_since = phase, now
            self.beat.progressed_at = now  # entering or leaving a phase is progress too
        if self.metrics is not None:
            self.metrics.set_phase(phase)

    @contextmanager
    def pausing(self, phase: str) -> Iterator[None]:
        """`phase` for the block, then the phase before it (training after the start)."""
        before = self.beat.phase
        self.set_phase(phase)
        try:
            yield
        finally:
            self.set_phase(TRAINING if before == STARTING else before)

    def ensure_current(self) -> None:
        """Raise Superseded when a newer attempt has claimed the stage (one read of attempt.json)."""
        if self.attempt <= 0:
            return
        claimed = claimed_attempt(self.run_dir, self.stage)
        if claimed > self.attempt:
            self.superseded_by = claimed
            raise Superseded(self._superseded_message(claimed))

    def claim(self) -> None:
        """Rank 0: make the stage this attempt's (after checking no newer attempt has it)."""
        if self.attempt > 0:
            self.ensure_current()
            claim_attempt(self.run_dir, self.stage, self.attempt)

    def _superseded_message(self, claimed: int) -> str:
        return (
            f"rank {self.rank} of attempt {self.attempt} of {self.stage}: attempt {claimed} has claimed "
            "the stage; this process writes nothing more"
        )

    # --- the heartbeat thread ---------------------------------------------------------------------

    def _run(self) -> None:
        next_beat = time.monotonic() + heartbeat_seconds()
        while not self._stopping.wait(WAKE_SECONDS):
            try:
                self._upload_scratch()
                self._dump_if_stuck()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + heartbeat_seconds()
                    self._check_claim()
                    if not self.superseded_by:
                        self._write()
            except Exception as err:  # the thread outlives anything one wake runs into
                print(
                    f"[rank {self.rank}] heartbeat: {type(err).__name__}: {err}", file=sys.stderr, flush=True
                )

    def _write(self) -> None:
        with self._lock:
            beat = Heartbeat.from_dict(self.beat.to_dict())
        if self.metrics is not None:
            self.metrics.beat(time.time())
        try:
            with storage.impatient():
                write_heartbeat(self.run_dir, beat)
        except Exception as err:  # storage down: the next beat tries again
            if self.metrics is not None:
                self.metrics.heartbeat_failed()
            print(
                f"[rank {self.rank}] heartbeat not written ({type(err).__name__}: {err}); trying again "
                f"in {heartbeat_seconds():g} s",
                file=sys.stderr,
                flush=True,
            )

    def _check_claim(self) -> None:
        if self.superseded_by:
            return
        try:
            with storage.impatient():
                self.ensure_current()
        except Superseded as err:
            print(f"[rank {self.rank}] {err}", file=sys.stderr, flush=True)
        except Exception as err:  # storage down: the beat is tried anyway, the claim read again next time
            print(
                f"[rank {self.rank}] attempt claim not read ({type(err).__name__})",
                file=sys.stderr,
                flush=True,
            )

    def _dump_if_stuck(self) -> None:
        now, after = time.time(), stack_dump_seconds()
        if (
            self.beat.phase == FINISHED
            or now - self.beat.progressed_at < after
            or now - self._dumped_at < 2 * after
        ):
            return
        self._dumped_at = now
        local = self.scratch / "stacks.txt"
        with open(local, "w") as f:
            f.write(
                f"rank {self.rank} of attempt {self.attempt}, phase {self.beat.phase}, step {self.beat.step}: "
                f"no progress for {now - self.beat.progressed_at:.0f} s\n\n"
            )
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        uri = self._upload_stacks(local)
        print(
            f"[rank {self.rank}] no progress for {now - self.beat.progressed_at:.0f} s "
            f"(phase {self.beat.phase}); every thread's stack: {uri}",
            file=sys.stderr,
            flush=True,
        )

    def _upload_stacks(self, local: Path) -> str:
        uri = stacks_path(self.run_dir, self.stage, self.attempt, self.rank)
        with storage.impatient():
            storage.upload_from(local, uri)
        with self._lock:
            self.beat.stacks = uri
        return uri

    def _upload_scratch(self) -> None:
        """Copy what changed in the scratch directory: SIGUSR1's stacks, the flight recorder's trace."""
        if not self.scratch.is_dir():
            return
        for path in sorted(self.scratch.iterdir()):
            if path.name.startswith(FLIGHT_RECORDER_PREFIX):
                dest = flight_recorder_path(self.run_dir, self.stage, self.attempt, self.rank)
            elif path.name == SIGNAL_STACKS_FILE:
                dest = None
            else:
                continue
            stat = path.stat()
            if stat.st_size == 0 or self._uploaded.get(path.name) == (stat.st_size, stat.st_mtime):
                continue
            if dest is None:
                self._upload_stacks(path)
            else:
                with storage.impatient():
                    storage.upload_from(path, dest)
            self._uploaded[path.name] = (stat.st_size, stat.st_mtime)
            print(
                f"[rank {self.rank}] uploaded {path.name} to {dest or self.beat.stacks}",
                file=sys.stderr,
                flush=True,
            )


_current: Liveness | None = None  # this process's (one rank, one stage)


def start(
    run_dir: str, stage: str, rank: int, world_size: int, attempt: int, metrics: Any | None = None
) -> Liveness:
    """Start this rank's heartbeat (rank 0 first claims the stage for its attempt)."""
    global _current
    if _current is not None:
        _current.stop()
    live = Liveness(run_dir, stage, rank, world_size, attempt, metrics)
    if rank == 0:
        live.claim()
    else:
        live.ensure_current()
    live.start()
    _current = live
    return live


def stop() -> None:
    global _current
    if _current is not None:
        _current.stop()
        _current = None


def current() -> Liveness | None:
    return _current


def progressed(step: int | None = None, step_seconds: float | None = None) -> None:
    if _current is not None:
        _current.progressed(step, step_seconds)


def set_phase(phase: str) -> None:
    if _current is not None:
        _current.set_phase(phase)


@contextmanager
def pausing(phase: str) -> Iterator[None]:
    if _current is None:
        yield
        return
    with _current.pausing(phase):
        yield


def ensure_current() -> None:
    if _current is not None:
        _current.ensure_current()
