"""The GPT model: sizing, parameter counts, shapes, attention variants, FLOPs, and learning."""

import math

import pytest
import torch
import torch.nn.functional as F
from nanorun.trainer.model.attention import band_mask, causal_attention
from nanorun.trainer.model.gpt import GPT, GPTConfig, expected_param_counts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**flags) -> GPTConfig:
    flags.setdefault("vocab_size", 100)
    flags.setdefault("sequence_len", 32)
    return GPTConfig.from_depth(2, aspect_ratio=32, head_dim=32, **flags)


def tiny_model(seed: int = 0, **flags) -> GPT:
    model = GPT(tiny_config(**flags))
    torch.manual_seed(seed)
    model.init_weights()
    return model


@torch.no_grad()
def scramble(model: GPT, seed: int = 0) -> GPT:
    """Random weights everywhere: at init the output projections are zero and attention is invisible."""
    torch.manual_seed(seed)
    for p in model.parameters():
        if p.ndim == 2:
            p.normal_(0.0, p.size(-1) ** -0.5)
    return model


def naive_attention(q, k, v, window: int, scale: float):
    """Textbook attention with an explicit per-pair loop mask, (B,T,H,D) layout, GQA by repetition."""
    B, T, H, D = q.shape
    rep = H // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            allowed[i, j] = j <= i and (window < 0 or i - j <= window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def test_from_depth_rounds_width_up_to_whole_heads():
    d20 = GPTConfig.from_depth(20, vocab_size=32768, sequence_len=2048)
    assert (d20.n_embd, d20.n_head, d20.n_kv_head, d20.head_dim) == (1280, 10, 10, 128)
    d3 = GPTConfig.from_depth(3, vocab_size=50, sequence_len=64)  # 3 * 64 = 192 -> 256
    assert (d3.n_embd, d3.n_head) == (256, 2)
    assert d3.padded_vocab_size == 64
    assert GPTConfig.from_depth(4, 100, 64, n_kv_head=1).n_kv_head == 1


def test_config_round_trips_through_dict_and_rejects_bad_values():
    config = tiny_config(window_pattern="SSL", value_embeds=False)
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        tiny_config(n_kv_head=3)
    with pytest.raises(ValueError, match="window_pattern"):
        tiny_config(window_pattern="SXL")


@pytest.mark.parametrize("flags", [{}, {"n_kv_head": 1}, {"value_embeds": False}, {"n_kv_head": 2}])
def test_parameter_count_formula_matches_the_module(flags):
    for depth in (2, 3):
        config = GPTConfig.from_depth(
            depth, vocab_size=1000, sequence_len=64, aspect_ratio=64, head_dim=32, **flags
        )
        with torch.device("meta"):
            model = GPT(config)
        assert model.param_counts() == expected_param_counts(config)
        assert model.num_params() == expected_param_counts(config)["total"]


def test_d20_parameter_counts_match_the_published_sizing():
    config = GPTConfig.from_depth(20, vocab_size=32768, sequence_len=2048)
    with torch.device("meta"):
        model = GPT(config)
    counts = {k: round(v / 1e6, 1) for k, v in model.param_counts().items()}
    assert counts == {
        "wte": 41.9,
        "value_embeds": 419.4,
        "lm_head": 41.9,
        "matrices": 393.2,
        "scalars": 0.0,
        "total": 896.5,
    }
    # the scaling count is the matmul weights: per layer 4 d² of attention and 8 d² of MLP (d = 1280),
    # the value-embedding gates of 10 layers (12 channels to 10 KV heads), and the unembedding
    assert model.num_scaling_params() == 20 * 12 * 1280**2 + 10 * 12 * 10 + 32768 * 1280 == 435_160_240


def test_forward_returns_softcapped_fp32_logits_for_the_real_vocab():
    model = tiny_model()
    idx = torch.randint(0, 100, (3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, 100) and logits.dtype == torch.float32
    assert model.lm_head.weight.shape[0] == 128  # padded internally
    assert logits.abs().max() < model.config.softcap


def test_loss_reductions_and_ignore_index():
    model = tiny_model()
    idx = torch.randint(0, 100, (2, 16))
    targets = torch.randint(0, 100, (2, 16))
    targets[0, :5] = -1
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 16)
    assert (per_token[0, :5] == 0).all()
    logits = model(idx)
    reference = F.cross_entropy(logits.view(-1, 100), targets.view(-1), ignore_index=-1)
    torch.testing.assert_close(model(idx, targets), reference)
    torch.testing.assert_close(per_token.sum() / (targets != -1).sum(), reference)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(idx, targets, loss_reduction="avg")


def test_meta_device_build_then_init_equals_a_direct_build():
    direct = tiny_model(seed=3, window_pattern="SL")
    with torch.device("meta"):
        model = GPT(tiny_config(window_pattern="SL"))
    model.to_empty(device="cpu")
    torch.manual_seed(3)
    model.init_weights()
    for (name, a), b in zip(direct.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    idx = torch.randint(0, 100, (2, 12))
    torch.testing.assert_close(model(idx), direct(idx))


def test_zero_initialised_output_projections():
    model = tiny_model()
    for block in model.blocks:
        assert block.attn.c_proj.weight.abs().sum() == 0
        assert block.mlp.c_proj.weight.abs().sum() == 0


@pytest.mark.parametrize("window", [-1, 0, 3, 30])
def test_attention_matches_explicit_mask_reference(window):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 12, 4, 8), torch.randn(2, 12, 2, 8), torch.randn(2, 12, 2, 8)
    out = causal_attention(q, k, v, window, scale=0.3)
    torch.testing.assert_close(out, naive_attention(q, k, v, window, scale=0.3))


