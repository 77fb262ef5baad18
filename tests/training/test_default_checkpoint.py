"""The embedded default checkpoint: pinned hash, declared modalities, sensible scores."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model import CheckpointError, load_checkpoint
from model.checkpoints import (
    DEFAULT_CHECKPOINT_SHA256,
    DEFAULT_TEXT_ENCODER_SHA256,
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
    assert config["feature_profile"] == "tuned-text-v1"
    encoder = folder / "text_encoder.safetensors"
    assert config["text_encoder"]["sha256"] == DEFAULT_TEXT_ENCODER_SHA256
    assert weights.stat().st_size + encoder.stat().st_size <= 20 * 1024 * 1024
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
    encoded = encode_texts_on_grid(texts, default_text_encoder(model))
    samples = [
        Sample.from_dense(str(i), 0.0, {"text": f}, {"text": m}, dtype=np.float32)
        for i, (f, m) in enumerate(encoded)
    ]
    positive, negative, neutral = predict_scores(model, samples)
    assert positive > 1.0 and negative < -1.0
    assert negative < neutral < positive


def default_text_encoder(model: Any) -> Any:
    from preprocessing.text import TextEncoder

    tuning = model.checkpoint_info.text_encoder
    return TextEncoder(tuning=tuning["path"], tuning_sha256=tuning["sha256"])


def test_tampered_text_encoder_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "default"
    shutil.copytree(default_checkpoint_path(), copy)
    layers = copy / "text_encoder.safetensors"
    data = bytearray(layers.read_bytes())
    data[-1] ^= 0x01
    layers.write_bytes(bytes(data))
    config = json.loads((copy / "config.json").read_text())
    config["text_encoder"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()  # consistent...
    (copy / "config.json").write_text(json.dumps(config))
    load_checkpoint(copy)  # ...so only the pinned hash can tell
    with pytest.raises(CheckpointError, match="text encoder sha256"):
        load_checkpoint(copy, expected_text_encoder_sha256=DEFAULT_TEXT_ENCODER_SHA256)


def test_service_serves_the_default_with_its_own_text_encoder(shared_media: Path) -> None:
    """Through the app: the answer for a clip and a transcript equals the offline pipeline with
    the checkpoint's tuned encoder, and differs from the plain encoder's features."""
    from fastapi.testclient import TestClient

    from preprocessing import Extractor, ExtractorSettings
    from service.main import create_app
    from service.settings import ServiceSettings

    model = load_default_checkpoint()
    clip = shared_media / "cremad_1001_DFA_HAP_XX.mp4"
    transcript = "I am so happy and grateful, this is wonderful news"
    app = create_app(ServiceSettings(torch_threads=1, max_batch_delay_ms=1.0))
    with TestClient(app) as client:
        assert app.state.core.wait_started(120)
        name = model.checkpoint_info.name
        meta = client.get(f"/v2/models/{name}").json()
        assert meta["feature_profile"] == "tuned-text-v1"
        assert meta["checkpoint"]["text_encoder"]["sha256"] == DEFAULT_TEXT_ENCODER_SHA256
        response = client.post(
            "/v1/predict",
            files={"file": (clip.name, clip.read_bytes(), "video/mp4")},
            data={"transcript": transcript},
        )
    assert response.status_code == 200, response.text
    served = response.json()["sentiment"]["score"]

    def offline(settings: ExtractorSettings) -> float:
        bundle = Extractor(settings, modalities=("text",)).extract(clip, transcript=transcript)
        features = {"text": torch.from_numpy(bundle.features["text"])[None].float()}
        masks = {"text": torch.from_numpy(bundle.masks["text"])[None]}
        with torch.no_grad():
            return float(model(features, masks).score[0])

    tuning = model.checkpoint_info.text_encoder
    tuned = offline(ExtractorSettings(text_tuning_path=Path(tuning["path"])))
    plain = offline(ExtractorSettings())
    assert served == pytest.approx(tuned, abs=1e-4)
    assert abs(plain - tuned) > 1e-3
