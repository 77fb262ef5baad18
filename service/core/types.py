"""Plain data passed between the HTTP layer, the inference core and the model backend."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.config import CLASS_NAMES as CLASS_NAMES  # the model's class order, re-exported

MEDIA_STAGES: tuple[str, ...] = ("decode", "asr", "text", "audio", "visual")
"""Feature extraction stages, as reported by the extractor."""

Attribution = dict[str, float | None]
"""``{text, audio, visual}``: how far masking each modality moves the score; None for a
modality the checkpoint lacks (:mod:`service.core.attribution`)."""


@dataclass(frozen=True)
class ClipFeatures:
    """One clip's features on one time grid, ready for the model.

    ``features[m]`` is float32 ``(length, F_m)`` and ``masks[m]`` bool ``(length,)`` (True =
    valid step) for each modality present; modalities the model knows but the clip lacks are
    simply absent.
    """

    features: Mapping[str, np.ndarray]
    masks: Mapping[str, np.ndarray]
    length: int


@dataclass(frozen=True)
class MemorySnapshot:
    """Accelerator memory after a model call; every byte count is None on a CPU host."""

    device: str
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    total_bytes: int | None = None


@dataclass(frozen=True)
class ClipResult:
    """The model's answer for one clip."""

    score: float
    probabilities: tuple[float, ...]
    emotions: Mapping[str, float] | None = None  # {emotion: probability} with an emotion head


@dataclass(frozen=True)
class ClipOutcome:
    """What the model worker hands back for one clip: a result or the error that stopped it."""

    result: ClipResult | None
    error: BaseException | None
    model_ms: float
    batch_size: int
    padded_length: int
    memory: MemorySnapshot
    queue_ms: float = 0.0


@dataclass(frozen=True)
class ModelIdentity:
    """Which model answers, on which device and scan backend."""

    name: str
    version: str
    device: str
    scan_backend: str


@dataclass
class Prediction:
    """A full answer for one request, independent of how it arrived (HTTP or CLI)."""

    score: float
    label: str
    probabilities: dict[str, float]
    modalities: dict[str, Any]
    timings_ms: dict[str, float]
    gpu_memory: MemorySnapshot
    model: ModelIdentity
    batch_size: int
    padded_length: int
    attribution: Attribution | None = None  # when asked for
    emotions: dict[str, float] | None = None


@dataclass(frozen=True)
class StreamRows:
    """New rows of one live stream: float32 ``(length, F_m)`` features and bool ``(length,)``
    masks per modality (as in :class:`ClipFeatures`; ``length`` may be 0)."""

    features: Mapping[str, np.ndarray]
    masks: Mapping[str, np.ndarray]
    length: int


@dataclass(frozen=True)
class StreamStep:
    """One stream's part of a batched model step: its model state and its new rows."""

    state: Any  # model.streaming.StreamState (a torch object; only the runner reads it)
    rows: StreamRows


@dataclass(frozen=True)
class StreamStepOutcome:
    """What the model worker hands back for one stream: its answer on everything so far and
    its new state, or the error (the state is then the old one)."""

    result: ClipResult | None
    state: Any
    error: BaseException | None
    model_ms: float
    used: tuple[str, ...] = ()
    """modalities with at least one valid step so far"""
