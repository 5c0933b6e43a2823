"""Everything the trainer does across processes, in one place: the process group, which rank this
is, sums and means across ranks, and the gradient norm a training step logs.

A stage runs as one plain process, or as one process per device under torchrun (or a PyTorchJob,
which injects the same variables). Every helper here works in both cases: without a process group
a sum or mean across ranks is the value itself, so no caller needs an `if distributed` branch.

Hung collectives end: the process group's timeout is NANORUN_COLLECTIVE_TIMEOUT_SECONDS (default 30
minutes: a checkpoint upload, or a storage outage one rank waits out while the others sit in a
barrier, fits in it), for gloo and NCCL alike. A gloo collective that a peer never joins raises
after it. For NCCL, `nccl_environment` sets what PyTorch reads at init
(https://docs.pytorch.org/docs/stable/torch_nccl_environment_variables.html), each only where the
user has not set it: the watchdog tears the process down on a timeout (async error handling), its
heartbeat monitor aborts a watchdog that itself hangs, and the flight recorder keeps the last
collectives and dumps them on a timeout into this process's liveness scratch directory, from where
the heartbeat thread (liveness.py) copies the trace into `<run>/<stage>/stalls/attempt-N/`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from nanorun.pipeline.liveness import collective_timeout_seconds

FLIGHT_RECORDER_ENTRIES = 2000  # collectives (start and end events) the recorder keeps per process group
HEARTBEAT_MONITOR_SECONDS = 480  # PyTorch's own default: a watchdog stuck this long aborts the process


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def nccl_environment(
    timeout_seconds: float, trace_prefix: Path, environ: Mapping[str, str]
) -> dict[str, str]:
    """The NCCL settings to add to `environ` (those it does not set already) so that a collective
    hung for `timeout_seconds` aborts the process with the flight recorder's trace written to
    `<trace_prefix><rank>` (torch appends the rank)."""
    wanted = {
        # 3: on a timeout or error the watchdog tears the process down without aborting the
        # communicators first (an abort can hang too); the pod exits and the executor retries
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(int(min(timeout_seconds, HEARTBEAT_MONITOR_SECONDS))),
        "TORCH_NCCL_TRACE_BUFFER_SIZE": str(FLIGHT_RECORDER_ENTRIES),
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    }
    # the trace's path: TORCH_FR_DUMP_TEMP_FILE, read by PyTorch releases before it by its older name
    trace_names = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
    if not any(environ.get(name) for name in trace_names):
        wanted.update(dict.fromkeys(trace_names, str(trace_prefix)))
    return {k: v for k, v in wanted.items() if not environ.get(k)}


def process_group_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=collective_timeout_seconds())


def init_process_group(device: torch.device, rank: int, world_size: int, trace_prefix: Path) -> None:
    """Join the default process group: NCCL on CUDA (bound to this process's device, configured by
    `nccl_environment`), gloo on CPU; both with the collective timeout."""
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        os.environ.update(nccl_environment(collective_timeout_seconds(), trace_prefix, os.environ))
        kwargs["device_id"] = device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, timeout=process_group_timeout(), **kwargs
    )


def destroy_process_group() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def sum_across_ranks(values: list[float], device: Any) -> list[float]:
    """Each of `values` summed over all ranks (in float64, so counts stay exact)."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def mean_across_ranks(value: float, device: Any) -> float:
    """`value` averaged over all ranks: what a step logs as its loss, the same on every rank."""
    if not is_distributed():
        return value
    (total,) = sum_across_ranks([value], device)
    return total / dist.get_world_size()


def any_rank(flag: bool, device: Any) -> bool:
    """True on every rank when `flag` is true on any rank (e.g. SIGTERM reached one pod)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sum_tensors_across_ranks(*tensors: torch.Tensor) -> None:
    """Sum each tensor over all ranks, in place (evaluation totals kept on the device)."""
    if is_distributed():
        for t in tensors:
            dist.all_reduce(t)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (any picklable value), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, obj)
    return every


def grad_norm(model: torch.nn.Module) -> float:
    """The L2 norm of this rank's gradients (before the optimizer averages them across ranks)."""
    norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0
