"""Response assembly: the one way every use case reports a request.

Timings (``timings_ms``: the extraction stages, then ``queue``, ``model`` and ``total``), the
stage metrics and GPU memory gauges they feed, the ``modalities`` summary, the
:class:`Prediction` of a clip, and the model metadata of ``/v2/models/{name}``. The HTTP layer
only renders what is assembled here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.core.extraction import FeatureBundleLike
from service.core.trace_context import note_timings
from service.core.types import (
    CLASS_NAMES,
    MEDIA_STAGES,
    Attribution,
    ClipFeatures,
    ClipOutcome,
    MemorySnapshot,
    ModelIdentity,
    Prediction,
)
from service.metrics import ServiceMetrics

if TYPE_CHECKING:
    from model import CheckpointInfo, CoupledMambaConfig


def extraction_timings(
    bundle: FeatureBundleLike, *, upload_ms: float, wait_ms: float
) -> dict[str, float]:
    """The stages before the model of a media request: the extractor's own, the upload and the
    wait for a pool thread."""
    stages = {stage: float(ms) for stage, ms in bundle.timings_ms.items()}
    stages["upload"] = upload_ms
    stages["extract_wait"] = wait_ms
    return stages


def request_timings(
    *,
    started: float,
    queue_ms: float,
    model_ms: float,
    extraction: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """A request's ``timings_ms``: every media stage (0 where it did not run), then the other
    extraction stages, ``queue``, ``model``, and ``total`` since ``started``
    (``time.perf_counter()``)."""
    timings = dict.fromkeys(MEDIA_STAGES, 0.0)
    if extraction:
        timings.update(extraction)
    timings["queue"] = queue_ms
    timings["model"] = model_ms
    timings["total"] = (time.perf_counter() - started) * 1000.0
    return timings


def publish_memory(metrics: ServiceMetrics, memory: MemorySnapshot) -> None:
    """Set the GPU memory gauges (nothing on a CPU host)."""
    if memory.allocated_bytes is not None:
        metrics.gpu_allocated.set(memory.allocated_bytes)
        metrics.gpu_reserved.set(memory.reserved_bytes or 0)
        metrics.gpu_peak.set(memory.peak_allocated_bytes or 0)


def record(metrics: ServiceMetrics, timings: Mapping[str, float], memory: MemorySnapshot) -> None:
    """Record a finished request: its stages (metrics, and its trace when it has one) and the
    memory after its last model call."""
    publish_memory(metrics, memory)
    metrics.observe_stages(dict(timings))
    note_timings(timings)


def media_summary(summary: Any) -> dict[str, Any]:
    """What the extractor found in the media (transcript, audio seconds, frames...), as the
    answer's ``modalities`` report it."""
    as_dict = getattr(summary, "as_dict", None)
    out = dict(as_dict() if as_dict is not None else summary)
    out.pop("present", None)  # the answer's "used" says it
    return out


def features_summary(transcript: str | None) -> dict[str, Any]:
    """The ``modalities`` summary of precomputed features: only the transcript, if sent."""
    return {
        "transcript": transcript,
        "audio_seconds": None,
        "frames": None,
        "frames_with_face": None,
    }


def prediction(
    clip: ClipFeatures,
    outcome: ClipOutcome,
    summary: Mapping[str, Any],
    timings: dict[str, float],
    model: ModelIdentity,
    attribution: Attribution | None = None,
) -> Prediction:
    """The answer for one scored clip."""
    assert outcome.result is not None
    probabilities = outcome.result.probabilities
    best = int(np.argmax(probabilities))
    modalities = {
        "used": [m for m, mask in clip.masks.items() if bool(mask.any())],
        "steps": clip.length,
        **summary,
    }
    return Prediction(
        score=outcome.result.score,
        label=CLASS_NAMES[best],
        probabilities=dict(zip(CLASS_NAMES, probabilities, strict=True)),
        modalities=modalities,
        timings_ms=timings,
        gpu_memory=outcome.memory,
        model=model,
        batch_size=outcome.batch_size,
        padded_length=outcome.padded_length,
        attribution=attribution,
        emotions=dict(outcome.result.emotions) if outcome.result.emotions else None,
    )


MASK_SUFFIX = "_mask"
"""A modality's mask input is named ``<modality>_mask`` (``text_mask``...)."""


def tensor_inputs(config: CoupledMambaConfig) -> list[dict[str, Any]]:
    """The model's inputs as Open Inference Protocol tensors: each modality FP32
    ``[batch, steps, features]``, then each modality's optional BOOL mask ``[batch, steps]``
    (True = valid step; all valid when left out). A modality may be left out too."""
    features = [
        {"name": m, "datatype": "FP32", "shape": [-1, -1, config.feature_dims[m]]}
        for m in config.modalities
    ]
    masks = [
        {"name": m + MASK_SUFFIX, "datatype": "BOOL", "shape": [-1, -1]} for m in config.modalities
    ]
    return features + masks


def tensor_outputs(config: CoupledMambaConfig) -> list[dict[str, Any]]:
    """The model's outputs as Open Inference Protocol tensors: ``score`` FP32 ``[batch]``,
    ``probabilities`` FP32 ``[batch, classes]`` (``CLASS_NAMES`` order), and ``emotions`` FP32
    ``[batch, emotion classes]`` where the checkpoint has an emotion head."""
    outputs: list[dict[str, Any]] = [
        {"name": "score", "datatype": "FP32", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(CLASS_NAMES)]},
    ]
    if config.emotion_classes:
        outputs.append(
            {"name": "emotions", "datatype": "FP32", "shape": [-1, len(config.emotion_classes)]}
        )
    return outputs


def model_metadata(
    identity: ModelIdentity,
    config: CoupledMambaConfig,
    architecture: Mapping[str, Any],
    info: CheckpointInfo | None,
) -> dict[str, Any]:
    """The served model's metadata and card (``/v2/models/{name}``)."""
    return {
        "name": identity.name,
        "versions": [identity.version],
        "platform": "pytorch",
        "device": identity.device,
        "scan_backend": identity.scan_backend,
        "feature_profile": config.feature_profile,
        "modalities": list(config.modalities),
        "inputs": tensor_inputs(config),
        "outputs": tensor_outputs(config),
        "emotion_classes": list(config.emotion_classes),
        "label_scale": list(config.label_scale),
        "classes": list(CLASS_NAMES),
        "architecture": dict(architecture),
        "checkpoint": {
            # The folder's name only: where it lies on the server is nobody's business.
            "name": Path(info.path).name if info else None,
            "sha256": info.sha256 if info else None,
            "training": info.training if info else {},
            "metrics": info.metrics if info else {},
            "text_encoder": _without_path(info.text_encoder if info else None),
            "face_encoder": _without_path(info.face_encoder if info else None),
        },
        "model_card": info.model_card if info else None,
    }


def _without_path(section: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A checkpoint's encoder section as clients see it: without the file's server path."""
    return {k: v for k, v in section.items() if k != "path"} if section else None
