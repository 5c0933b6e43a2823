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

Other ranks (RANK, which the training-operator sets per pod, or a TrainJob pod's PET_NODE_RANK)
only take the same time. Storage is the pod's: AWS_ENDPOINT_URL and the credentials the operator
puts in its env.

Its own flags reach it through the LLMRun's `spec.stages.<key>.extraArgs`; every other flag (the
stage's, `--metrics-port`) is accepted and ignored:

    --fake-steps N               steps to take (default 3)
    --fake-step-seconds S        seconds per step (default 0.05)
    --fake-fail-attempts 1,2     exit 1 after the last step of these attempts, saying so on stderr

Run by hand: python tests/kube/images/fake-stage/fake_stage.py -m nanorun.trainer.base_train --run-dir /tmp/r
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from nanorun.pipeline import layout
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
from nanorun.pipeline.stages import STAGES, stage_named


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fake-stage", description=__doc__.splitlines()[0])
    p.add_argument(
        "-m", dest="module", required=True, help="the stage module, e.g. nanorun.trainer.base_train"
    )
    p.add_argument("--run-dir", required=True, help="the run directory (s3:// or a local path)")
    p.add_argument("--fake-steps", type=int, default=3, help="steps to take")
    p.add_argument("--fake-step-seconds", type=float, default=0.05, help="seconds per step")
    p.add_argument("--fake-fail-attempts", default="", help="comma-separated attempts that exit 1 at the end")
    args, _stage_flags = p.parse_known_args(argv)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    module = args.module.rsplit(".", 1)[-1]
    if module not in {
        s.module for s in STAGES
    }:  # a one-process job outside the stage table (the sweep report)
        print(f"fake stage {module}: a job without a stage contract, done", flush=True)
        return 0
    stage = stage_named(module).key  # as the trainer's setup_stage names it
    attempt, config_id = current_attempt(), current_config_id()
    fail_attempts = {int(a) for a in args.fake_fail_attempts.split(",") if a.strip()}
    steps, step_seconds = args.fake_steps, args.fake_step_seconds
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: terminated.set())
    # The training-operator sets RANK per pod; under a TrainJob, Trainer's torch plugin sets only
    # torchrun's PET_NODE_RANK (torchrun, which this stands in for, derives RANK from it).
    rank = int(os.environ.get("RANK", os.environ.get("PET_NODE_RANK", "0")))
    print(
        f"fake stage {stage}: attempt {attempt}, rank {rank}, {steps} steps of {step_seconds} s", flush=True
    )

    if rank != 0:  # a worker pod: only rank 0 writes the contract's files
        return 143 if terminated.wait(steps * step_seconds) else 0
    if is_current(read_done(args.run_dir, stage), config_id):
        print(f"fake stage {stage}: done.json is current, nothing to do", flush=True)
        return 0
    last = read_progress(args.run_dir, stage)
    start = last.step if last is not None and last.total_steps == steps else 0
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
            attempt=attempt,
            stopped=stopped,
        )

    for step in range(start + 1, steps + 1):
        if terminated.wait(step_seconds):
            write_progress(args.run_dir, progress(step - 1, stopped=PREEMPTED))
            print(f"fake stage {stage}: SIGTERM at step {step - 1}, progress saved", flush=True)
            return 143
        write_progress(args.run_dir, progress(step))
        print(f"fake stage {stage}: step {step}/{steps}", flush=True)
    if attempt in fail_attempts:
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
