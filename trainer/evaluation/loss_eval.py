"""Bits per byte: the validation number that compares models with different tokenizers.

    bpb = sum of the loss in nats over target tokens / (ln 2 * sum of their UTF-8 byte lengths)

Special tokens (byte length 0) and ignored targets (-1) count neither nats nor bytes, so the number
does not depend on how many BOS tokens a batch happens to hold. Summed over every rank when a
process group is up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from nanorun.trainer.training import liveness
from nanorun.trainer.training.distributed import sum_tensors_across_ranks


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    token_bytes: torch.Tensor | Sequence[int],
    clock: Any = None,
) -> float:
    """Bits per byte of `model` over `steps` (inputs, targets) batches; inf when no byte was scored.

    `model` may be the torch.compile'd module; `clock` (a training.compilation.CompileClock) then
    gets the first batch's time, when the evaluation graph compiles."""
    device = next(model.parameters()).device
    token_bytes = torch.as_tensor(token_bytes, dtype=torch.float64, device=device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=device)
    batch_iter = iter(batches)
    for i in range(steps):
        liveness.progressed()  # an evaluation batch, for this rank's heartbeat
        x, y = next(batch_iter)
        x, y = x.to(device), y.to(device)
        t0 = time.time()
        nats = model(x, y, loss_reduction="none").reshape(-1)  # per-token loss in nats (0 where y == -1)
        if i == 0 and clock is not None:
            clock.eval_batch_seconds(time.time() - t0)
        targets = y.reshape(-1)
        valid = targets >= 0
        nbytes = torch.where(
            valid, token_bytes[targets.clamp(min=0)], torch.zeros_like(nats, dtype=torch.float64)
        )
        total_nats += (nats.double() * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    sum_tensors_across_ranks(total_nats, total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
