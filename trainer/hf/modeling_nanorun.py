"""nanorun's GPT as a transformers model: `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.

Shipped in every folder `nanorun export` writes, beside `configuration_nanorun.py`; it imports
nothing but torch and transformers. It computes what nanorun's `trainer/model/gpt.py` computes, and
a test holds the two to equal logits:

- rotary position embeddings (base `rope_theta`) applied before QK-norm: queries and keys are
  RMS-normalised per head after the rotation, then sharpened by `qk_gain` each
- parameter-free RMSNorm (eps: the dtype's machine epsilon), also right after the token embedding
- ReLU² MLP, no biases, untied embedding and LM head
- grouped-query attention (`num_key_value_heads` <= `num_attention_heads`)
- per-layer residual and input-skip scalars: x <- resid_lambdas[i] * x + x0_lambdas[i] * x0
  before block i, x0 being the normalised embedding
- value embeddings (ResFormer) on the layers in `value_embed_layers`, mixed into v with a per-head
  gate 2 * sigmoid(W x[:ve_gate_channels])
- sliding-window layers: layer i's queries see the `layer_windows[i]` tokens before them (-1: all)
- embeddings and LM head padded to `padded_vocab_size` rows; the logits keep the first
  `vocab_size` columns, softcapped at `final_logit_softcapping` in fp32

Batches may be left-padded (`attention_mask`): positions count each row's own tokens, so a padded
row computes what it would alone. `generate` keeps keys and values in a transformers `DynamicCache`,
which holds every token, so a sliding-window layer masks the older ones out rather than dropping them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_nanorun import NanorunConfig


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def rotary(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, T, 1, head_dim / 2) of the rotary angles at `positions` (B, T), in fp32."""
    inv_freq = 1.0 / base ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    )
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, T, H, D) by the angles in cos/sin."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def visibility(
    query_pos: torch.Tensor, key_pos: torch.Tensor, key_valid: torch.Tensor, window: int
) -> torch.Tensor:
    """Boolean mask (B, 1, Tq, Tk): key j is visible from query i iff it is a real token at or before
    the query and at most `window` tokens behind it (any distance when `window` < 0). A query that
    sees nothing (a padding position) sees every key instead: its output is never used, and an
    all-masked row would make the softmax NaN."""
    rel = query_pos.unsqueeze(-1) - key_pos.unsqueeze(-2)  # (B, Tq, Tk): how far back each key lies
    visible = (rel >= 0) & key_valid.unsqueeze(-2)
    if window >= 0:
        visible = visible & (rel <= window)
    visible = visible | ~visible.any(dim=-1, keepdim=True)
    return visible.unsqueeze(1)


class NanorunAttention(nn.Module):
    def __init__(self, config: NanorunConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.window = config.layer_windows[layer_idx]
        self.scale = config.qk_gain**2 / self.head_dim**0.5
        self.ve_gate_channels = config.ve_gate_channels
        d, kv_dim = config.hidden_size, self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_dim, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        has_ve = layer_idx in config.value_embed_layers
        self.ve_gate = nn.Linear(config.ve_gate_channels, self.n_kv_head, bias=False) if has_ve else None

    def forward(
        self,
        x: torch.Tensor,
        ve: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: Cache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.n_kv_head != self.n_head
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class NanorunMLP(nn.Module):
    def __init__(self, config: NanorunConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=False)
        self.down_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


class NanorunBlock(nn.Module):
    def __init__(self, config: NanorunConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = NanorunAttention(config, layer_idx)
        self.mlp = NanorunMLP(config)

    def forward(self, x, ve, cos, sin, mask, cache) -> torch.Tensor:
        x = x + self.self_attn(norm(x), ve, cos, sin, mask, cache)
        return x + self.mlp(norm(x))


class NanorunPreTrainedModel(PreTrainedModel):
    config: NanorunConfig
    config_class = NanorunConfig
    base_model_prefix = "model"
    _no_split_modules = ["NanorunBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # A fresh model (no checkpoint) starts as nanorun's does: the output projections at zero,
        # every block the identity; an exported folder always brings its weights.
        std = self.config.hidden_size**-0.5
        if isinstance(module, NanorunModel):
            module.resid_lambdas.fill_(1.0)
            module.x0_lambdas.zero_()
        elif isinstance(module, nn.Embedding | nn.Linear):
            module.weight.normal_(0.0, std)


class NanorunModel(NanorunPreTrainedModel):
    """The embeddings and blocks: token ids to the final normalised hidden states."""

    def __init__(self, config: NanorunConfig) -> None:
        super().__init__(config)
        kv_dim = config.num_key_value_heads * config.head_dim
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(NanorunBlock(config, i) for i in range(config.num_hidden_layers))
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(config.padded_vocab_size, kv_dim) for i in config.value_embed_layers}
        )
        self.resid_lambdas = nn.Parameter(torch.ones(config.num_hidden_layers))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.num_hidden_layers))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        B, T = input_ids.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        # Keys are the cached tokens and these; a 2D attention_mask covers all of them (0: padding).
        if attention_mask is None:
            key_valid = torch.ones(B, past + T, dtype=torch.bool, device=input_ids.device)
        else:
            key_valid = attention_mask[:, -(past + T) :].bool()
        key_pos = key_valid.long().cumsum(-1) - 1  # each row counts its own tokens
        if position_ids is None:
            position_ids = key_pos[:, -T:].clamp(min=0)
        query_pos = position_ids.expand(B, T)
        masks = {w: visibility(query_pos, key_pos, key_valid, w) for w in set(self.config.layer_windows)}

        dtype = self.embed_tokens.weight.dtype
        cos, sin = rotary(query_pos, self.config.head_dim, self.config.rope_theta)
        cos, sin = cos.to(dtype), sin.to(dtype)
        x = norm(self.embed_tokens(input_ids))
        x0 = x
        for i, block in enumerate(self.layers):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, masks[self.config.layer_windows[i]], cache)
        return BaseModelOutputWithPast(last_hidden_state=norm(x), cache=cache)


class NanorunForCausalLM(NanorunPreTrainedModel, GenerationMixin):
    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: NanorunConfig) -> None:
        super().__init__(config)
        self.model = NanorunModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab_size) in fp32; with `labels` (ids, -100 = ignored), the mean
        next-token cross-entropy as `loss` (labels are shifted here, as everywhere in transformers)."""
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)[..., : self.config.vocab_size].float()
        cap = self.config.final_logit_softcapping
        if cap:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


__all__ = ["NanorunForCausalLM", "NanorunModel", "NanorunPreTrainedModel"]
