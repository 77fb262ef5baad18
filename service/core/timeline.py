"""Sentiment over time: segmentation of a clip and per-modality attribution.

A clip's feature grid is cut into **segments**: the ASR's utterances (``FeatureBundle.segments``),
with the stretches between them longer than ``min_gap_s`` (and the whole clip when nobody speaks)
covered by fixed windows of ``window_s``. Utterances longer than ``max_segment_s`` are cut into
equal parts. Each segment is scored on its own slice of the grid.

**Attribution** (occlusion by modality): for a clip ``x`` and a modality ``m`` of the checkpoint,

    attribution[m] = score(x) - score(x with every step of m masked)

i.e. how far the score moves because the model saw ``m``. Masking is the model's own notion of an
absent modality (padding and absence never change an output), so the ablated clip is simply the
clip without ``m``. It costs one extra clip per modality; all of them go through the micro-batcher
together with the full clips, so they share model calls. A modality the segment has no valid step
of gets exactly 0 (nothing to remove, nothing is run); one the checkpoint lacks gets None.
Attributions need not add up to the score: the model is not additive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from model.config import MODALITY_ORDER
from service.core.types import CLASS_NAMES, ClipFeatures, ClipResult
from service.errors import UndecodableMediaError

if TYPE_CHECKING:
    from service.core.engine import InferenceCore
    from service.core.extraction import FeatureBundleLike


@dataclass(frozen=True)
class Segment:
    """A stretch of the clip ``[start_s, end_s)``; ``transcript`` is None for a fixed window."""

    start_s: float
    end_s: float
    transcript: str | None
    source: str  # "speech" (an ASR utterance) or "window" (a fixed window)


def plan_segments(
    utterances: Sequence[tuple[float, float, str]],
    duration_s: float,
    *,
    window_s: float = 5.0,
    min_gap_s: float = 2.0,
    max_segment_s: float = 30.0,
) -> list[Segment]:
    """Cut ``[0, duration_s)`` into segments: utterances, and fixed windows where nobody speaks.

    Args:
        utterances: ``(start_s, end_s, text)`` from the ASR, in any order (may overlap).
        duration_s: the clip's duration.
        window_s: length of a fixed window (the last one of a stretch may be shorter).
        min_gap_s: silent stretches shorter than this are left out (they belong to no segment).
        max_segment_s: longer utterances are cut into equal parts (each keeps the whole text).
    """
    if duration_s <= 0:
        return []
    spoken: list[Segment] = []
    for start, end, text in sorted(utterances):
        start, end = max(0.0, float(start)), min(float(duration_s), float(end))
        if spoken and start < spoken[-1].end_s:  # overlapping utterances: start after the last
            start = spoken[-1].end_s
        if end - start <= 0.05:
            continue
        parts = max(1, math.ceil((end - start) / max_segment_s))
        step = (end - start) / parts
        for i in range(parts):
            spoken.append(
                Segment(start + i * step, start + (i + 1) * step, text.strip() or None, "speech")
            )
    segments: list[Segment] = []
    cursor = 0.0
    for seg in [*spoken, Segment(duration_s, duration_s, None, "end")]:
        gap = seg.start_s - cursor
        if gap >= min_gap_s or (not spoken and gap > 0):
            windows = max(1, round(gap / window_s))
            width = gap / windows
            segments.extend(
                Segment(cursor + i * width, cursor + (i + 1) * width, None, "window")
                for i in range(windows)
            )
        if seg.source != "end":
            segments.append(seg)
        cursor = max(cursor, seg.end_s)
    return segments


def step_range(segment: Segment, rate_hz: float, length: int) -> tuple[int, int]:
    """Grid steps ``[first, stop)`` a segment covers (at least one step inside the grid)."""
    first = min(max(0, math.floor(segment.start_s * rate_hz + 1e-6)), max(0, length - 1))
    stop = min(length, max(first + 1, math.ceil(segment.end_s * rate_hz - 1e-6)))
    return first, stop


def slice_clip(clip: ClipFeatures, first: int, stop: int) -> ClipFeatures:
    """The steps ``[first, stop)`` of a clip, as a clip of its own (copies, contiguous)."""
    return ClipFeatures(
        features={m: np.ascontiguousarray(a[first:stop]) for m, a in clip.features.items()},
        masks={m: np.ascontiguousarray(a[first:stop]) for m, a in clip.masks.items()},
        length=stop - first,
    )


def without(clip: ClipFeatures, modality: str) -> ClipFeatures:
    """The clip with ``modality`` absent (the model treats it as fully masked)."""
    return ClipFeatures(
        features={m: a for m, a in clip.features.items() if m != modality},
        masks={m: a for m, a in clip.masks.items() if m != modality},
        length=clip.length,
    )


@dataclass(frozen=True)
class AttributionPlan:
    """The clips to score for one prediction and its attribution: the full clip first, then
    one clip per modality that has something to remove (``ablated`` names them in order)."""

    clips: list[ClipFeatures]
    ablated: list[str]
    model_modalities: tuple[str, ...]


def attribution_plan(clip: ClipFeatures, model_modalities: Sequence[str]) -> AttributionPlan:
    """Which clips score ``clip`` and its per-modality attribution."""
    ablated = [
        m for m in model_modalities if m in clip.masks and bool(np.asarray(clip.masks[m]).any())
    ]
    clips = [clip, *(without(clip, m) for m in ablated)]
    return AttributionPlan(clips=clips, ablated=ablated, model_modalities=tuple(model_modalities))


def attribution(plan: AttributionPlan, results: Sequence[ClipResult]) -> dict[str, float | None]:
    """``{text, audio, visual}``: score(all) - score(all but m); None for modalities the
    checkpoint lacks, 0.0 for ones the clip has no valid step of. ``results`` match
    ``plan.clips`` in order."""
    full = results[0].score
    moved = {m: full - r.score for m, r in zip(plan.ablated, results[1:], strict=True)}
    return {
        m: (float(moved.get(m, 0.0)) if m in plan.model_modalities else None)
        for m in MODALITY_ORDER
    }


def label_of(probabilities: Sequence[float]) -> str:
    """The class with the highest probability."""
    return CLASS_NAMES[int(np.argmax(np.asarray(probabilities)))]


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Mean of ``values`` weighted by ``weights`` (plain mean when the weights sum to 0)."""
    w = np.asarray(weights, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if w.sum() <= 0:
        return float(v.mean()) if len(v) else 0.0
    return float((v * w).sum() / w.sum())


def mean_attribution(
    parts: Sequence[Mapping[str, float | None]], weights: Sequence[float]
) -> dict[str, float | None]:
    """Duration-weighted mean of segment attributions (None stays None)."""
    out: dict[str, float | None] = {}
    for m in MODALITY_ORDER:
        values = [p[m] for p in parts]
        out[m] = (
            None
            if not values or any(v is None for v in values)
            else weighted_mean([float(v) for v in values if v is not None], weights)
        )
    return out


# -- one request --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoredSegment:
    """A segment's prediction and attribution."""

    segment: Segment
    score: float
    label: str
    probabilities: dict[str, float]
    attribution: dict[str, float | None]
    emotions: dict[str, float] | None = None


@dataclass(frozen=True)
class Timeline:
    """Sentiment over time for one clip, with the overall prediction.

    ``overall_method`` is ``"clip"`` when the whole clip fit one model call (its own score and
    attribution), else ``"segment_mean"`` (duration-weighted means over the segments).
    """

    duration_s: float
    segments: list[ScoredSegment]
    score: float
    label: str
    probabilities: dict[str, float]
    attribution: dict[str, float | None]
    overall_method: str
    clips_scored: int
    queue_ms: float
    model_ms: float
    largest_batch: int
    emotions: dict[str, float] | None = None


def clip_from_bundle(
    bundle_features: Mapping[str, np.ndarray],
    bundle_masks: Mapping[str, np.ndarray],
    length: int,
    model_modalities: Sequence[str],
) -> ClipFeatures:
    """The model's modalities of a feature bundle as one (possibly long) clip."""
    features = {
        m: np.asarray(bundle_features[m], dtype=np.float32)
        for m in model_modalities
        if m in bundle_features
    }
    masks = {m: np.asarray(bundle_masks[m], dtype=np.bool_) for m in features}
    return ClipFeatures(features=features, masks=masks, length=int(length))


def build_requests(
    clip: ClipFeatures,
    segments: Sequence[Segment],
    rate_hz: float,
    model_modalities: Sequence[str],
    max_sequence_length: int,
) -> tuple[list[AttributionPlan], AttributionPlan | None]:
    """The attribution plans of every segment and, when it fits, of the whole clip."""
    plans = []
    for segment in segments:
        first, stop = step_range(segment, rate_hz, clip.length)
        plans.append(attribution_plan(slice_clip(clip, first, stop), model_modalities))
    whole = attribution_plan(clip, model_modalities) if clip.length <= max_sequence_length else None
    return plans, whole


def assemble(
    duration_s: float,
    segments: Sequence[Segment],
    plans: Sequence[AttributionPlan],
    whole: AttributionPlan | None,
    results: Sequence[ClipResult],
) -> Timeline:
    """Put the model's results (in the order of the plans' clips, the whole clip last) together."""
    scored: list[ScoredSegment] = []
    cursor = 0
    for segment, plan in zip(segments, plans, strict=True):
        part = results[cursor : cursor + len(plan.clips)]
        cursor += len(plan.clips)
        scored.append(
            ScoredSegment(
                segment=segment,
                score=float(part[0].score),
                label=label_of(part[0].probabilities),
                probabilities=_named(part[0].probabilities),
                attribution=attribution(plan, part),
                emotions=dict(part[0].emotions) if part[0].emotions else None,
            )
        )
    if whole is not None:
        part = results[cursor : cursor + len(whole.clips)]
        score = float(part[0].score)
        probabilities = _named(part[0].probabilities)
        emotions = dict(part[0].emotions) if part[0].emotions else None
        overall_attribution = attribution(whole, part)
        method = "clip"
    else:
        weights = [s.segment.end_s - s.segment.start_s for s in scored]
        score = weighted_mean([s.score for s in scored], weights)
        probabilities = {
            name: weighted_mean([s.probabilities[name] for s in scored], weights)
            for name in CLASS_NAMES
        }
        overall_attribution = mean_attribution([s.attribution for s in scored], weights)
        emotions = None
        if scored and all(s.emotions for s in scored):
            names = list(scored[0].emotions or {})
            emotions = {
                name: weighted_mean([(s.emotions or {})[name] for s in scored], weights)
                for name in names
            }
        method = "segment_mean"
    return Timeline(
        duration_s=duration_s,
        segments=scored,
        score=score,
        label=label_of([probabilities[n] for n in CLASS_NAMES]),
        probabilities=probabilities,
        attribution=overall_attribution,
        overall_method=method,
        clips_scored=len(results),
        queue_ms=0.0,
        model_ms=0.0,
        largest_batch=0,
        emotions=emotions,
    )


def _named(probabilities: Sequence[float]) -> dict[str, float]:
    return {name: float(p) for name, p in zip(CLASS_NAMES, probabilities, strict=True)}


async def score_timeline(
    core: InferenceCore,
    bundle: FeatureBundleLike,
    deadline: float,
    *,
    window_s: float = 5.0,
) -> Timeline:
    """Segment an extracted clip, and score every segment (and the whole clip when it fits one
    model call) with its attribution, all through the core's micro-batcher."""
    config = core.config
    modalities = tuple(config.modalities)
    clip = clip_from_bundle(bundle.features, bundle.masks, int(bundle.length), modalities)
    if clip.length <= 0 or not any(bool(m.any()) for m in clip.masks.values()):
        wanted = {"text": "speech", "audio": "audio", "visual": "a face"}
        raise UndecodableMediaError(
            f"the model uses {', '.join(modalities)}, and the media holds no "
            + " or ".join(wanted[m] for m in modalities)
        )
    rate = float(getattr(bundle, "rate_hz", 10.0))
    duration = clip.length / rate
    summary_duration = getattr(bundle.summary, "duration_s", None)
    if summary_duration:
        duration = min(duration, float(summary_duration))
    segments = plan_segments(
        list(getattr(bundle, "segments", []) or []),
        duration,
        window_s=window_s,
        max_segment_s=min(30.0, core.settings.max_sequence_length / rate),
    )
    plans, whole = build_requests(
        clip, segments, rate, modalities, core.settings.max_sequence_length
    )
    clips = [c for plan in plans for c in plan.clips] + (whole.clips if whole else [])
    outcomes = await core.run_clips(clips, deadline)
    results = [o.result for o in outcomes]
    assert all(r is not None for r in results)
    timeline = assemble(duration, segments, plans, whole, results)  # type: ignore[arg-type]
    return replace(
        timeline,
        queue_ms=max((o.queue_ms for o in outcomes), default=0.0),
        model_ms=sum(o.model_ms / max(1, o.batch_size) for o in outcomes),
        largest_batch=max((o.batch_size for o in outcomes), default=0),
    )
