"""The eval-only attention path (`attention_weights`, `GPT.attention_map`) reproduces what the fused
kernels compute: probabilities @ values equals the attention output of a normal forward pass."""

from __future__ import annotations

import pytest
import torch
from nanorun.trainer.model import gpt as gpt_module
from nanorun.trainer.model.attention import attention_weights, causal_attention

from tests.fixtures.chat_model import tiny_chat_model


@pytest.mark.parametrize("window", [-1, 0, 3, 100])
def test_weights_times_values_equals_causal_attention_with_gqa(window):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 12, 4, 8), torch.randn(2, 12, 2, 8), torch.randn(2, 12, 2, 8)
    probs = attention_weights(q, k, window, 0.3)
    assert probs.shape == (2, 4, 12, 12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 12))
    assert torch.all(probs.triu(1) == 0)  # causal: nothing from the future
    values = v.repeat_interleave(2, dim=2).transpose(1, 2)  # (B, H, T, D)
    expected = causal_attention(q, k, v, window, 0.3).transpose(1, 2)
    torch.testing.assert_close(probs @ values, expected, rtol=1e-4, atol=1e-5)


def test_attention_map_matches_what_the_forward_pass_attends_with(monkeypatch):
    model = tiny_chat_model(vocab_size=300)  # layer 0 has a 16-token window, layer 1 sees everything
    idx = torch.randint(0, 300, (1, 40))
    captured = []

    def spy(q, k, v, window, scale):
        out = causal_attention(q, k, v, window, scale)
        captured.append((v, out))
        return out

    monkeypatch.setattr(gpt_module, "causal_attention", spy)
    with torch.no_grad():
        model(idx)
    monkeypatch.undo()
    assert len(captured) == 2
    for layer, (v, out) in enumerate(captured):
        probs = model.attention_map(idx, layer)
        assert probs.shape == (1, 4, 40, 40)
        torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4, 40))
        values = v.repeat_interleave(2, dim=2).transpose(1, 2)
        torch.testing.assert_close(probs @ values, out.transpose(1, 2), rtol=1e-4, atol=1e-5)
    window = model.windows[0]
    assert window == 16
    rows, cols = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    outside = (cols > rows) | (rows - cols > window)
    assert torch.all(model.attention_map(idx, 0)[..., outside] == 0)
    assert torch.all(model.attention_map(idx, 1)[..., rows - cols > window] > 0)  # full layer


def test_attention_map_rejects_a_layer_out_of_range():
    model = tiny_chat_model(vocab_size=300)
    with pytest.raises(IndexError, match="2 layers"):
        model.attention_map(torch.zeros(1, 3, dtype=torch.long), 2)
