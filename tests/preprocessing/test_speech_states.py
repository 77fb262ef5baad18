"""Whisper encoder states as the audio modality (preprocessing.speech_states), with the real
tiny.en model on the shared clips."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from preprocessing.asr import SpeechRecognizer
from preprocessing.audio import audio_sound_mask
from preprocessing.grid import grid_length
from preprocessing.media import decode_media
from preprocessing.settings import ExtractorSettings
from preprocessing.speech_states import (
    FRAME_S,
    SPEECH_STATE_DIM,
    encode_windows,
    states_on_grid,
)

from .conftest import write_wav

SR = 16_000


@pytest.fixture(scope="module")
def recognizer() -> SpeechRecognizer:
    rec = SpeechRecognizer(ExtractorSettings())
    rec.load()
    return rec


@pytest.fixture(scope="module")
def speech(clip: Callable[[str], Path]) -> np.ndarray:
    """The CREMA-D angry clip's audio ("Don't forget a jacket", ~2.3 s)."""
    audio = decode_media(clip("ang_mp4"), ExtractorSettings(), audio=True, video=False).audio
    assert audio is not None
    return audio


def direct_encoding(whisper: Any, audio: np.ndarray, window: int) -> np.ndarray:
    """Encoder frames of one 30 s window, computed here without preprocessing.speech_states:
    the whole clip's log-Mel, frames [3000 k, 3000 (k + 1)), zero-padded, one encoder call."""
    from faster_whisper.audio import pad_or_trim

    mel = whisper.feature_extractor(audio)
    content = mel.shape[-1] - 1
    seek = 3000 * window
    segment = pad_or_trim(mel[:, seek : min(seek + 3000, content)])
    return np.asarray(whisper.encode(segment), dtype=np.float32)[0]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), np.float32)


def test_grid_shape_silence_and_past_end_are_masked(
    recognizer: SpeechRecognizer, speech: np.ndarray
) -> None:
    audio = np.concatenate([silence(1.0), speech, silence(1.0)])
    windows = encode_windows(recognizer.whisper, audio)
    assert len(windows) == 1 and windows[0].start_s == 0.0
    assert len(windows[0].states) == int(np.ceil(len(audio) / SR / FRAME_S - 1e-9))
    length = grid_length(len(audio) / SR, 10.0) + 7  # 7 steps past the end of the audio
    feats, mask = states_on_grid(windows, audio, length, 10.0)
    assert feats.shape == (length, SPEECH_STATE_DIM) and feats.dtype == np.float32
    assert mask.shape == (length,) and mask.dtype == bool
    assert not mask[:10].any()  # the leading second of digital silence
    assert not mask[-7 - 10 :].any()  # the trailing silence and the steps past the end
    speaking = slice(12, 10 + int(len(speech) / SR * 10) - 2)
    assert mask[speaking].mean() > 0.8
    assert np.all(feats[~mask] == 0.0)
    assert np.all(np.abs(feats[mask]).sum(axis=1) > 0)
    # The same silence rule as the librosa features, and only where there are frames.
    assert np.array_equal(mask[:-7], audio_sound_mask(audio, length - 7, 10.0))
    # A step is the mean of its five 20 ms frames.
    step = int(np.flatnonzero(mask)[3])
    np.testing.assert_allclose(
        feats[step], windows[0].states[5 * step : 5 * step + 5].mean(axis=0), rtol=1e-5, atol=1e-5
    )


