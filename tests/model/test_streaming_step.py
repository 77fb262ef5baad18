"""The streaming step: any chunking of a sequence, stepped from the carried state, answers what
one forward over the whole sequence answers; streams of different chunk lengths share a step;
the state does not grow with the stream."""

from __future__ import annotations

import random

import pytest
import torch
from torch import Tensor

from model import CoupledMambaForSentiment
from model.mamba import SentimentOutput
from model.streaming import StreamState

FIELDS = ("score", "logits", "probabilities", "modality_weights", "emotion_probabilities")

OPTIONS = [
    {"state_coupling": "learned", "pooling": "mean"},
    {"state_coupling": "mean", "pooling": "last", "feature_mixing": True},
    {"state_coupling": "none", "pooling": "max", "norm": "rmsnorm", "fusion": "concat"},
    {"state_coupling": "sum", "pooling": "mean", "d_conv": 2, "n_layers": 1},
]
OPTION_IDS = ["learned-mean", "mean-last-mixing", "none-max", "sum-dconv2"]


def _model(make_model, options) -> CoupledMambaForSentiment:
    model = make_model(scan_backend="torch", emotion_classes=("neutral", "happy", "sad"), **options)
    if options["state_coupling"] == "learned":
        with torch.no_grad():  # a W far from the mean, so that a wrong carry shows
            for layer in model.layers:
                layer.coupling_logits.normal_(std=2.0)
    return model


def _gappy(batch_of, lengths: list[int], seed: int = 0):
    features, masks = batch_of(lengths, seed=seed)
    masks["visual"][0, 3:9] = False  # a gap across chunk borders
    masks["text"][0, :5] = False  # late start
    if len(lengths) > 1:
        masks["audio"][1] = False  # absent in one stream
    return features, masks


def _whole(model, features, masks) -> SentimentOutput:
    model.set_inference_chunk_size(None)
    with torch.no_grad():
        return model(features, masks)


