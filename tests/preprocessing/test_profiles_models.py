"""Feature profiles, settings validation and the pinned-model checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from preprocessing import PROFILES, ExtractorSettings, get_profile
from preprocessing.asr import SpeechRecognizer
from preprocessing.errors import ModelLoadError
from preprocessing.models import (
    ASR_MODEL_FILE,
    ASR_MODEL_SHA256,
    bundled_asr_model_dir,
    bundled_text_model_dir,
    sha256_file,
    verify_model_file,
)
from preprocessing.text import TextEncoder


def test_profiles() -> None:
    expected = {
        "default-v1": (384, 33, 17),
        "mmsa-mosei": (768, 74, 35),
        "mmsa-sims": (768, 33, 709),
        "mmsa-simsv2": (768, 25, 177),
    }
    for name, dims in expected.items():
        profile = get_profile(name)
        assert tuple(profile.dims[m] for m in ("text", "audio", "visual")) == dims
        assert profile.has_extractor == (name == "default-v1")
    default = PROFILES["default-v1"]
    assert default.rate_hz == 10.0
    for modality, names in default.names.items():
        assert len(names) == default.dims[modality] == len(set(names))
    with pytest.raises(KeyError, match="known"):
        get_profile("mosi")


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="f0_method"):
        ExtractorSettings(f0_method="crepe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        ExtractorSettings(rate_hz=0)


def test_import_is_light() -> None:
    code = (
        "import sys, preprocessing, preprocessing.text, preprocessing.media;"
        "heavy = {'torch', 'transformers', 'librosa', 'mediapipe', 'faster_whisper', 'av', 'cv2'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bundled_models_match_their_pins() -> None:
    verify_model_file(bundled_asr_model_dir() / ASR_MODEL_FILE, ASR_MODEL_SHA256)
    assert (bundled_text_model_dir() / "model.safetensors").is_file()


def test_a_changed_model_file_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "model.bin"
    fake.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="sha256"):
        verify_model_file(fake, ASR_MODEL_SHA256)
    assert sha256_file(fake) != ASR_MODEL_SHA256
    # A custom ASR folder with a hash that does not match is refused at load.
    recognizer = SpeechRecognizer(
        ExtractorSettings(asr_model_dir=tmp_path, asr_model_sha256=ASR_MODEL_SHA256)
    )
    with pytest.raises(ModelLoadError, match="sha256"):
        recognizer.load()
    # Without a hash, a folder that is not a CTranslate2 model fails with a clear error.
    with pytest.raises(ModelLoadError, match="ASR model"):
        SpeechRecognizer(ExtractorSettings(asr_model_dir=tmp_path)).load()
    with pytest.raises(ModelLoadError, match="missing"):
        SpeechRecognizer(
            ExtractorSettings(asr_model_dir=tmp_path / "nowhere", asr_model_sha256="0" * 64)
        ).load()
    with pytest.raises(ModelLoadError, match="text model"):
        TextEncoder(tmp_path).load()


def test_tuned_text_profile_changes_only_the_text_encoder(tmp_path: Path) -> None:
    from preprocessing import Extractor

    plain, tuned = PROFILES["default-v1"], PROFILES["tuned-text-v1"]
    assert dict(tuned.dims) == dict(plain.dims) and tuned.rate_hz == plain.rate_hz
    assert tuned.has_extractor
    for modality in ("audio", "visual"):
        assert tuned.names[modality] == plain.names[modality]
        assert tuned.sources[modality] == plain.sources[modality]
    assert tuned.sources["text"] != plain.sources["text"]
    assert Extractor().profile is plain
    layers = tmp_path / "text_encoder.safetensors"
    assert Extractor(ExtractorSettings(text_tuning_path=layers)).profile is tuned
