"""KV cache: incremental decoding reproduces a full recompute, row by row, at any mix of lengths."""

import pytest
import torch
from nanorun.trainer.model.gpt import GPT, GPTConfig, KVCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@torch.no_grad()
def random_model(seed: int = 0, **flags) -> GPT:
    """A tiny model with random weights everywhere (at init the output projections are zero, which
    would hide attention, and with it any cache bug)."""
    flags.setdefault("window_pattern", "SL")
    flags.setdefault("short_window", 5)
    config = GPTConfig.from_depth(
        2, vocab_size=100, sequence_len=32, aspect_ratio=32, head_dim=16, n_kv_head=2, **flags
    )
    model = GPT(config)
    torch.manual_seed(seed)
    model.init_weights()
    for p in model.parameters():
        if p.ndim == 2:
            p.normal_(0.0, p.size(-1) ** -0.5)
    return model.eval()


def new_cache(model: GPT, batch_size: int, max_seq_len: int = 48) -> KVCache:
    return KVCache.for_model(model.config, batch_size, max_seq_len, "cpu", torch.float32)


@torch.no_grad()
@pytest.mark.parametrize("flags", [{}, {"window_pattern": "L"}, {"value_embeds": False}])
def test_incremental_decode_equals_full_recompute(flags):
    model = random_model(**flags)
    torch.manual_seed(1)
    tokens = torch.randint(0, 100, (2, 20))
    full = model(tokens)
    cache = new_cache(model, 2)
    prefill = model(tokens[:, :7], kv_cache=cache)  # a chunk first, then one token at a time
    torch.testing.assert_close(prefill, full[:, :7], atol=1e-5, rtol=1e-5)
    for t in range(7, 20):
        step = model(tokens[:, t : t + 1], kv_cache=cache)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
    assert cache.cache_seqlens.tolist() == [20, 20]


@torch.no_grad()
def test_rows_of_different_lengths_decode_independently():
    model = random_model()
    torch.manual_seed(2)
    lengths = [3, 9, 14]
    prompts = [torch.randint(0, 100, (1, n)) for n in lengths]
    cache = new_cache(model, 3)
    for i, prompt in enumerate(prompts):  # prefill each row through its batch-1 view
        model(prompt, kv_cache=cache.row(i))
    assert cache.cache_seqlens.tolist() == lengths
    sequences = list(prompts)
    for _ in range(4):  # then decode all rows together, each at its own position
        next_tokens = torch.randint(0, 100, (3, 1))
        logits = model(next_tokens, kv_cache=cache)
        for i in range(3):
            sequences[i] = torch.cat([sequences[i], next_tokens[i : i + 1]], dim=1)
            reference = model(sequences[i])[0, -1]
            torch.testing.assert_close(logits[i, 0], reference, atol=1e-5, rtol=1e-5)
    assert cache.cache_seqlens.tolist() == [n + 4 for n in lengths]


@torch.no_grad()
def test_multi_token_chunks_at_different_row_lengths():
    model = random_model(seed=3)
    torch.manual_seed(4)
    a, b = torch.randint(0, 100, (1, 12)), torch.randint(0, 100, (1, 5))
    cache = new_cache(model, 2)
    model(a[:, :8], kv_cache=cache.row(0))
    model(b[:, :1], kv_cache=cache.row(1))
    chunk = torch.cat([a[:, 8:12], b[:, 1:5]])  # 4 new tokens per row, rows at 8 and 1
    logits = model(chunk, kv_cache=cache)
    torch.testing.assert_close(logits[0], model(a)[0, 8:12], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], model(b)[0, 1:5], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_row_view_shares_storage_and_reset_clears_selected_rows():
    model = random_model()
    cache = new_cache(model, 3)
    model(torch.randint(0, 100, (1, 6)), kv_cache=cache.row(1))
    assert cache.cache_seqlens.tolist() == [0, 6, 0]
    assert cache.k[:, 1, :6].abs().sum() > 0 and cache.k[:, 0].abs().sum() == 0
    model(torch.randint(0, 100, (3, 2)), kv_cache=cache)
    cache.reset([1])
    assert cache.cache_seqlens.tolist() == [2, 0, 2]
    # a reset row behaves exactly like a fresh one
    tokens = torch.randint(0, 100, (1, 4))
    torch.testing.assert_close(model(tokens, kv_cache=cache.row(1)), model(tokens), atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.cache_seqlens.tolist() == [0, 0, 0]
    with pytest.raises(IndexError):
        cache.row(3)


@torch.no_grad()
def test_overflowing_the_cache_is_a_clear_error_and_changes_nothing():
    model = random_model()
    cache = new_cache(model, 1, max_seq_len=8)
    model(torch.randint(0, 100, (1, 6)), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model(torch.randint(0, 100, (1, 3)), kv_cache=cache)
    assert cache.cache_seqlens.tolist() == [6]
    with pytest.raises(ValueError, match="rows"):
        model(torch.randint(0, 100, (2, 1)), kv_cache=cache)
