"""Everything the trainer does across processes, in one place: the process group, which rank this
is, sums and means across ranks, and the gradient norm a training step logs.

A stage runs as one plain process, or as one process per device under torchrun (or a PyTorchJob,
which injects the same variables). Every helper here works in both cases: without a process group
a sum or mean across ranks is the value itself, so no caller needs an `if distributed` branch.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)  # a slow checkpoint upload must not time out


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_process_group(device: torch.device, rank: int, world_size: int) -> None:
    """Join the default process group: NCCL on CUDA (bound to this process's device), gloo on CPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, timeout=PROCESS_GROUP_TIMEOUT, **kwargs
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
