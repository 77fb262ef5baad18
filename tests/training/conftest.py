"""Fixtures for the training tests: tiny datasets in the MMSA pickle layout."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest


def make_mmsa_split(
    rng: np.random.Generator,
    n: int,
    dims: tuple[int, int, int] = (8, 3, 4),
    padded: tuple[int, int, int] = (6, 10, 5),
) -> dict[str, Any]:
    """A split in MMSA's unaligned layout whose labels follow the text features.

    Label = 3 * tanh(mean of text feature 0 over the true tokens); audio is -inf past its true
    length (as in MOSI/MOSEI), vision zero-padded.
    """
    dt, da, dv = dims
    lt, la, lv = padded
    text = np.zeros((n, lt, dt), np.float32)
    audio = np.full((n, la, da), -np.inf, np.float32)
    vision = np.zeros((n, lv, dv), np.float32)
    bert = np.zeros((n, 3, lt), np.float32)
    t_len = rng.integers(2, lt + 1, size=n)
    a_len = rng.integers(1, la + 1, size=n)
    v_len = rng.integers(1, lv + 1, size=n)
    labels = np.zeros(n, np.float32)
    for i in range(n):
        text[i, : t_len[i]] = rng.normal(size=(t_len[i], dt))
        bert[i, 1, : t_len[i]] = 1
        audio[i, : a_len[i]] = rng.normal(size=(a_len[i], da))
        vision[i, : v_len[i]] = rng.normal(size=(v_len[i], dv))
        labels[i] = 3.0 * np.tanh(text[i, : t_len[i], 0].mean() * 2.0)
    return {
        "id": [f"clip{i}" for i in range(n)],
        "raw_text": ["" for _ in range(n)],
        "text": text,
        "text_bert": bert,
        "audio": audio,
        "vision": vision,
        "audio_lengths": a_len.tolist(),
        "vision_lengths": v_len.tolist(),
        "regression_labels": labels,
    }


def write_mmsa_pickle(path: Path, sizes: tuple[int, int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    data = {
        split: make_mmsa_split(rng, n)
        for split, n in zip(("train", "valid", "test"), sizes, strict=True)
    }
    with path.open("wb") as handle:
        pickle.dump(data, handle)
    return path


@pytest.fixture
def tiny_mosi(tmp_path: Path) -> Path:
    """A generated MOSI-like pickle: 64 train, 16 valid, 16 test samples."""
    return write_mmsa_pickle(tmp_path / "tiny_mosi_unaligned.pkl", (64, 16, 16))
