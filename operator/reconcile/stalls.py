"""What the operator says about a stalled stage: the evidence its ranks' heartbeats give, in the words
of the Stalled condition, the StageStalled event and the stage's record (status.stages[].lastStall).

    message = describe(stall, "pretrain", attempt=1, now=time.time(), run_dir="s3://b/runs/r")

The rule that decides a stall is pipeline/liveness.py's `find_stall`, beside the heartbeats it reads.
"""

from __future__ import annotations

from nanorun.pipeline.liveness import Heartbeat, Stall, stalls_dir
from nanorun.pipeline.trainer_status import rfc3339

MAX_RANKS_NAMED = 8  # a condition message stays readable on a thousand ranks


def _rank(b: Heartbeat, now: float, stuck: bool) -> str:
    said = (
        f"rank {b.rank}{' (stuck)' if stuck else ''}: last heartbeat {rfc3339(b.beat_at)} "
        f"({now - b.beat_at:.0f} s ago), last progress {rfc3339(b.progressed_at)} "
        f"({now - b.progressed_at:.0f} s ago), {b.phase} at step {b.step}"
    )
    if b.pod:
        said += f", pod {b.pod}"
    if b.stacks:
        said += f", stacks {b.stacks}"
    return said


def describe(stall: Stall, stage: str, attempt: int, now: float, run_dir: str) -> str:
    """`stage <s> stalled at step N (attempt A, timeout T s)`, then each rank, the stuck ones first:
    when it last beat and progressed, its phase, pod and stack dump."""
    stuck = {b.rank for b in stall.stuck}
    ranks = sorted(stall.beats, key=lambda b: (b.rank not in stuck, b.rank))
    named = [_rank(b, now, b.rank in stuck) for b in ranks[:MAX_RANKS_NAMED]]
    if len(ranks) > MAX_RANKS_NAMED:
        named.append(f"{len(ranks) - MAX_RANKS_NAMED} more ranks")
    said = (
        f"stage {stage} stalled at step {stall.step} (attempt {attempt}, no progress within "
        f"{stall.timeout:.0f} s); " + "; ".join(named)
    )
    if any(b.stacks for b in stall.beats):
        said += f"; every rank's stacks: {stalls_dir(run_dir, stage, attempt)}"
    return said
