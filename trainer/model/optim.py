"""MuonAdamW: one optimizer running Muon on block matrices and AdamW on everything else.

- Muon (https://kellerjordan.github.io/posts/muon/): Nesterov momentum, then the update is replaced
  by (approximately) the nearest semi-orthogonal matrix, computed with Polar Express iterations
  (https://arxiv.org/abs/2505.16932) in bf16 on GPUs; NorMuon per-neuron second-moment
  normalisation (https://arxiv.org/abs/2510.05491); step scaled by sqrt(max(1, rows/cols));
  cautious weight decay (decay only where update and weight agree in sign).
- AdamW for embeddings, the LM head and scalars, math in fp32, decoupled weight decay.
- Distributed without a DDP wrapper: when torch.distributed is initialised with world > 1, `step()`
  reduce-scatters the gradients, updates only this rank's shard with this rank's optimizer state,
  and all-gathers the parameters (ZeRO-2). AdamW tensors are sharded along dim 0 (small or
  indivisible ones are all-reduced and updated everywhere); Muon groups are sharded by matrix.
  One process and N processes with the same global batch take the same step.
- `sharded_state_dict()` / `load_sharded_state_dict()` expose the state keyed by parameter name,
  as DTensors sharded over a 1-D device mesh, so torch.distributed.checkpoint can save it at one
  world size and load it at another.
- Schedules: `lr_multiplier` (warmup, constant, linear warmdown) and `muon_momentum` (warmup).

Param groups are dicts with `kind` ("adamw" or "muon"), `params`, `names` (parameter names, used as
state keys), `lr`, and per kind: adamw `betas`, `eps`, `weight_decay`; muon `momentum`, `beta2`,
`ns_steps`, `weight_decay` (all params of a Muon group share one 2-D shape). `initial_lr` is filled
in from `lr` so a schedule can set `group["lr"] = group["initial_lr"] * lr_multiplier(...)`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

# Polar Express coefficients (a, b, c) for 5 iterations of X <- aX + (b A + c A^2) X, A = X X^T
# (safety factor 2e-2, cushion 2), from the Polar Express paper.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# AdamW tensors smaller than this are all-reduced rather than sharded: not worth the bookkeeping.
MIN_SHARDED_NUMEL = 1024


def orthogonalize(G: Tensor, steps: int = 5) -> Tensor:
    """Approximate the orthogonal polar factor U V^T of each matrix in G (..., m, n).

    Runs in bf16 on CUDA (the iteration is stable there and tensor cores make it cheap), fp32 elsewhere.
    """
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"Polar Express supports 1..{len(POLAR_EXPRESS_COEFFS)} steps, got {steps}")
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    # Scale so every singular value is <= 1, where the iteration converges.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return (X.mT if tall else X).to(G.dtype)


def muon_update(
    params: Tensor,
    grads: Tensor,
    momentum_buf: Tensor,
    second_moment: Tensor,
    *,
    lr: float,
    momentum: float,
    beta2: float,
    weight_decay: float,
    ns_steps: int,
) -> None:
    """One Muon step, in place, on a stack of same-shape matrices params/grads (K, m, n)."""
    momentum_buf.lerp_(grads, 1 - momentum)
    update = orthogonalize(grads.lerp(momentum_buf, momentum), ns_steps).float()  # Nesterov
    # NorMuon: divide each output row (or input column, for wide matrices) by the running RMS of its
    # update, then restore the update's overall Frobenius norm.
    m, n = update.shape[-2:]
    reduce_dim = -1 if m >= n else -2
    mean_sq = update.square().mean(dim=reduce_dim, keepdim=True)
    second_moment.lerp_(mean_sq, 1 - beta2)
    normalized = update * second_moment.clamp_min(1e-10).rsqrt()
    norm_before = update.norm(dim=(-2, -1), keepdim=True)
    norm_after = normalized.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
    update = normalized * (norm_before / norm_after)
    step = lr * math.sqrt(max(1.0, m / n))
    agree = (update * params) >= 0  # cautious weight decay
    params.sub_(step * update + step * weight_decay * params * agree)


def adamw_update(
    p: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step, in place, in fp32."""
    beta1, beta2 = betas
    grad = grad.float()
    p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


