"""The cross-attention baselines: same width and depth as our model, both kernels agree,
padding never changes an answer, and the attention-memory estimate matches what is allocated."""

from __future__ import annotations

import pytest
import torch

from bench.baselines import (
    CrossAttentionFusion,
    CrossModalBlock,
    attention_matrix_bytes,
    materialized_attention,
    sdpa_attention,
)
from bench.fusion_measure import make_inputs, peak_memory_call
from model import CoupledMambaConfig, CoupledMambaForSentiment


def small_config(**overrides: object) -> CoupledMambaConfig:
    values: dict[str, object] = {"d_model": 32, "d_state": 8, "n_layers": 2, "dropout": 0.0}
    values.update(overrides)
    return CoupledMambaConfig(**values)  # type: ignore[arg-type]


def pair(config: CoupledMambaConfig) -> tuple[CrossAttentionFusion, CrossAttentionFusion]:
    torch.manual_seed(0)
    a = CrossAttentionFusion.from_config(config, "materialized").eval()
    b = CrossAttentionFusion.from_config(config, "sdpa").eval()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("n_layers", [1, 3])
def test_equal_width_and_depth_to_our_model(n_layers: int) -> None:
    config = small_config(n_layers=n_layers)
    ours = CoupledMambaForSentiment(config)
    base = CrossAttentionFusion.from_config(config, "sdpa")
    M = config.n_modalities
    assert base.depth == len(ours.layers) == n_layers
    assert len(base.streams) == M * (M - 1)  # every target attends to every other modality
    blocks = [blk for stream in base.streams.values() for blk in stream.children()]
    assert len(blocks) == M * (M - 1) * n_layers
    for blk in blocks:
        assert isinstance(blk, CrossModalBlock)
        assert blk.q_proj.in_features == blk.q_proj.out_features == config.d_model
        assert blk.ffn[0].out_features == config.d_inner  # our Mamba inner width
    for m in config.modalities:
        assert base.input_proj[m].in_features == ours.input_proj[m].in_features
        assert base.input_proj[m].out_features == ours.input_proj[m].out_features


def test_both_kernels_give_the_same_answer() -> None:
    config = small_config()
    a, b = pair(config)
    features, masks = make_inputs(config, 2, 24, torch.device("cpu"), seed=1)
    with torch.inference_mode():
        out_a, out_b = a(features, masks), b(features, masks)
    assert out_a.score.shape == (2,) and out_a.probabilities.shape == (2, 3)
    assert torch.isfinite(out_a.logits).all()
    torch.testing.assert_close(out_a.logits, out_b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_a.score, out_b.score, atol=1e-5, rtol=1e-5)


def test_attention_kernels_agree_with_a_key_mask() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    k = k[:, :, :5]
    v = v[:, :, :5]
    key_mask = torch.tensor([[True] * 5, [True, True, False, True, False]])
    expected = materialized_attention(q.double(), k.double(), v.double(), key_mask).float()
    torch.testing.assert_close(materialized_attention(q, k, v, key_mask), expected)
    torch.testing.assert_close(sdpa_attention(q, k, v, key_mask), expected, atol=1e-5, rtol=1e-5)
    # masked keys get no weight: changing their values changes nothing
    v2 = v.clone()
    v2[1, :, 2] = 100.0
    torch.testing.assert_close(materialized_attention(q, k, v2, key_mask)[1], expected[1])


@pytest.mark.parametrize("attention", ["materialized", "sdpa"])
def test_padding_does_not_change_an_answer(attention: str) -> None:
    config = small_config()
    torch.manual_seed(0)
    net = CrossAttentionFusion.from_config(config, attention).eval()
    short, _ = make_inputs(config, 1, 10, torch.device("cpu"), seed=2)
    long, _ = make_inputs(config, 2, 16, torch.device("cpu"), seed=3)
    for m in config.modalities:
        long[m][0, :10] = short[m][0]
    masks = {m: torch.ones(2, 16, dtype=torch.bool) for m in config.modalities}
    for m in masks:
        masks[m][0, 10:] = False
    with torch.inference_mode():
        alone = net(short, {m: torch.ones(1, 10, dtype=torch.bool) for m in short})
        batched = net(long, masks)
    torch.testing.assert_close(batched.score[:1], alone.score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.logits[:1], alone.logits, atol=1e-5, rtol=1e-5)


def test_materialized_memory_estimate_matches_the_allocator() -> None:
    batch, heads, length, d_h = 2, 4, 256, 8
    q = torch.randn(batch, heads, length, d_h)
    k, v = torch.randn_like(q), torch.randn_like(q)
    estimate = attention_matrix_bytes(batch, length, heads)
    peak = peak_memory_call(lambda: materialized_attention(q, k, v, None), torch.device("cpu"))
    assert estimate <= peak <= 1.2 * estimate
    fused = peak_memory_call(lambda: sdpa_attention(q, k, v, None), torch.device("cpu"))
    assert fused < estimate / 4  # the fused kernel never holds the matrices


def test_needs_two_modalities() -> None:
    with pytest.raises(ValueError, match="two modalities"):
        CrossAttentionFusion(small_config(modalities=("text",), feature_dims={"text": 8}))
