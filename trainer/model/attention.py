"""Causal self-attention kernels: Flash Attention 3 when it is installed, PyTorch SDPA otherwise.

Two entry points, both taking (B, T, H, D) tensors, grouped-query attention included (fewer key/value
heads than query heads):

- `causal_attention(q, k, v, window, scale)`: training and plain forward passes.
- `cached_attention(q, k, v, k_cache, v_cache, cache_seqlens, window, scale)`: incremental decoding;
  writes the new keys/values of row b at positions cache_seqlens[b]... and attends over that row's
  own prefix only, so rows of one batch may hold sequences of different lengths.
- `attention_weights(q, k, window, scale)`: the probabilities themselves, computed explicitly, for
  inspection only (the explainer pages); the fused kernels above never materialise them.

`window` is the number of earlier tokens a query may see besides itself (FA3's left window);
-1 means unlimited. FA3 implements windows natively; under SDPA a boolean band mask does the same
job, so a sliding-window pattern such as `SSSL` is exact on CPU too, just without the speed-up.

Flash Attention 3 is picked up from the `flash_attn_interface` module (the package built from the
`hopper/` folder of Dao-AILab/flash-attention) on Hopper GPUs; `NANORUN_ATTENTION=sdpa` forces SDPA.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # Flash Attention 3 is an optional, Hopper-only dependency.
    import flash_attn_interface as _fa3
except ImportError:  # pragma: no cover - depends on the machine
    _fa3 = None


SDPA_FORCED = os.environ.get("NANORUN_ATTENTION") == "sdpa"  # read once, never inside a compiled forward


@torch.compiler.assume_constant_result  # a compiled forward asks once per device, at trace time
def fa3_available(device: torch.device) -> bool:
    """True when Flash Attention 3 can run on `device` (installed, Hopper GPU, not disabled)."""
    if _fa3 is None or device.type != "cuda" or SDPA_FORCED:
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def backend_name(device: torch.device) -> str:
    """Which kernel attention uses on `device`: "fa3" or "sdpa"."""
    return "fa3" if fa3_available(device) else "sdpa"


def _use_fa3(q: torch.Tensor) -> bool:
    # FA3 runs in half precision only; fp32 inputs (CPU-style runs on a GPU) go to SDPA.
    return q.dtype in (torch.bfloat16, torch.float16) and fa3_available(q.device)


def _first(out: torch.Tensor | tuple) -> torch.Tensor:
    # Some FA3 releases return (out, softmax_lse), others just out.
    return out[0] if isinstance(out, tuple) else out


def band_mask(q_pos: torch.Tensor, k_len: int, window: int) -> torch.Tensor:
    """Boolean mask (..., Tq, Tk): key j is visible from a query at position p iff p - window <= j <= p.

    `q_pos` holds the absolute position of every query, shape (..., Tq); keys sit at 0..k_len-1.
    """
    k_pos = torch.arange(k_len, device=q_pos.device)
    rel = q_pos.unsqueeze(-1) - k_pos  # how far back each key lies from each query
    visible = rel >= 0
    if window >= 0:
        visible = visible & (rel <= window)
    return visible


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    # SDPA wants heads before time: (B, H, T, D).
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=k.size(1) != q.size(1)
    )
    return y.transpose(1, 2)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float
) -> torch.Tensor:
    """Causal attention over one sequence per row. q (B,T,H,D), k/v (B,T,H_kv,D) -> (B,T,H,D)."""
    T = q.size(1)
    if _use_fa3(q):
        return _first(
            _fa3.flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=(window, 0))
        )
    if window < 0 or window >= T - 1:  # the window covers the whole sequence: plain causal
        return _sdpa(q, k, v, None, True, scale)
    mask = band_mask(torch.arange(T, device=q.device), T, window)
    return _sdpa(q, k, v, mask, False, scale)


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Attention for incremental decoding with a per-row KV cache (one layer).

    q (B,T,H,D) and k/v (B,T,H_kv,D) are the new tokens, already rotated; k_cache/v_cache are this
    layer's (B, T_max, H_kv, D) cache tensors, updated in place; cache_seqlens (B,) int32 is how
    many tokens each row already holds (not advanced here: the model does that after the last layer).
    """
    B, T = q.shape[:2]
    if _use_fa3(q) and k_cache.dtype == q.dtype:
        return _first(
            _fa3.flash_attn_with_kvcache(
                q,
                k_cache,
                v_cache,
                k=k,
                v=v,
                cache_seqlens=cache_seqlens,
                softmax_scale=scale,
                causal=True,
                window_size=(window, 0),
            )
        )
    positions = cache_seqlens.long().unsqueeze(1) + torch.arange(T, device=q.device)  # (B, T)
    rows = torch.arange(B, device=q.device).unsqueeze(1)
    k_cache[rows, positions] = k.to(k_cache.dtype)
    v_cache[rows, positions] = v.to(v_cache.dtype)
    k_len = int(positions.max()) + 1  # only the filled part of the cache takes part
    mask = band_mask(positions, k_len, window).unsqueeze(1)  # (B, 1, T, Tk), broadcast over heads
    keys = k_cache[:, :k_len].to(q.dtype)
    values = v_cache[:, :k_len].to(q.dtype)
    return _sdpa(q, keys, values, mask, False, scale)


def attention_weights(q: torch.Tensor, k: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """The attention probabilities (B, H, T, T) that `causal_attention` applies, computed explicitly.

    q (B,T,H,D), k (B,T,H_kv,D). Query head h reads key head h // (H / H_kv), as SDPA's GQA does.
    Masked entries (the future, and keys beyond a sliding window) are exactly 0; each row sums to 1.
    Eval-only: it materialises T x T scores in fp32, which training never needs.
    """
    T, group = q.size(1), q.size(2) // k.size(2)
    k = k.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    visible = band_mask(torch.arange(T, device=q.device), T, window)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
