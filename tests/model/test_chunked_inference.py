"""Chunked inference: the layers run over chunks of time carrying conv and scan state, and the
answer equals the unchunked one; activation memory is bounded by the chunk, not by L."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from model import CoupledMambaForSentiment, load_checkpoint, save_checkpoint
from model.mamba import DEFAULT_INFERENCE_CHUNK, CoupledMambaLayer, StreamingPool, masked_pool

FIELDS = ("score", "logits", "probabilities", "modality_weights")


def _answers(model: CoupledMambaForSentiment, features, masks, chunk: int | None):
    model.set_inference_chunk_size(chunk)
    with torch.no_grad():
        out = model(features, masks)
        hidden, _ = model.encode(features, masks)
    return out, hidden


def _gappy_batch(batch_of, length: int, dims=None):
    features, masks = batch_of([length, length - 5, length - 11], dims=dims, pad_to=length)
    masks["visual"][0, 3:9] = False  # a gap that straddles chunk borders
    masks["audio"][1] = False  # absent in one clip
    masks["text"][2, :7] = False  # late start
    return features, masks


@pytest.mark.parametrize(
    "options",
    [
        {"state_coupling": "learned", "pooling": "mean"},
        {"state_coupling": "mean", "pooling": "last", "feature_mixing": True},
        {"state_coupling": "none", "pooling": "max", "norm": "rmsnorm", "fusion": "concat"},
        {"state_coupling": "sum", "pooling": "mean", "d_conv": 2, "n_layers": 1},
    ],
    ids=["learned-mean", "mean-last-mixing", "none-max", "sum-dconv2"],
)
@pytest.mark.parametrize("chunk", [1, 2, 5, 16])
def test_chunked_equals_unchunked_float64(make_model, batch_of, options, chunk) -> None:
    """In float64 the chunks change nothing but rounding: 1e-10. Chunks of 1 and 2 steps are
    shorter than the conv's d_conv - 1 = 3 carried inputs."""
    model = make_model(scan_backend="torch", **options).double()
    if options["state_coupling"] == "learned":
        with torch.no_grad():
            for layer in model.layers:
                layer.coupling_logits.normal_()
    features, masks = _gappy_batch(batch_of, 23)
    features = {m: f.double() for m, f in features.items()}
    whole, hidden_whole = _answers(model, features, masks, None)
    chunked, hidden_chunked = _answers(model, features, masks, chunk)
    for name in FIELDS:
        torch.testing.assert_close(
            getattr(chunked, name), getattr(whole, name), rtol=1e-10, atol=1e-10, msg=name
        )
    torch.testing.assert_close(hidden_chunked, hidden_whole, rtol=1e-10, atol=1e-10)
    assert torch.equal(chunked.present, whole.present)


@pytest.mark.parametrize("backend", ["torch", "ref"])
def test_chunked_equals_unchunked_float32(make_model, batch_of, backend) -> None:
    """The default float32 model at its default chunk size, on a sequence of 2.5 chunks."""
    model = make_model(scan_backend=backend, d_model=16, d_state=8)
    length = DEFAULT_INFERENCE_CHUNK * 5 // 2 if backend == "torch" else 40
    chunk = DEFAULT_INFERENCE_CHUNK if backend == "torch" else 16
    features, masks = _gappy_batch(batch_of, length)
    whole, hidden_whole = _answers(model, features, masks, None)
    chunked, hidden_chunked = _answers(model, features, masks, chunk)
    for name in FIELDS:
        torch.testing.assert_close(
            getattr(chunked, name), getattr(whole, name), rtol=1e-5, atol=1e-5, msg=name
        )
    torch.testing.assert_close(hidden_chunked, hidden_whole, rtol=1e-5, atol=1e-5)


def test_carried_state_is_what_makes_chunks_agree(make_model) -> None:
    """Dropping the carried conv or scan state between chunks changes the answer, so the
    equality above is the carried state's doing."""
    model = make_model(scan_backend="torch", n_layers=1)
    layer = model.layers[0]
    assert isinstance(layer, CoupledMambaLayer)
    hidden = torch.randn(3, 1, 12, 16, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 1, 12)
    with torch.no_grad():
        path = model.fast_path
        whole, _ = layer(hidden, mask, path)
        first, state = layer(hidden[:, :, :6], mask[:, :, :6], path, carry=True)
        assert state is not None
        assert state.conv.shape == (3, 1, 32, 3) and state.ssm.shape == (3, 1, 32, 8)
        second, _ = layer(hidden[:, :, 6:], mask[:, :, 6:], path, state)
        torch.testing.assert_close(torch.cat([first, second], 2), whole, rtol=1e-5, atol=1e-6)
        for broken in (
            type(state)(conv=torch.zeros_like(state.conv), ssm=state.ssm),
            type(state)(conv=state.conv, ssm=torch.zeros_like(state.ssm)),
        ):
            wrong, _ = layer(hidden[:, :, 6:], mask[:, :, 6:], path, broken)
            assert (wrong - whole[:, :, 6:]).abs().max() > 2e-5  # vs the 1e-6 above


