"""Audio recipe: pitch, voicing and silence on synthetic signals and on real speech."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing import ExtractorSettings
from preprocessing.audio import AUDIO_DIM, acoustic_frames, audio_on_grid
from preprocessing.media import AUDIO_SAMPLE_RATE, decode_media

SR = AUDIO_SAMPLE_RATE


def _harmonic(f0: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return sum(0.2 / k * np.sin(2 * np.pi * k * f0 * t) for k in range(1, 5)).astype(np.float32)


@pytest.fixture(scope="module")
def tone_noise_silence() -> np.ndarray:
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(SR)).astype(np.float32)
    return np.concatenate([_harmonic(150.0, 1.0), np.zeros(SR, np.float32), noise])


@pytest.mark.parametrize("method", ["yin", "pyin"])
def test_pitch_voicing_and_silence(tone_noise_silence: np.ndarray, method: str) -> None:
    feats, mask = audio_on_grid(tone_noise_silence, 30, 10.0, f0_method=method)
    assert feats.shape == (30, AUDIO_DIM) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    # Tone: voiced at 150 Hz (inner cells; the edges mix with silence).
    assert np.allclose(feats[1:9, 0], np.log(150.0), atol=0.03)
    # Silence is masked; tone and noise are not.
    assert mask[:10].all() and not mask[11:19].any() and mask[21:].all()
    # Noise is loud but unvoiced: log F0 stays 0 in most cells.
    assert (feats[21:29, 0] == 0.0).mean() >= 0.75
    # The dominant chroma of a 150 Hz tone is D (146.8 Hz), the closest pitch class.
    chroma = feats[2:8, 21:33].mean(axis=0)
    assert int(np.argmax(chroma)) == 2


@pytest.mark.parametrize("name", ["jfk", "grid_mp4"])
def test_yin_voicing_agrees_with_pyin_on_speech(clip, name: str) -> None:
    audio = decode_media(clip(name), ExtractorSettings(), audio=True, video=False).audio
    assert audio is not None
    yin = acoustic_frames(audio, "yin")
    pyin = acoustic_frames(audio, "pyin")
    loud = yin.power > 10 ** (-45 / 10)
    agree = (yin.voiced == pyin.voiced)[loud].mean()
    assert agree > 0.8
    both = yin.voiced & pyin.voiced
    semitones = 12 * np.abs(yin.values[both, 0] - pyin.values[both, 0]) / np.log(2)
    assert np.median(semitones) < 0.5


def test_audio_shorter_than_the_grid_masks_the_rest() -> None:
    feats, mask = audio_on_grid(_harmonic(200.0, 0.5), 20, 10.0)
    assert mask[:4].all() and not mask[6:].any()
    assert not feats[6:].any()


def test_digital_silence_is_all_masked() -> None:
    feats, mask = audio_on_grid(np.zeros(2 * SR, np.float32), 20, 10.0)
    assert not mask.any() and feats.shape == (20, AUDIO_DIM)
