"""FP8 training matmuls for the block linears (tensorwise scaling), for H100-class GPUs.

`enable_fp8(model)` switches every eligible block linear (both dims divisible by 16 and at least
`min_dim`) to `Float8Linear` in place; `disable_fp8(model)` switches them back, and `bf16_matmuls(model)`
does so for the length of a `with` block (evaluation and sampling run in bf16, training goes on in
FP8). Weights, parameter identity and state-dict keys do not change, so the
optimizer and checkpoints are unaffected. The LM head and embeddings stay in bf16/fp32: logits are
the most precision-sensitive matmul and embeddings are lookups.

Recipe (as in torchao's default "tensorwise" recipe): per call, each operand is scaled so its
largest magnitude lands on the format's maximum, cast to float8 (e4m3 for activations and weights,
e5m2 for gradients, which need range more than precision), multiplied with `torch._scaled_mm`
(fp32 accumulation), and the result un-scaled to bf16. Master weights stay fp32.

On devices without FP8 tensor cores (CPU, pre-Hopper) the same quantisation is emulated with a
dequantise-then-matmul, which is how the CPU tests check the numerics; it is not faster there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from nanorun.trainer.model.gpt import GPT, Linear

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def native_fp8(device: torch.device) -> bool:
    """True when `device` has FP8 tensor cores (compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensorwise quantisation: returns (x scaled and cast to `dtype`, the inverse scale as fp32)."""
    amax = x.detach().abs().amax().float().clamp_min(1e-12)
    scale = torch.finfo(dtype).max / amax
    x8 = (x.float() * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    return x8, scale.reciprocal()


def scaled_matmul(
    a8: torch.Tensor,
    a_inv: torch.Tensor,
    b8: torch.Tensor,
    b_inv: torch.Tensor,
    out_dtype: torch.dtype,
    fast_accum: bool,
) -> torch.Tensor:
    """(a8 * a_inv) @ (b8 * b_inv): a (M, K) row-major, b (K, N); FP8 tensor cores when present."""
    if native_fp8(a8.device):
        b_col_major = b8.t().contiguous().t()  # the kernel wants its second operand column-major
        return torch._scaled_mm(
            a8.contiguous(),
            b_col_major,
            scale_a=a_inv,
            scale_b=b_inv,
            out_dtype=out_dtype,
            use_fast_accum=fast_accum,
        )
    return ((a8.float() * a_inv) @ (b8.float() * b_inv)).to(out_dtype)


class _Float8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.size(-1))
        x8, x_inv = quantize(x2d, E4M3)
        w8, w_inv = quantize(weight, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.shapes = (x.shape, x.dtype, weight.dtype)
        out = scaled_matmul(x8, x_inv, w8.t(), w_inv, x.dtype, fast_accum=True)
        return out.reshape(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        x_shape, x_dtype, w_dtype = ctx.shapes
        g8, g_inv = quantize(grad_out.reshape(-1, grad_out.size(-1)), E5M2)
        grad_x = scaled_matmul(g8, g_inv, w8, w_inv, x_dtype, fast_accum=False)
        grad_w = scaled_matmul(g8.t(), g_inv, x8, x_inv, torch.float32, fast_accum=False)
        return grad_x.reshape(x_shape), grad_w.to(w_dtype)


class Float8Linear(Linear):
    """A bias-free Linear whose matmuls (forward and both backward ones) run in FP8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float8Matmul.apply(x, self.weight)


def _eligible(module: torch.nn.Module, min_dim: int) -> bool:
    if type(module) not in (Linear, Float8Linear):
        return False
    out_features, in_features = module.weight.shape
    return all(d % 16 == 0 and d >= min_dim for d in (out_features, in_features))


def enable_fp8(model: GPT, min_dim: int = 128) -> int:
    """Switch the model's eligible block linears to FP8 in place; returns how many were switched."""
    switched = 0
    for module in model.blocks.modules():
        if _eligible(module, min_dim):
            module.__class__ = Float8Linear
            switched += 1
    return switched


def disable_fp8(model: GPT) -> None:
    """Switch every Float8Linear back to a plain (bf16 on GPUs) Linear."""
    for module in model.modules():
        if type(module) is Float8Linear:
            module.__class__ = Linear


@contextmanager
def bf16_matmuls(model: torch.nn.Module) -> Iterator[None]:
    """FP8 off inside the block: its Float8Linears run plain matmuls, then switch back. Evaluation
    and sampling use the eager model, so the compiled training graph never sees the change (its
    guards see the same classes when training resumes, and nothing recompiles)."""
    switched = [m for m in model.modules() if type(m) is Float8Linear]
    for module in switched:
        module.__class__ = Linear
    try:
        yield
    finally:
        for module in switched:
            module.__class__ = Float8Linear
