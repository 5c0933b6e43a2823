"""The configuration of a nanorun model in the Hugging Face format (`model_type: nanorun`).

Shipped beside `modeling_nanorun.py` in every folder `nanorun export` writes, and loaded from there
with `trust_remote_code=True`; it imports nothing but transformers. The per-layer facts the trainer
derives from its flags (which layers slide a window and how wide, which carry value embeddings) are
written out resolved, so this file holds no derivation that could drift from nanorun's
`trainer/model/gpt.py`, whose architecture it describes.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class NanorunConfig(PreTrainedConfig):
    model_type = "nanorun"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32768  # token ids the tokenizer has: the logits' last dimension
    padded_vocab_size: int = 32768  # rows of the embeddings and the LM head (a multiple of 64)
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    num_key_value_heads: int = 6
    max_position_embeddings: int = 2048  # the training context; rotary angles are computed for any position
    rope_theta: float = 100_000.0
    layer_windows: list[int] | None = None  # per layer: earlier tokens a query sees (-1: all of them)
    value_embed_layers: list[int] | None = None  # the layers that mix a value embedding into v
    ve_gate_channels: int = 12  # leading channels of the residual stream that feed the value gate
    qk_gain: float = 1.2  # queries and keys are RMS-normalised, then multiplied by this
    final_logit_softcapping: float | None = 15.0  # logits = c * tanh(logits / c); None: no cap
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs) -> None:
        if self.layer_windows is None:
            self.layer_windows = [-1] * self.num_hidden_layers
        if self.value_embed_layers is None:
            self.value_embed_layers = []
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


__all__ = ["NanorunConfig"]