def _assert_same(got: SentimentOutput, want: SentimentOutput, rows=slice(None)) -> None:
    for name in FIELDS:
        g, w = getattr(got, name), getattr(want, name)
        if w is None:
            assert g is None, name
            continue
        torch.testing.assert_close(g, w[rows], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(got.present, want.present[rows])


def _cut(features: dict[str, Tensor], masks: dict[str, Tensor], start: int, end: int):
    return (
        {m: f[:, start:end] for m, f in features.items()},
        {m: k[:, start:end] for m, k in masks.items()},
    )


def _chunkings(length: int) -> dict[str, list[int]]:
    rng = random.Random(7)
    sizes: list[int] = []
    while sum(sizes) < length:
        sizes.append(rng.randint(1, 13))
    sizes[-1] -= sum(sizes) - length
    return {"1": [1] * length, "7": [7] * (length // 7) + [length % 7], "10": [10] * 4,
            "random": sizes}  # fmt: skip


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("chunking", ["1", "7", "10", "random"])
def test_any_chunking_equals_whole_forward(make_model, batch_of, options, chunking) -> None:
    """One stream of 40 steps, stepped in chunks of 1, 7, 10 or random sizes: after every chunk
    the answer is forward's on the prefix, and at the end forward's on the whole."""
    model = _model(make_model, options)
    features, masks = _gappy(batch_of, [40])
    sizes = [s for s in _chunkings(40)[chunking] if s > 0]
    state = model.init_stream_state(1)
    start = 0
    for size in sizes:
        chunk_f, chunk_m = _cut(features, masks, start, start + size)
        out, state = model.step(chunk_f, chunk_m, state)
        start += size
        prefix_f, prefix_m = _cut(features, masks, 0, start)
        if prefix_m["audio"].any():
            _assert_same(out, _whole(model, prefix_f, prefix_m))
    assert start == 40 and int(state.steps[0]) == 40
    _assert_same(out, _whole(model, features, masks))


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_streams_of_different_chunk_lengths_share_a_step(make_model, batch_of, options) -> None:
    """Three streams of different lengths, each tick giving each a different number of steps
    (0 included), padded with noise: each stream's answer is its own forward's, alone."""
    model = _model(make_model, options)
    lengths = [37, 23, 50]
    features, masks = _gappy(batch_of, [50, 50, 50], seed=3)
    rng = random.Random(11)
    state = model.init_stream_state(3)
    done = [0, 0, 0]
    while done != lengths:
        take = [min(rng.randint(0, 9), lengths[i] - done[i]) for i in range(3)]
        width = max(max(take), 1)
        chunk_f = {m: torch.randn(3, width, f.shape[-1]) * 50 for m, f in features.items()}
        chunk_m = {m: torch.ones(3, width, dtype=torch.bool) for m in masks}  # noise "valid"
        for i, n in enumerate(take):
            for m in features:
                chunk_f[m][i, :n] = features[m][i, done[i] : done[i] + n]
                chunk_m[m][i, :n] = masks[m][i, done[i] : done[i] + n]
        before = state
        out, state = model.step(chunk_f, chunk_m, state, lengths=take)
        for i in range(3):
            done[i] += take[i]
            if take[i] == 0:  # a stream without steps keeps its state exactly
                for a, b in zip(before.layers, state.layers, strict=True):
                    assert torch.equal(a.ssm[:, i], b.ssm[:, i])
                    assert torch.equal(a.conv[:, i], b.conv[:, i])
    assert state.steps.tolist() == lengths
    for i, n in enumerate(lengths):
        alone_f, alone_m = _cut(
            {m: f[i : i + 1] for m, f in features.items()},
            {m: k[i : i + 1] for m, k in masks.items()},
            0,
            n,
        )
        _assert_same(
            SentimentOutput(
                **{
                    name: (None if getattr(out, name) is None else getattr(out, name)[i : i + 1])
                    for name in (*FIELDS, "present", "emotion_logits")
                }
            ),
            _whole(model, alone_f, alone_m),
        )


def test_state_size_does_not_grow_with_the_stream(make_model, batch_of) -> None:
    model = _model(make_model, OPTIONS[0])
    state = model.init_stream_state(2)
    sizes = [state.nbytes()]
    for tick in range(30):
        features, masks = batch_of([10, 10], seed=tick)
        _, state = model.step(features, masks, state)
        sizes.append(state.nbytes())
    assert int(state.steps[0]) == 300
    assert len(set(sizes)) == 1, sizes


def test_select_and_cat_round_trip(make_model, batch_of) -> None:
    """Per-stream states gathered into one batch and split again step like the batch does."""
    model = _model(make_model, OPTIONS[0])
    features, masks = batch_of([12, 12], seed=5)
    _, batched = model.step(features, masks, model.init_stream_state(2))
    singles = [model.step(*_cut_row(features, masks, i), model.init_stream_state(1))[1]
               for i in range(2)]  # fmt: skip
    joined = StreamState.cat(singles)
    for a, b in zip(joined.layers, batched.layers, strict=True):
        torch.testing.assert_close(a.ssm, b.ssm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.conv, b.conv, rtol=1e-5, atol=1e-5)
    again = joined.split()
    assert [s.batch_size for s in again] == [1, 1]
    assert torch.equal(again[1].pool_value, joined.pool_value[:, 1:2])


def _cut_row(features, masks, i):
    row = slice(i, i + 1)
    return {m: f[row] for m, f in features.items()}, {m: k[row] for m, k in masks.items()}


def test_bad_lengths_and_state_are_refused(make_model, batch_of) -> None:
    model = _model(make_model, OPTIONS[0])
    features, masks = batch_of([5, 5])
    with pytest.raises(ValueError, match="lengths"):
        model.step(features, masks, model.init_stream_state(2), lengths=[6, 1])
    with pytest.raises(ValueError, match="streams"):
        model.step(features, masks, model.init_stream_state(3))
