"""MMSA pickle reading, grid pooling, the compact cache and batching."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from model.training.data import (
    Sample,
    collate,
    length_bucketed_batches,
    load_dataset,
    load_mmsa_pickle,
    num_batches,
    pool_to_grid,
    save_feature_cache,
)


def test_pool_to_grid_averages_bins_and_repeats_short_input() -> None:
    frames = np.arange(8, dtype=np.float32).reshape(8, 1)
    # 6 true frames onto 3 steps: [0,1], [2,3], [4,5]; frames 6 and 7 are padding
    assert pool_to_grid(frames, 6, 3)[:, 0].tolist() == [0.5, 2.5, 4.5]
    # 2 frames onto 4 steps: each frame repeats
    assert pool_to_grid(frames, 2, 4)[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        pool_to_grid(frames, 0, 3)


def test_mmsa_pickle_respects_lengths_and_zeroes_inf(tiny_mosi: Path) -> None:
    with tiny_mosi.open("rb") as handle:
        raw = pickle.load(handle)
    data = load_mmsa_pickle(tiny_mosi, dtype=np.float32)
    assert data.modalities == ("text", "audio", "visual")
    assert data.feature_dims == {"text": 8, "audio": 3, "visual": 4}
    assert data.metric_set == "mosi"
    assert data.label_scale == (-3.0, 3.0)
    split = raw["train"]
    for i, sample in enumerate(data.splits["train"]):
        t_len = int(split["text_bert"][i, 1].sum())
        assert sample.length == t_len
        text, text_mask = sample.dense("text")
        assert text_mask.all()
        np.testing.assert_allclose(text, split["text"][i, :t_len])
        audio, _ = sample.dense("audio")
        assert np.isfinite(audio).all()
        expected = pool_to_grid(split["audio"][i], split["audio_lengths"][i], t_len)
        np.testing.assert_allclose(audio, expected, rtol=1e-6)
        assert sample.label == pytest.approx(float(split["regression_labels"][i]))
        assert sample.id == f"clip{i}"


def test_mmsa_pickle_aligned_layout_and_modality_choice(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n, length = 4, 5
    split = {
        "text": rng.normal(size=(n, length, 6)).astype(np.float32),
        "audio": rng.normal(size=(n, length, 2)).astype(np.float32),
        "vision": rng.normal(size=(n, length, 3)).astype(np.float32),
        "regression_labels": np.array([0.5, -0.2, 0.9, -1.0], np.float32),
    }
    split["text"][0, 3:] = 0.0  # sample 0 has 3 words
    path = tmp_path / "sims_aligned.pkl"
    with path.open("wb") as handle:
        pickle.dump({"train": split, "valid": split, "test": split}, handle)
    data = load_mmsa_pickle(path, modalities=("text", "audio"))
    assert data.modalities == ("text", "audio")
    assert data.metric_set == "sims" and data.label_scale == (-1.0, 1.0)
    first = data.splits["train"][0]
    assert first.length == 3
    audio, mask = first.dense("audio")
    np.testing.assert_allclose(audio, split["audio"][0, :3], atol=1e-3)  # float16 storage
    assert mask.all()
    with pytest.raises(ValueError, match="no data for modalities"):
        load_mmsa_pickle(path, modalities=("text", "depth"))


def test_from_dense_keeps_runs_once_and_round_trips() -> None:
    features = np.array([[1, 1], [1, 1], [2, 2], [2, 2], [0, 0], [2, 2]], np.float32)
    mask = np.array([True, True, True, True, False, True])
    sample = Sample.from_dense("a", 1.0, {"text": features}, {"text": mask})
    # runs [1,1]x2, [2,2]x2, gap, [2,2] after the gap starts a new row
    assert sample.rows["text"].shape == (3, 2)
    assert sample.index["text"].tolist() == [0, 0, 1, 1, -1, 2]
    dense, dense_mask = sample.dense("text")
    np.testing.assert_array_equal(dense[mask], features[mask])
    np.testing.assert_array_equal(dense_mask, mask)


def test_feature_cache_round_trip(tiny_mosi: Path, tmp_path: Path) -> None:
    data = load_mmsa_pickle(tiny_mosi)
    data.splits["train"][0].group = "tweets"
    cache = tmp_path / "cache.npz"
    save_feature_cache(data, cache)
    again = load_dataset(cache)
    assert again.summary() == data.summary()
    for split in ("train", "valid", "test"):
        for a, b in zip(data.splits[split], again.splits[split], strict=True):
            assert (a.id, a.label, a.length, a.group) == (b.id, b.label, b.length, b.group)
            for m in data.modalities:
                np.testing.assert_array_equal(a.dense(m)[0], b.dense(m)[0])
    text_only = load_dataset(cache, modalities=("text",))
    assert text_only.modalities == ("text",)


def test_collate_pads_and_masks() -> None:
    a = Sample.from_dense("a", 1.0, {"text": np.ones((3, 2))}, {"text": np.ones(3, bool)})
    b = Sample.from_dense("b", -1.0, {"text": np.full((5, 2), 2.0)}, {"text": np.ones(5, bool)})
    batch = collate([a, b], ("text",))
    assert tuple(batch.features["text"].shape) == (2, 5, 2)
    assert batch.masks["text"].sum(dim=1).tolist() == [3, 5]
    assert batch.features["text"][0, 3:].abs().sum() == 0
    assert batch.labels.tolist() == [1.0, -1.0]
    cut = collate([a, b], ("text",), max_length=4)
    assert tuple(cut.features["text"].shape) == (2, 4, 2)


def test_bucketed_batches_cover_every_sample_once() -> None:
    import random

    samples = [
        Sample.from_dense(
            str(i), 0.0, {"text": np.ones((1 + i % 7, 1))}, {"text": np.ones(1 + i % 7, bool)}
        )
        for i in range(203)
    ]
    batches = list(length_bucketed_batches(samples, 8, random.Random(0)))
    assert len(batches) == num_batches(203, 8)
    assert sorted(s.id for b in batches for s in b) == sorted(s.id for s in samples)
    again = list(length_bucketed_batches(samples, 8, random.Random(0)))
    assert [[s.id for s in b] for b in batches] == [[s.id for s in b] for b in again]
