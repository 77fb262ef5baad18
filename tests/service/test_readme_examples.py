"""The README's first requests: the files they send exist, are small, credited, and are
answered by a real server (``media_server``: the real extractor on the tiny checkpoint)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def _readme_uploads() -> set[str]:
    text = (REPO / "README.md").read_text()
    return set(re.findall(r"@(examples/[\w./-]+)", text))


def test_the_readme_sends_the_shipped_examples() -> None:
    sent = _readme_uploads()
    assert sent == {"examples/jfk.flac", "examples/features.json"}
    notice = (REPO / "NOTICE").read_text()
    for name in sent:
        path = REPO / name
        assert path.is_file(), name
        assert path.stat().st_size < 1_000_000, f"{name} is over 1 MB"
        assert name in notice, f"{name} is not credited in NOTICE"


def test_the_features_example_is_in_the_default_checkpoint_profile() -> None:
    config = json.loads((REPO / "model/checkpoints/default/config.json").read_text())
    body = json.loads((EXAMPLES / "features.json").read_text())
    assert body["profile"] == config["feature_profile"]
    for modality, steps in body["features"].items():
        assert modality in config["modalities"]
        assert {len(step) for step in steps} == {config["feature_dims"][modality]}


def test_the_sample_clip_is_scored(media_server: Any) -> None:
    clip = EXAMPLES / "jfk.flac"
    response = httpx.post(
        f"{media_server.url}/v1/predict",
        files={"file": (clip.name, clip.read_bytes(), "audio/flac")},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    modalities = response.json()["modalities"]
    assert modalities["used"] == ["text", "audio"]
    assert "fellow americans" in modalities["transcript"].lower()
    assert modalities["audio_seconds"] == 11.0
