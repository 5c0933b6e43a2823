"""The GPT model: a small, modern decoder-only transformer sized by one knob, `depth`.

Notable features (each documented, with measurements, in docs/model.md):
- rotary position embeddings (base 100k), no learned positions
- QK-norm (queries and keys RMS-normalised per head, then sharpened by a fixed 1.2 each)
- parameter-free RMSNorm everywhere, including right after the token embedding
- ReLU² MLP, 4x wide; no biases anywhere
- untied token embedding and LM head; vocabulary padded to a multiple of 64
- grouped-query attention (`n_kv_head` <= `n_head`)
- logit softcap: 15 * tanh(logits / 15), in fp32
- per-layer learnable residual and input-skip scalars (x <- a_i * x + b_i * x0 before block i)
- value embeddings (ResFormer) on alternating layers, gated per head   [flag: value_embeds]
- sliding-window attention pattern such as "SSSL"; the last layer always full  [flag: window_pattern]
- Flash Attention 3 when installed, SDPA otherwise (see attention.py)
- zero-initialised output projections; fp32 master weights, bf16 matmuls on CUDA, fp32 on CPU
- an optional per-row KV cache for incremental decoding (KVCache below)

Build it from depth and initialise (`build_model`: on the meta device first, then on the device):

    config = GPTConfig.from_depth(20, vocab_size=32768, sequence_len=2048)
    model = build_model(config, "cuda")
    loss = model(idx, targets)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from nanorun.trainer.model.attention import attention_weights, cached_attention, causal_attention

# Queries and keys leave QK-norm with unit RMS; a fixed gain sharpens attention a little (nanochat).
QK_GAIN = 1.2
# How many leading channels of the residual stream feed the value-embedding gate.
VE_GATE_CHANNELS = 12
# Rotary tables cover this many times the training length, so inference may run past it.
ROTARY_HEADROOM = 10


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (grouped-query attention when < n_head)
    n_embd: int = 768
    window_pattern: str = "L"  # per-layer S(hort)/L(ong) pattern, tiled over depth; last layer always L
    short_window: int = 0  # tokens an S layer sees behind the query; 0 = auto (see short_window_tokens)
    value_embeds: bool = True  # ResFormer value embeddings on alternating layers, including the last
    softcap: float = 15.0  # logits = softcap * tanh(logits / softcap); 0 disables
    rope_base: float = 100_000.0

    def __post_init__(self) -> None:
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        elif (self.n_embd // self.n_head) % 2:
            problems.append(f"head dim {self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            problems.append(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            problems.append(f"window_pattern={self.window_pattern!r} must be a non-empty string of S and L")
        if self.value_embeds and self.n_embd < VE_GATE_CHANNELS:
            problems.append(f"value embeddings need n_embd >= {VE_GATE_CHANNELS}")
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    @classmethod
    def from_depth(
        cls,
        depth: int,
        vocab_size: int,
        sequence_len: int,
        aspect_ratio: int = 64,
        head_dim: int = 128,
        n_kv_head: int | None = None,
        **flags,
    ) -> GPTConfig:
        """Size a model from its depth: width = depth * aspect_ratio rounded up to whole heads."""
        if depth < 1 or aspect_ratio < 1 or head_dim < 2:
            raise ValueError(
                f"depth ({depth}), aspect_ratio ({aspect_ratio}) and head_dim ({head_dim}) must be positive"
            )
        n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
        n_head = n_embd // head_dim
        return cls(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_head if n_kv_head is None else n_kv_head,
            n_embd=n_embd,
            **flags,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        # A multiple of 64 keeps the embedding and LM-head matmuls on fast tensor-core shapes.
        return math.ceil(self.vocab_size / 64) * 64

    @property
    def short_window_tokens(self) -> int:
        """Window of an S layer: explicit, or a quarter of the context rounded up to 128 tokens."""
        if self.short_window > 0:
            return self.short_window
        return min(self.sequence_len, math.ceil(self.sequence_len / 4 / 128) * 128)

    def layer_windows(self) -> list[int]:
        """Per-layer left window in tokens (-1 = unlimited). The last layer always sees everything."""
        pattern = self.window_pattern.upper()
        windows = [
            self.short_window_tokens if pattern[i % len(pattern)] == "S" else -1 for i in range(self.n_layer)
        ]
        windows[-1] = -1
        return windows

    def has_value_embed(self, layer: int) -> bool:
        # Alternate layers, always including the last one.
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2


def expected_param_counts(config: GPTConfig) -> dict[str, int]:
    """Parameter counts by group, computed from the config alone (no module needed)."""
    d, vocab, kv_dim = config.n_embd, config.padded_vocab_size, config.n_kv_head * config.head_dim
    n_ve = sum(config.has_value_embed(i) for i in range(config.n_layer))
    per_block = d * d + 2 * d * kv_dim + d * d + 2 * 4 * d * d  # q, k+v, attn out, MLP in+out
    counts = {
        "wte": vocab * d,
        "value_embeds": n_ve * vocab * kv_dim,
        "lm_head": vocab * d,
        "matrices": config.n_layer * per_block + n_ve * VE_GATE_CHANNELS * config.n_kv_head,
        "scalars": 2 * config.n_layer,
    }
    counts["total"] = sum(counts.values())
    return counts


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, T, H, D) by the angles in cos/sin (B|1, T, 1, D/2)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def rotary_tables(
    length: int, head_dim: int, base: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


class Linear(nn.Linear):
    """Bias-free linear layer whose fp32 master weight is cast to the activations' dtype (bf16 on CUDA)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, kv_dim = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = Linear(d, d)
        self.c_k = Linear(d, kv_dim)
        self.c_v = Linear(d, kv_dim)
        self.c_proj = Linear(d, d)
        self.ve_gate = Linear(VE_GATE_CHANNELS, config.n_kv_head) if config.has_value_embed(layer) else None

    def weights(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, window: int) -> torch.Tensor:
        """The attention probabilities (B, n_head, T, T) `forward` would apply to `x` (no KV cache).

        Eval-only, for inspection: the same queries and keys as `forward` (rotary, QK-norm, gain),
        scored explicitly by `attention_weights`; values and the output projection are skipped."""
        q, k, scale = self._queries_keys(x, cos, sin)
        return attention_weights(q, k, window, scale)

    def _queries_keys(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Queries and keys as attention scores them (rotary, then QK-norm), and the score scale."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        return q, k, QK_GAIN**2 / math.sqrt(self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        ve: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        window: int,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, scale = self._queries_keys(x, cos, sin)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # Mix the token's value embedding into v, with a per-head gate in (0, 2); 1 at init.
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        if kv_cache is None:
            y = causal_attention(q, k, v, window, scale)
        else:
            y = cached_attention(
                q, k, v, kv_cache.k[self.layer], kv_cache.v[self.layer], kv_cache.cache_seqlens, window, scale
            )
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        ve: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        window: int,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        x = x + self.attn(norm(x), ve, cos, sin, window, kv_cache)
        return x + self.mlp(norm(x))


class KVCache:
    """Keys and values of every layer for a batch of sequences, each row at its own length.

    k, v: (num_layers, B, T_max, H_kv, D); cache_seqlens: int32 (B,), tokens held per row. A forward
    pass with T new tokens writes them at cache_seqlens[b].. of row b and then advances every row by T.
    """

    def __init__(
        self,
        batch_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (num_layers, batch_size, max_seq_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)

    @classmethod
    def for_model(
        cls,
        config: GPTConfig,
        batch_size: int,
        max_seq_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> KVCache:
        return cls(batch_size, config.n_layer, config.n_kv_head, config.head_dim, max_seq_len, device, dtype)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_seq_len(self) -> int:
        return self.k.size(2)

    def row(self, i: int) -> KVCache:
        """A batch-1 view of row i sharing its storage: writes through the view land in this cache."""
        if not 0 <= i < self.batch_size:
            raise IndexError(f"row {i} out of range for a KV cache of batch size {self.batch_size}")
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, i : i + 1], self.v[:, i : i + 1]
        view.cache_seqlens = self.cache_seqlens[i : i + 1]
        return view

    def reset(self, rows: list[int] | None = None) -> None:
        """Empty all rows, or the given ones (old entries are masked out, not erased)."""
        if rows is None:
            self.cache_seqlens.zero_()
        else:
            self.cache_seqlens[torch.as_tensor(rows, dtype=torch.long, device=self.cache_seqlens.device)] = 0


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        vocab, d = config.padded_vocab_size, config.n_embd
        kv_dim = config.n_kv_head * config.head_dim
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(vocab, kv_dim) for i in range(config.n_layer) if config.has_value_embed(i)}
        )
        self.lm_head = Linear(d, vocab)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.windows = config.layer_windows()
        cos, sin = rotary_tables(config.sequence_len * ROTARY_HEADROOM, config.head_dim, config.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer in place (after `to_empty` when built on meta)."""
        d = self.config.n_embd
        bound = math.sqrt(3.0 / d)  # uniform with std 1/sqrt(d)
        self.wte.weight.normal_(0.0, 0.8)
        self.lm_head.weight.normal_(0.0, 0.001)
        for block in self.blocks:
            attn, mlp = block.attn, block.mlp
            for w in (attn.c_q.weight, attn.c_k.weight, attn.c_v.weight):
                w.uniform_(-bound, bound)
            mlp.c_fc.weight.uniform_(-0.4 * bound, 0.4 * bound)
            attn.c_proj.weight.zero_()  # every block starts as the identity
            mlp.c_proj.weight.zero_()
            if attn.ve_gate is not None:
                attn.ve_gate.weight.zero_()
        for ve in self.value_embeds.values():
            ve.weight.uniform_(-bound, bound)
        self.resid_lambdas.copy_(torch.linspace(1.15, 1.05, self.config.n_layer))
        self.x0_lambdas.copy_(torch.linspace(0.20, 0.05, self.config.n_layer))
        cos, sin = rotary_tables(
            self.cos.size(0), self.config.head_dim, self.config.rope_base, self.wte.weight.device
        )
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    @property
    def compute_dtype(self) -> torch.dtype:
        # Master weights stay fp32 for the optimizer; matmuls run in bf16 on GPUs, fp32 on CPU.
        return torch.bfloat16 if self.wte.weight.is_cuda else torch.float32

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        loss_reduction: str = "mean",
    ) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab) fp32, or the cross-entropy loss when targets are given."""
        B, T = idx.shape
        dtype = self.compute_dtype
        if kv_cache is None:
            if self.cos.size(0) < T:
                raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.cos.size(0)})")
            cos, sin = self.cos[None, :T, None], self.sin[None, :T, None]
        else:
            if kv_cache.batch_size != B:
                raise ValueError(f"KV cache holds {kv_cache.batch_size} rows but the batch has {B}")
            positions = kv_cache.cache_seqlens.long().unsqueeze(1) + torch.arange(T, device=idx.device)
            end = int(positions.max()) + 1
            if end > kv_cache.max_seq_len or end > self.cos.size(0):
                raise ValueError(
                    f"KV cache overflow: a row would reach {end} tokens, the cache holds "
                    f"{kv_cache.max_seq_len} and rotary covers {self.cos.size(0)}"
                )
            cos, sin = self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)
        cos, sin = cos.to(dtype), sin.to(dtype)

        x = norm(self.wte(idx).to(dtype))
        x0 = x
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i].to(dtype) * x + self.x0_lambdas[i].to(dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i], kv_cache)
        if kv_cache is not None:
            kv_cache.cache_seqlens += T
        logits = self.lm_head(norm(x))[..., : self.config.vocab_size].float()
        if self.config.softcap > 0:
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        if targets is None:
            return logits
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', not {loss_reduction!r}")
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )
        return loss.view(B, T) if loss_reduction == "none" else loss

    @torch.no_grad()
    def attention_map(self, idx: torch.Tensor, layer: int) -> torch.Tensor:
        """Attention probabilities (B, n_head, T, T) of block `layer` for `idx` (B, T), fp32.

        For explaining a trained model (the serving app's /api/attention): runs the blocks before
        `layer` exactly as `forward` does, then scores that block's queries against its keys
        explicitly. Causal; zero beyond the block's sliding window. Costs O(T^2) memory per head,
        so keep T small; the training path never calls it."""
        if not 0 <= layer < self.config.n_layer:
            raise IndexError(f"layer {layer} out of range: the model has {self.config.n_layer} layers")
        T = idx.size(1)
        if self.cos.size(0) < T:
            raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.cos.size(0)})")
        dtype = self.compute_dtype
        cos, sin = self.cos[None, :T, None].to(dtype), self.sin[None, :T, None].to(dtype)
        x = norm(self.wte(idx).to(dtype))
        x0 = x
        for i, block in enumerate(self.blocks[: layer + 1]):
            x = self.resid_lambdas[i].to(dtype) * x + self.x0_lambdas[i].to(dtype) * x0
            if i == layer:
                return block.attn.weights(norm(x), cos, sin, self.windows[i])
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i], None)
        raise AssertionError("unreachable")

    def param_counts(self) -> dict[str, int]:
        """Parameter counts by group, counted on the module (compare expected_param_counts)."""

        def count(params) -> int:
            return sum(p.numel() for p in params)

        counts = {
            "wte": count(self.wte.parameters()),
            "value_embeds": count(self.value_embeds.parameters()),
            "lm_head": count(self.lm_head.parameters()),
            "matrices": count(self.blocks.parameters()),
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
        }
        counts["total"] = sum(counts.values())
        return counts

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_scaling_params(self) -> int:
        """Block matrices + LM head: the count the training horizon scales with (tokens = ratio x this)."""
        counts = self.param_counts()
        return counts["matrices"] + counts["lm_head"]

    def estimate_flops(self) -> float:
        """Training FLOPs per token (forward + backward) at the configured sequence length.

        6 per weight touched by a matmul (embedding lookups are free) plus attention: per layer
        12 * n_head * head_dim * (keys each query sees), non-causal counting as in the PaLM paper.
        """
        counts = self.param_counts()
        matmul_params = counts["matrices"] + counts["lm_head"]
        T = self.config.sequence_len
        attn = sum(
            12 * self.config.n_head * self.config.head_dim * (T if w < 0 else min(w + 1, T))
            for w in self.windows
        )
        return float(6 * matmul_params + attn)

    def named_param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters by optimizer role: lm_head, wte, value_embeds, resid_lambdas, x0_lambdas, matrices."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            "lm_head": [],
            "wte": [],
            "value_embeds": [],
            "resid_lambdas": [],
            "x0_lambdas": [],
            "matrices": [],
        }
        for name, p in self.named_parameters():
            role = "matrices" if name.startswith("blocks.") else name.split(".")[0]
            groups[role].append((name, p))
        return groups

    def setup_optimizer(
        self,
        *,
        matrix_lr: float,
        embedding_lr: float,
        unembedding_lr: float,
        scalar_lr: float,
        weight_decay: float,
        adam_betas: tuple[float, float] = (0.8, 0.95),
    ) -> torch.optim.Optimizer:
        """MuonAdamW: Muon for block matrices, AdamW (LRs scaled by (d_model/768)^-0.5) for the rest.

        `weight_decay` is Muon's (cautious) decay; the AdamW groups use small fixed decays.
        Distributed automatically when torch.distributed is initialised with more than one rank.
        """
        from nanorun.trainer.model.optim import MuonAdamW

        scale = (self.config.n_embd / 768) ** -0.5
        named = self.named_param_groups()
        adamw = {
            "lm_head": (unembedding_lr * scale, 0.01),
            "wte": (embedding_lr * scale, 0.001),
            "value_embeds": (0.5 * embedding_lr * scale, 0.01),
            "resid_lambdas": (0.01 * scalar_lr, 0.05),
            "x0_lambdas": (scalar_lr, 0.0),
        }
        groups = []
        for role, (lr, wd) in adamw.items():
            if named[role]:
                groups.append(
                    dict(
                        kind="adamw",
                        name=role,
                        names=[n for n, _ in named[role]],
                        params=[p for _, p in named[role]],
                        lr=lr,
                        betas=adam_betas,
                        eps=1e-10,
                        weight_decay=wd,
                    )
                )
        by_shape: dict[tuple[int, ...], list[tuple[str, nn.Parameter]]] = {}
        for name, p in named["matrices"]:
            by_shape.setdefault(tuple(p.shape), []).append((name, p))
        for shape, members in sorted(by_shape.items()):
            groups.append(
                dict(
                    kind="muon",
                    name="muon_" + "x".join(map(str, shape)),
                    names=[n for n, _ in members],
                    params=[p for _, p in members],
                    lr=matrix_lr,
                    momentum=0.95,
                    beta2=0.95,
                    ns_steps=5,
                    weight_decay=weight_decay,
                )
            )
        return MuonAdamW(groups)


def build_model(config: GPTConfig, device: torch.device | str) -> GPT:
    """A freshly initialised GPT of `config` on `device`: what training starts from, and what a
    checkpoint's weights are loaded into. Built on the meta device first, so the parameters are
    allocated once, directly on `device`; `init_weights` then fills them and the buffers a state dict
    does not carry (the rotary tables)."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