def test_chunking_is_on_for_long_inference_only(make_model, batch_of) -> None:
    """Default: no-grad calls longer than the chunk size run chunk by chunk (the out_proj of
    every mixer is called once per chunk); calls with gradients (training) never are."""
    model = make_model()
    assert model.inference_chunk_size == DEFAULT_INFERENCE_CHUNK
    model.set_inference_chunk_size(4)
    calls: list[int] = []
    hook = (
        model.layers[0]
        .mixers["text"]
        .out_proj.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[1]))
    )
    features, masks = batch_of([10])
    try:
        with torch.no_grad():
            model(features, masks)
        assert calls == [4, 4, 2]
        calls.clear()
        model(features, masks)  # gradients on
        assert calls == [10]
        calls.clear()
        with torch.no_grad():
            short = {m: f[:, :4] for m, f in features.items()}
            model(short, {m: k[:, :4] for m, k in masks.items()})
        assert calls == [4]
    finally:
        hook.remove()


def test_chunk_size_is_a_runtime_setting(make_model, batch_of, tmp_path) -> None:
    """Not part of the checkpoint: a saved model loads with the default and answers the same
    with any chunk size."""
    model = make_model()
    model.set_inference_chunk_size(3)
    save_checkpoint(model, tmp_path / "ckpt")
    assert "chunk" not in (tmp_path / "ckpt" / "config.json").read_text()
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.inference_chunk_size == DEFAULT_INFERENCE_CHUNK
    assert loaded.describe()["inference_chunk_size"] == DEFAULT_INFERENCE_CHUNK
    features, masks = batch_of([9, 6])
    with torch.no_grad():
        want = model(features, masks).score
        loaded.set_inference_chunk_size(None)
        torch.testing.assert_close(loaded(features, masks).score, want, rtol=1e-5, atol=1e-6)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk size"):
            model.set_inference_chunk_size(bad)  # type: ignore[arg-type]


def test_activation_memory_is_bounded_by_the_chunk(
    make_model, batch_of, peak_bytes: Callable[[Callable[[], object]], int]
) -> None:
    """With chunks of 32 steps the peak hardly moves from L = 256 to L = 2048; unchunked, it
    grows by several times the layer's activations."""
    model = make_model(d_model=16, d_state=8, n_layers=2)
    peaks: dict[tuple[int | None, int], int] = {}
    for chunk in (32, None):
        model.set_inference_chunk_size(chunk)
        for length in (256, 2048):
            features, masks = batch_of([length])

            def call(features=features, masks=masks) -> object:
                with torch.inference_mode():
                    return model(features, masks)

            peaks[(chunk, length)] = peak_bytes(call)
    grown_chunked = peaks[(32, 2048)] - peaks[(32, 256)]
    grown_whole = peaks[(None, 2048)] - peaks[(None, 256)]
    per_step_whole = grown_whole / (2048 - 256)
    # Unchunked: at least the layer's scan inputs (u, dt, z, B, C) for 3 modalities per step.
    assert per_step_whole > 3 * (3 * 32 + 2 * 8) * 4
    # Chunked: only the (M, b, L) masks grow with L (a few bytes per step).
    assert grown_chunked / (2048 - 256) < 16, peaks


@pytest.mark.parametrize("kind", ["mean", "last", "max"])
def test_streaming_pool_equals_masked_pool(kind: str) -> None:
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 2, 11, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 2, 11, generator=g) > 0.4
    mask[0, 1] = False  # nothing valid
    mask[1, 0] = False
    mask[1, 0, 1] = True  # valid only in the first chunk
    mask[2, 1] = False
    mask[2, 1, 10] = True  # valid only in the last chunk
    pool = StreamingPool(kind)
    for start in range(0, 11, 4):
        pool.add(hidden[..., start : start + 4, :], mask[..., start : start + 4])
    want: Tensor = masked_pool(hidden, mask, kind)
    torch.testing.assert_close(pool.result(), want, rtol=1e-12, atol=1e-12)
    assert (pool.result()[0, 1] == 0).all()
    with pytest.raises(ValueError, match="unknown pooling"):
        StreamingPool("median")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunked_equals_unchunked_on_cuda(make_model, batch_of) -> None:
    """On the GPU backend (triton, and the optional kernels where they import)."""
    model = make_model(d_model=16, d_state=8).cuda()
    model.set_scan_backend("auto")
    features, masks = _gappy_batch(batch_of, 50)
    features = {m: f.cuda() for m, f in features.items()}
    masks = {m: k.cuda() for m, k in masks.items()}
    whole, hidden_whole = _answers(model, features, masks, None)
    chunked, hidden_chunked = _answers(model, features, masks, 16)
    for name in FIELDS:
        torch.testing.assert_close(
            getattr(chunked, name), getattr(whole, name), rtol=1e-5, atol=1e-5, msg=name
        )
    torch.testing.assert_close(hidden_chunked, hidden_whole, rtol=1e-5, atol=1e-5)
