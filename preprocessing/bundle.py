"""The extractor's output: features on one time grid, masks, what was found, timings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from preprocessing.profiles import MODALITIES


@dataclass(frozen=True)
class MediaSummary:
    """What the extractor found in a clip (the service's ``modalities`` block)."""

    transcript: str | None  # the caller's transcript, the ASR text, or None (no speech)
    transcript_source: str | None  # "client", "asr" or None
    audio_seconds: float  # seconds of decoded audio (0.0 when there is no audio stream)
    frames: int  # video frames sampled for the visual modality
    frames_with_face: int
    duration_s: float  # clip duration that the grid covers
    container: str  # detected from the bytes, e.g. "mp4", "matroska", "flac"
    has_audio: bool
    has_video: bool
    present: tuple[str, ...] = ()  # requested modalities with at least one valid grid step

    def as_dict(self) -> dict[str, Any]:
        """Plain-JSON view of the summary."""
        out = asdict(self)
        out["present"] = list(self.present)
        return out

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


@dataclass
class FeatureBundle:
    """Features of one clip on a shared time grid.

    ``features[m]`` is float32 ``(length, F_m)`` and ``masks[m]`` bool ``(length,)`` (True = a
    valid step) for every requested modality ``m``. A requested modality that the clip lacks
    (no speech, no audio track, no video, no face) is all zeros with an all-False mask.
    """

    profile: str
    rate_hz: float
    length: int
    features: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    summary: MediaSummary
    timings_ms: dict[str, float] = field(default_factory=dict)
    segments: list[tuple[float, float, str]] = field(default_factory=list)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities present in ``features`` (requested ones), in canonical order."""
        return tuple(m for m in MODALITIES if m in self.features)

    def present(self, modality: str) -> bool:
        """True when ``modality`` was requested and has at least one valid step."""
        mask = self.masks.get(modality)
        return bool(mask is not None and mask.any())