def test_reuse_gives_the_direct_encoding_and_no_second_encoder_run(
    recognizer: SpeechRecognizer, speech: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    whisper = recognizer.whisper
    direct = direct_encoding(whisper, speech, 0)
    calls = []
    original = type(whisper).encode

    def counting(features: Any) -> Any:
        calls.append(features.shape)
        return original(whisper, features)

    monkeypatch.setattr(whisper, "encode", counting)  # the decoder's own encoder calls
    result = recognizer.transcribe_with_states(speech)
    monkeypatch.undo()
    assert calls == []  # the decoder took the kept window: one encoder pass in all
    assert "jacket" in result.text.lower()
    assert [w.text.strip(".,").lower() for w in result.words][-1] == "jacket"
    assert result.windows is not None and len(result.windows) == 1
    n = len(result.windows[0].states)
    assert n == int(np.ceil(len(speech) / SR / FRAME_S - 1e-9))
    np.testing.assert_array_equal(result.windows[0].states, direct[:n])
    # The transcript is the one the speech-only (VAD-spliced) path gives on this clip.
    assert result.text == recognizer.transcribe(speech).text


def test_a_voice_without_words_still_has_states(recognizer: SpeechRecognizer) -> None:
    t = np.arange(2 * SR) / SR
    hum = (0.2 * np.sin(2 * np.pi * 180 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(
        np.float32
    )
    result = recognizer.transcribe_with_states(hum)
    assert result.words == []
    assert result.windows is not None
    feats, mask = states_on_grid(result.windows, hum, 20, 10.0)
    assert mask.all() and np.all(np.abs(feats).sum(axis=1) > 0)


def test_long_audio_windows_are_placed_at_their_times(
    recognizer: SpeechRecognizer, speech: np.ndarray, clip: Callable[[str], Path]
) -> None:
    jfk = decode_media(clip("jfk"), ExtractorSettings(), audio=True, video=False).audio
    assert jfk is not None
    # jfk 0-11 s, silence to 36 s, the angry clip at 36 s, 2 s of silence after it.
    audio = np.concatenate([jfk, silence(36.0 - len(jfk) / SR), speech, silence(2.0)])
    duration = len(audio) / SR
    windows = encode_windows(recognizer.whisper, audio)
    assert [w.start_s for w in windows] == [0.0, 30.0]
    assert len(windows[0].states) == 1500
    assert len(windows[1].states) == int(np.ceil((duration - 30.0) / FRAME_S - 1e-9))
    length = grid_length(duration, 10.0)
    feats, mask = states_on_grid(windows, audio, length, 10.0)
    assert mask[5:100].mean() > 0.7  # jfk
    assert not mask[120:355].any()  # the silence across the window boundary
    assert mask[365:374].all()  # the angry clip (36.0-38.3 s), in the second window
    assert not mask[-15:].any()
    # Steps of the second window are its own frames at their true times (direct encoding).
    direct = direct_encoding(recognizer.whisper, audio, 1)
    for step in (366, 372):
        assert mask[step]
        frame = round((step / 10.0 - 30.0) / FRAME_S)
        np.testing.assert_allclose(
            feats[step], direct[frame : frame + 5].mean(axis=0), rtol=1e-4, atol=1e-4
        )
    # The transcription reuses the windows and still hears both utterances.
    result = recognizer.transcribe_with_states(audio)
    assert "americans" in result.text.lower() and "jacket" in result.text.lower()
    assert result.windows is not None
    for kept, fresh in zip(result.windows, windows, strict=True):
        np.testing.assert_array_equal(kept.states, fresh.states)


def test_extractor_whisper_audio_with_asr_and_with_a_transcript(
    extractor: Any, clip: Callable[[str], Path], tmp_path: Path
) -> None:
    from preprocessing import Extractor

    settings = dataclasses.replace(extractor.settings, audio_features="whisper")
    whisper_ex = Extractor(
        settings, ("text", "audio"), recognizer=extractor.recognizer, text_encoder=None
    )
    assert whisper_ex.dims["audio"] == SPEECH_STATE_DIM
    with_asr = whisper_ex.extract(clip("hap_mp4"))
    typed = whisper_ex.extract(clip("hap_mp4"), transcript="Don't forget a jacket")
    assert with_asr.summary.transcript_source == "asr"
    assert typed.summary.transcript_source == "client"
    for bundle in (with_asr, typed):
        assert bundle.features["audio"].shape == (bundle.length, SPEECH_STATE_DIM)
        assert bundle.masks["audio"].mean() > 0.6
    # The ASR's encoder pass and the encode-only pass give the same states.
    np.testing.assert_array_equal(with_asr.features["audio"], typed.features["audio"])
    np.testing.assert_array_equal(with_asr.masks["audio"], typed.masks["audio"])
    # Audio alone (no text requested) gives them too.
    audio_only = Extractor(settings, ("audio",), recognizer=extractor.recognizer)
    np.testing.assert_array_equal(
        audio_only.extract(clip("hap_mp4")).features["audio"], typed.features["audio"]
    )
    # A voice with no words: no text, but audio features.
    t = np.arange(2 * SR) / SR
    hum = 0.2 * np.sin(2 * np.pi * 180 * t)
    bundle = whisper_ex.extract(write_wav(tmp_path / "hum.wav", hum))
    assert not bundle.masks["text"].any()
    assert bundle.masks["audio"].all()
    assert bundle.summary.present == ("audio",)
