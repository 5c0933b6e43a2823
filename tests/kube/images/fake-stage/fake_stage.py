"""The fake stage: what `torchrun -m nanorun.trainer.<module> ...` and `python -m nanorun.trainer.<module>
...` run in the test image `nanorun-fake-stage` (tests/kube/images/Dockerfile), so the operator tests drive
real PyTorchJobs through the real training-operator in seconds instead of training.

It keeps the stage contract (nanorun.pipeline.progress) as a trainer does, on rank 0:

- `<run-dir>/<stage>/progress.json` (`<stage>`: the key of the stage its module runs) after every
  step (with NANORUN_ATTEMPT), starting after the step the last progress.json reached: a stage
  whose pods were deleted (suspend, preemption) and recreated goes on where it stopped, as a
  trainer resumes from its checkpoint;
- `<run-dir>/<stage>/done.json` at the end, with a checkpoint output and NANORUN_CONFIG_ID; a stage
  whose done.json is current for its configuration does nothing, as a finished stage does;
- on SIGTERM: progress.json with `stopped="preempted"` and the attempt, then exit 143.

Every rank (RANK, which the training-operator sets per pod, or a TrainJob pod's PET_NODE_RANK, of
PET_NNODES) takes the steps and keeps the liveness contract (nanorun.pipeline.liveness):
a thread writes its heartbeat every NANORUN_HEARTBEAT_SECONDS, the loop marks each step's progress,
and after each step the ranks wait for one another through their heartbeats, as ranks wait in a
collective, so one rank that stops holds them all. Rank 0 claims the attempt; a rank whose attempt
a newer one superseded writes nothing more. Storage is the pod's: AWS_ENDPOINT_URL and the
credentials the operator puts in its env.

Its own flags reach it through the LLMRun's `spec.stages.<key>.extraArgs`; every other flag (the
stage's, `--metrics-port`) is accepted and ignored:

    --fake-steps N               steps to take (default 3)
    --fake-step-seconds S        seconds per step (default 0.05)
    --fake-fail-attempts 1,2     exit 1 after the last step of these attempts, saying so on stderr
    --fake-compile-seconds S     spend S seconds `compiling` before the first step (beating, no progress)
    --fake-compile-attempts 1    only in these attempts (default: every one)
    --fake-read-attempts 2       in these attempts, rank --fake-read-rank (default 0) reads
    --fake-read-at-step N        `<run-dir>/<stage>/inputs/rank-NNNNN` from storage before step N
                                 (default 2), as a data loader reads its next shard; behind a proxy
                                 that holds that request (tests/fixtures/faulty_s3.py) the rank
                                 blocks in the read while its heartbeat thread beats on

Run by hand: python tests/kube/images/fake-stage/fake_stage.py -m nanorun.trainer.base_train --run-dir /tmp/r
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from nanorun.pipeline import layout, liveness, storage
from nanorun.pipeline.progress import (
    PREEMPTED,
    Done,
    Progress,
    current_attempt,
    current_config_id,
    is_current,
    read_done,
    read_progress,
    write_done,
    write_progress,
)
from nanorun.pipeline.stages import STAGES


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fake-stage", description=__doc__.splitlines()[0])
    p.add_argument(
        "-m", dest="module", required=True, help="the stage module, e.g. nanorun.trainer.base_train"
    )
    p.add_argument("--run-dir", required=True, help="the run directory (s3:// or a local path)")
    p.add_argument("--fake-steps", type=int, default=3, help="steps to take")
    p.add_argument("--fake-step-seconds", type=float, default=0.05, help="seconds per step")
    p.add_argument("--fake-fail-attempts", default="", help="comma-separated attempts that exit 1 at the end")
    p.add_argument("--fake-compile-seconds", type=float, default=0.0, help="seconds compiling before step 1")
    p.add_argument("--fake-compile-attempts", default="", help="comma-separated attempts that compile (all)")
    p.add_argument("--fake-read-attempts", default="", help="comma-separated attempts in which a rank reads")
    p.add_argument("--fake-read-rank", type=int, default=0, help="the rank that reads")
    p.add_argument("--fake-read-at-step", type=int, default=2, help="the step it reads before")
    args, _stage_flags = p.parse_known_args(argv)
    return args


def _attempts(listed: str) -> set[int]:
    return {int(a) for a in listed.split(",") if a.strip()}


def _beat(run_dir: str, beat: liveness.Heartbeat, stop: threading.Event) -> None:
    """The heartbeat thread: `beat` every NANORUN_HEARTBEAT_SECONDS until `stop`, or until a newer
    attempt claimed the stage."""
    while not stop.wait(liveness.heartbeat_seconds()):
        try:
            if liveness.superseded(run_dir, beat.stage, beat.attempt):
                return
            liveness.write_heartbeat(run_dir, beat)
        except Exception as err:  # storage trouble: beat again next time
            print(f"fake stage: heartbeat not written: {err}", flush=True)


def _wait_for_ranks(run_dir: str, beat: liveness.Heartbeat, terminated: threading.Event) -> bool:
    """The collective after a step: wait until every rank of this attempt has finished it (their
    heartbeats say so). False on SIGTERM."""
    while True:
        beats = liveness.read_heartbeats(run_dir, beat.stage, beat.attempt)
        if len(beats) >= beat.world_size and min(b.step for b in beats) >= beat.step:
            return True
        if terminated.wait(0.2):
            return False


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    module = args.module.rsplit(".", 1)[-1]
    keys = {s.module: s.key for s in STAGES}
    if module not in keys:  # a one-process job outside the stage table (the sweep report)
        print(f"fake stage {module}: a job without a stage contract, done", flush=True)
        return 0
    stage = keys[module]
    attempt, config_id = current_attempt(), current_config_id()
    steps, step_seconds = args.fake_steps, args.fake_step_seconds
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: terminated.set())
    # The training-operator sets RANK per pod; under a TrainJob, Trainer's torch plugin sets only
    # torchrun's PET_NODE_RANK (torchrun, which this stands in for, derives RANK from it). Both set
    # PET_NNODES, the pods of the job: one process each here.
    rank = int(os.environ.get("RANK", os.environ.get("PET_NODE_RANK", "0")))
    world = int(os.environ.get("PET_NNODES", os.environ.get("WORLD_SIZE", "1")))
    if is_current(read_done(args.run_dir, stage), config_id):
        print(f"fake stage {stage}: done.json is current, nothing to do", flush=True)
        return 0
    if rank == 0:
        liveness.claim_attempt(args.run_dir, stage, attempt)
    last = read_progress(args.run_dir, stage)
    start = last.step if last is not None and last.total_steps == steps else 0
    print(
        f"fake stage {stage}: attempt {attempt}, rank {rank} of {world}, {steps} steps of {step_seconds} s, "
        f"from step {start}",
        flush=True,
    )
    beat = liveness.Heartbeat(
        stage=stage,
        rank=rank,
        world_size=world,
        attempt=attempt,
        pod=os.environ.get("HOSTNAME", ""),
        step=start,
    )
    liveness.write_heartbeat(args.run_dir, beat)
    stop_beating = threading.Event()
    threading.Thread(target=_beat, args=(args.run_dir, beat, stop_beating), daemon=True).start()
    began = time.monotonic()

    def progress(step: int, stopped: str = "") -> Progress:
        return Progress(
            stage=stage,
            step=step,
            total_steps=steps,
            loss=4.0 / max(step, 1),
            val_bpb=1.5 / max(step, 1),
            tokens_per_sec=1000.0 * step,
            mfu=0.4,
            eta_seconds=(steps - step) * step_seconds,
            elapsed_seconds=time.monotonic() - began,
            world_size=world,
            attempt=attempt,
            stopped=stopped,
            extra={"resumed_from": start},
        )

    def stopped(step: int) -> int:
        """SIGTERM: rank 0 saves its progress as preempted, unless a newer attempt owns the stage."""
        if rank == 0 and not liveness.superseded(args.run_dir, stage, attempt):
            write_progress(args.run_dir, progress(step, stopped=PREEMPTED))
        print(f"fake stage {stage}: SIGTERM at step {step}, progress saved", flush=True)
        return 143

    compiles = not args.fake_compile_attempts or attempt in _attempts(args.fake_compile_attempts)
    if args.fake_compile_seconds and compiles:
        beat.phase, beat.phase_since = liveness.COMPILING, time.time()
        liveness.write_heartbeat(args.run_dir, beat)
        if terminated.wait(args.fake_compile_seconds):
            return stopped(start)
        beat.longest_pause_seconds = args.fake_compile_seconds
    beat.phase, beat.phase_since, beat.progressed_at = liveness.TRAINING, time.time(), time.time()
    reads = attempt in _attempts(args.fake_read_attempts) and rank == args.fake_read_rank
    for step in range(start + 1, steps + 1):
        if reads and step == args.fake_read_at_step:
            inputs = storage.join(args.run_dir, stage, "inputs", f"rank-{rank:05d}")
            print(f"fake stage {stage}: rank {rank} reads {inputs} before step {step}", flush=True)
            storage.read_bytes(inputs)
        t0 = time.monotonic()
        if terminated.wait(step_seconds):
            return stopped(step - 1)
        beat.step, beat.progressed_at, beat.step_seconds = step, time.time(), time.monotonic() - t0
        liveness.write_heartbeat(args.run_dir, beat)
        if world > 1 and not _wait_for_ranks(args.run_dir, beat, terminated):
            return stopped(step)
        if liveness.superseded(args.run_dir, stage, attempt):
            print(f"fake stage {stage}: a newer attempt took over, stopping", flush=True)
            return 1
        if rank == 0:
            write_progress(args.run_dir, progress(step))
        print(f"fake stage {stage}: step {step}/{steps}", flush=True)
    stop_beating.set()
    beat.phase = liveness.FINISHED
    liveness.write_heartbeat(args.run_dir, beat)
    if rank != 0:  # only rank 0 writes the contract's files
        return 0
    if attempt in _attempts(args.fake_fail_attempts):
        print(
            f"fake stage {stage}: attempt {attempt} fails as asked (--fake-fail-attempts)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    checkpoint = layout.checkpoint_dir(layout.stage_dir(args.run_dir, stage), steps)
    write_done(
        args.run_dir,
        Done(
            stage=stage,
            seconds=steps * step_seconds,
            metrics={"loss": 4.0 / steps, "val_bpb": 1.5 / steps},
            outputs={"checkpoint": checkpoint},
            config_id=config_id,
        ),
    )
    print(f"fake stage {stage}: done, checkpoint {checkpoint}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
