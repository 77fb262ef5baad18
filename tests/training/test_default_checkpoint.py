"""The embedded default checkpoint: pinned hash, declared modalities, sensible scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from model import CheckpointError, load_checkpoint
from model.checkpoints import (
    DEFAULT_CHECKPOINT_SHA256,
    default_checkpoint_path,
    load_default_checkpoint,
)
from model.training.data import Sample
from model.training.trainer import predict_scores


def test_default_checkpoint_is_small_and_declares_text_only() -> None:
    folder = default_checkpoint_path()
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 20 * 1024 * 1024
    assert len(DEFAULT_CHECKPOINT_SHA256) == 64
    config = json.loads((folder / "config.json").read_text())
    assert config["modalities"] == ["text"]
    assert config["feature_profile"] == "default-v1"
    assert config["label_scale"] == [-3.0, 3.0]
    card = (folder / "MODEL_CARD.md").read_text()
    assert "CMU-MOSEI" in card and "VADER" in card


def test_tampered_default_checkpoint_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "default"
    shutil.copytree(default_checkpoint_path(), copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit in the last tensor's data
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(copy, expected_sha256=DEFAULT_CHECKPOINT_SHA256)


def test_default_checkpoint_orders_clear_sentiment() -> None:
    from preprocessing.dataset import encode_texts_on_grid

    model = load_default_checkpoint()
    texts = [
        "This is a wonderful, beautiful film and I loved every minute of it.",
        "What a terrible, boring waste of time; I hated it.",
        "The meeting is at three o'clock in room B.",
    ]
    encoded = encode_texts_on_grid(texts)
    samples = [
        Sample.from_dense(str(i), 0.0, {"text": f}, {"text": m}, dtype=np.float32)
        for i, (f, m) in enumerate(encoded)
    ]
    positive, negative, neutral = predict_scores(model, samples)
    assert positive > 1.0 and negative < -1.0
    assert negative < neutral < positive