def test_band_mask_shows_each_query_itself_and_window_predecessors():
    mask = band_mask(torch.arange(5), 5, window=1)
    assert mask.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
    ]


def test_grouped_query_attention_equals_attention_with_repeated_kv_heads():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 10, 4, 8), torch.randn(2, 10, 1, 8), torch.randn(2, 10, 1, 8)
    grouped = causal_attention(q, k, v, -1, scale=0.35)
    repeated = causal_attention(q, k.expand(-1, -1, 4, -1), v.expand(-1, -1, 4, -1), -1, scale=0.35)
    torch.testing.assert_close(grouped, repeated)
    model = tiny_model(n_kv_head=1)
    assert model.blocks[0].attn.c_k.weight.shape == (32, 64)  # one 32-dim kv head
    assert model(torch.randint(0, 100, (2, 8))).shape == (2, 8, 100)


def test_sliding_window_only_changes_positions_beyond_the_window():
    idx = torch.randint(0, 100, (2, 24))
    full = scramble(tiny_model(window_pattern="L"))
    windowed = scramble(tiny_model(window_pattern="SL", short_window=4))
    assert windowed.windows == [4, -1]
    full_logits, windowed_logits = full(idx), windowed(idx)
    # Queries at positions 0..4 see at most 4 predecessors anyway, so nothing differs there.
    torch.testing.assert_close(windowed_logits[:, :5], full_logits[:, :5])
    assert not torch.allclose(windowed_logits[:, 6:], full_logits[:, 6:], atol=1e-3)


def test_last_layer_is_always_full_context_and_short_window_defaults_to_a_quarter():
    config = GPTConfig.from_depth(4, 100, 2048, window_pattern="S")
    assert config.layer_windows() == [512, 512, 512, -1]
    assert GPTConfig(sequence_len=64, window_pattern="SSSL").short_window_tokens == 64


def test_flops_per_token_formula():
    config = tiny_config(window_pattern="SL", short_window=7)
    model = GPT(config)
    counts = model.param_counts()
    H, D, T = config.n_head, config.head_dim, config.sequence_len
    expected = 6 * (counts["matrices"] + counts["lm_head"]) + 12 * H * D * (8 + T)
    assert model.estimate_flops() == expected
    d20 = GPTConfig.from_depth(20, 32768, 2048)
    with torch.device("meta"):
        big = GPT(d20)
    # about 6N per token for N = 435M matmul weights, plus attention
    assert math.isclose(big.estimate_flops(), 6 * 435.16e6 + 12 * 1280 * 2048 * 20, rel_tol=1e-3)


def test_loss_falls_on_a_repeated_batch():
    model = tiny_model(window_pattern="SL", short_window=8)
    optimizer = model.setup_optimizer(
        matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5, weight_decay=0.0
    )
    torch.manual_seed(0)
    batch = torch.randint(0, 100, (4, 33))
    losses = []
    for _ in range(50):
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(100), rel=0.1)  # near-uniform predictions at init
    assert losses[-1] < 0.2 * losses[0]


def test_fp8_linears_track_full_precision_and_switch_back():
    from nanorun.trainer.model.fp8 import Float8Linear, disable_fp8, enable_fp8

    # On CPU the FP8 quantisation is emulated (no FP8 tensor cores); the scaling logic is the same.
    model = scramble(tiny_model())
    idx = torch.randint(0, 100, (2, 16))
    targets = torch.randint(0, 100, (2, 16))
    keys = list(model.state_dict())
    reference_loss = model(idx, targets)
    reference_loss.backward()
    reference_grad = model.blocks[0].mlp.c_fc.weight.grad.clone()
    model.zero_grad()

    assert enable_fp8(model, min_dim=16) == 2 * 6  # q, k, v, attn out, MLP in, MLP out per block
    assert type(model.blocks[0].attn.ve_gate) is not Float8Linear  # 12-wide: too small
    assert type(model.lm_head) is not Float8Linear
    assert list(model.state_dict()) == keys
    loss = model(idx, targets)
    loss.backward()
    grad = model.blocks[0].mlp.c_fc.weight.grad
    assert loss.item() == pytest.approx(reference_loss.item(), rel=0.02)
    assert loss.item() != reference_loss.item()  # it really quantised
    assert F.cosine_similarity(grad.flatten(), reference_grad.flatten(), dim=0) > 0.98

    disable_fp8(model)
    torch.testing.assert_close(model(idx, targets), reference_loss)


def test_evaluation_inside_bf16_matmuls_is_unquantised_and_fp8_training_resumes_after():
    from nanorun.trainer.model.fp8 import Float8Linear, bf16_matmuls, enable_fp8

    model = scramble(tiny_model())
    idx, targets = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        reference = model(idx, targets)
        enable_fp8(model, min_dim=16)
        quantised = model(idx, targets)
        with bf16_matmuls(model):
            assert not any(type(m) is Float8Linear for m in model.modules())
            torch.testing.assert_close(model(idx, targets), reference)
        assert sum(type(m) is Float8Linear for m in model.modules()) == 12
        assert model(idx, targets).item() == quantised.item()