class MuonAdamW(torch.optim.Optimizer):
    """Muon + AdamW in one optimizer, single-process or ZeRO-2 sharded across ranks."""

    def __init__(self, param_groups: list[dict]) -> None:
        for gi, group in enumerate(param_groups):
            kind = group.get("kind")
            if kind not in ("adamw", "muon"):
                raise ValueError(f"param group {gi}: kind must be 'adamw' or 'muon', not {kind!r}")
            params = list(group["params"])
            names = list(group.get("names") or [f"group{gi}.param{i}" for i in range(len(params))])
            if len(names) != len(params):
                raise ValueError(f"param group {gi}: {len(names)} names for {len(params)} params")
            if (
                kind == "muon"
                and len({tuple(p.shape) for p in params}) > 1
                or any(kind == "muon" and p.ndim != 2 for p in params)
            ):
                raise ValueError(f"param group {gi}: a Muon group needs 2-D params of one shape")
            group["params"], group["names"] = params, names
            group.setdefault("initial_lr", group["lr"])
        super().__init__(param_groups, defaults={})
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.steps_taken = 0
        self._muon_state: dict[int, dict[str, Tensor]] = {}
        self._mesh = None

    # ---- layout: which part of which tensor this rank owns ------------------------------------

    def _sharded(self, p: Tensor) -> bool:
        """AdamW tensors are sharded along dim 0 when large enough and divisible by the world size."""
        return self.distributed and p.numel() >= MIN_SHARDED_NUMEL and p.size(0) % self.world == 0

    def _rows(self, p: Tensor) -> slice:
        rows = p.size(0) // self.world
        return slice(self.rank * rows, (self.rank + 1) * rows)

    def _muon_chunk(self, group: dict) -> int:
        """Matrices per rank in a Muon group (the stack is padded with zeros to chunk * world)."""
        return math.ceil(len(group["params"]) / self.world)

    def _owned(self, group: dict) -> range:
        chunk = self._muon_chunk(group)
        return range(self.rank * chunk, min((self.rank + 1) * chunk, len(group["params"])))

    def _adamw_state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            shard = p[self._rows(p)] if self._sharded(p) else p
            state["exp_avg"] = torch.zeros_like(shard, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(shard, dtype=torch.float32)
        return state

    def _muon_buffers(self, gi: int) -> dict[str, Tensor]:
        if gi not in self._muon_state:
            group = self.param_groups[gi]
            p = group["params"][0]
            m, n = p.shape
            chunk = self._muon_chunk(group)
            # The second moment is factored: one value per output row (tall) or input column (wide).
            second_shape = (chunk, m, 1) if m >= n else (chunk, 1, n)
            self._muon_state[gi] = {
                "momentum": torch.zeros(chunk, m, n, device=p.device, dtype=torch.float32),
                "second_moment": torch.zeros(second_shape, device=p.device, dtype=torch.float32),
            }
        return self._muon_state[gi]

    # ---- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """Apply one update from whatever `.grad` holds (averaged over ranks when distributed)."""
        if closure is not None:
            raise ValueError("MuonAdamW does not support closures")
        self.steps_taken += 1
        # Phase 1: start every gradient reduction so communication overlaps with the updates.
        reductions = [self._start_reduce(gi, group) for gi, group in enumerate(self.param_groups)]
        # Phase 2: as each reduction lands, update the local shard and start its all-gather.
        gathers = [
            self._update(gi, group, reduced)
            for gi, (group, reduced) in enumerate(zip(self.param_groups, reductions, strict=True))
        ]
        # Phase 3: wait for the gathers and write the full parameters back.
        for finish in gathers:
            finish()

    def _grad(self, p: Tensor) -> Tensor:
        return p.grad if p.grad is not None else torch.zeros_like(p)

    def _start_reduce(self, gi: int, group: dict) -> list:
        """Returns, per tensor (AdamW) or for the stack (Muon), (work handle or None, reduced grad)."""
        if group["kind"] == "adamw":
            out = []
            for p in group["params"]:
                if not self.distributed:
                    out.append((None, p.grad))
                elif self._sharded(p):
                    shard = torch.empty_like(p[self._rows(p)])
                    work = dist.reduce_scatter_tensor(shard, self._grad(p).contiguous(), async_op=True)
                    out.append((work, shard))
                else:
                    grad = self._grad(p).clone()
                    out.append((dist.all_reduce(grad, async_op=True), grad))
            return out
        params = group["params"]
        chunk = self._muon_chunk(group)
        stacked = torch.zeros(
            chunk * self.world, *params[0].shape, device=params[0].device, dtype=params[0].dtype
        )
        for i, p in enumerate(params):
            stacked[i].copy_(self._grad(p))
        if not self.distributed:
            return [(None, stacked)]
        local = torch.empty_like(stacked[:chunk])
        return [(dist.reduce_scatter_tensor(local, stacked, async_op=True), local)]

    def _update(self, gi: int, group: dict, reduced: list):
        """Update this rank's part of the group; returns a callable that finishes the all-gather."""
        if group["kind"] == "adamw":
            pending = []
            for p, (work, grad) in zip(group["params"], reduced, strict=True):
                if work is not None:
                    work.wait()
                    grad.div_(self.world)
                if grad is None:
                    continue
                state = self._adamw_state(p)
                sharded = self._sharded(p)
                target = p[self._rows(p)] if sharded else p
                adamw_update(
                    target,
                    grad,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    step=self.steps_taken,
                    lr=group["lr"],
                    betas=group["betas"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )
                if sharded:
                    pending.append(dist.all_gather_into_tensor(p, target.clone(), async_op=True))
            return lambda: [work.wait() for work in pending]

        ((work, grads),) = reduced
        if work is not None:
            work.wait()
            grads.div_(self.world)
        params = group["params"]
        chunk = self._muon_chunk(group)
        owned = self._owned(group)
        local = torch.zeros_like(grads)  # this rank's matrices, zero padding past the last one
        for j, i in enumerate(owned):
            local[j].copy_(params[i])
        buffers = self._muon_buffers(gi)
        muon_update(
            local,
            grads,
            buffers["momentum"],
            buffers["second_moment"],
            lr=group["lr"],
            momentum=group["momentum"],
            beta2=group["beta2"],
            weight_decay=group["weight_decay"],
            ns_steps=group["ns_steps"],
        )
        if not self.distributed:
            return lambda: torch._foreach_copy_(params, list(local[: len(params)].unbind(0)))
        gathered = torch.empty(chunk * self.world, *local.shape[1:], device=local.device, dtype=local.dtype)
        work = dist.all_gather_into_tensor(gathered, local, async_op=True)

        def finish() -> None:
            work.wait()
            torch._foreach_copy_(params, list(gathered[: len(params)].unbind(0)))

        return finish

    # ---- state for torch.distributed.checkpoint -------------------------------------------------

    def _device_mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            device = self.param_groups[0]["params"][0].device
            self._mesh = init_device_mesh(device.type, (self.world,))
        return self._mesh

    def _as_global(self, local: Tensor, p: Tensor) -> Tensor:
        """Wrap a dim-0 shard of p's state as a DTensor describing the whole tensor."""
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(
            local, self._device_mesh(), [Shard(0)], run_check=False, shape=p.shape, stride=p.stride()
        )

    def sharded_state_dict(self) -> dict:
        """{"steps_taken": int, "state": {param name: {buffer: tensor}}}, keyed to survive re-sharding.

        Sharded AdamW buffers are DTensors (Shard(0) over a 1-D mesh); every other entry is a plain
        tensor present only on the rank that owns it (replicated ones on every rank). Pass this dict to
        torch.distributed.checkpoint.save, or load into it and hand it to load_sharded_state_dict.
        The tensors share storage with the live state; a fresh optimizer's dict is the load template:

            sd = optimizer.sharded_state_dict()
            torch.distributed.checkpoint.load(sd, checkpoint_id=path)
            optimizer.load_sharded_state_dict(sd)
        """
        state: dict[str, dict[str, Tensor]] = {}
        for gi, group in enumerate(self.param_groups):
            if group["kind"] == "adamw":
                for name, p in zip(group["names"], group["params"], strict=True):
                    buffers = self._adamw_state(p)
                    state[name] = {
                        k: self._as_global(t, p) if self._sharded(p) else t for k, t in buffers.items()
                    }
            else:
                buffers = self._muon_buffers(gi)
                for j, i in enumerate(self._owned(group)):
                    state[group["names"][i]] = {k: t[j] for k, t in buffers.items()}
        return {"steps_taken": self.steps_taken, "state": state}

    def load_sharded_state_dict(self, sd: dict) -> None:
        """Restore from a dict shaped like sharded_state_dict() (e.g. filled by dcp.load)."""
        expected = self.sharded_state_dict()
        missing = sorted(set(expected["state"]) - set(sd.get("state", {})))
        if missing or "steps_taken" not in sd:
            raise KeyError(
                f"optimizer state is missing entries for {missing or ['steps_taken']}; "
                "was it saved for a different model?"
            )
        for name, buffers in expected["state"].items():
            for key, target in buffers.items():
                source = sd["state"][name][key]
                source = source.to_local() if hasattr(source, "to_local") else source
                target = target.to_local() if hasattr(target, "to_local") else target
                if source.shape != target.shape:
                    raise ValueError(
                        f"optimizer state {name}.{key}: saved shape {tuple(source.shape)} "
                        f"does not match {tuple(target.shape)}"
                    )
                target.copy_(source)
        self.steps_taken = int(sd["steps_taken"])

    def state_dict(self) -> dict:
        raise NotImplementedError(
            "MuonAdamW state is sharded: use sharded_state_dict() with torch.distributed.checkpoint"
        )

    def load_state_dict(self, state_dict: dict) -> None:
        raise NotImplementedError("MuonAdamW state is sharded: use load_sharded_state_dict()")


def lr_multiplier(
    step: int, total_steps: int, warmup_steps: int, warmdown_ratio: float, final_lr_frac: float
) -> float:
    """LR factor at `step` (0-based): linear warmup, constant, then linear warmdown to final_lr_frac."""
    if total_steps < 1 or warmup_steps < 0 or not 0.0 <= warmdown_ratio <= 1.0:
        raise ValueError(
            f"bad schedule: total_steps={total_steps}, warmup_steps={warmup_steps}, "
            f"warmdown_ratio={warmdown_ratio}"
        )
    warmdown_steps = round(warmdown_ratio * total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if warmdown_steps == 0 or step <= total_steps - warmdown_steps:
        return 1.0
    remaining = max(0.0, (total_steps - step) / warmdown_steps)  # 1 -> 0 across the warmdown
    return remaining + (1 - remaining) * final_lr_frac


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon momentum: linear from `start` to `end` over the first `warmup_steps`, then constant."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end
