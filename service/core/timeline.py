"""Sentiment over time: a clip cut into segments, each scored with its attribution.

A clip's feature grid is cut into **segments**: the ASR's utterances (``FeatureBundle.segments``),
with the stretches between them longer than ``min_gap_s`` (and the whole clip when nobody speaks)
covered by fixed windows of ``window_s``. Utterances longer than ``max_segment_s`` are cut into
equal parts. Each segment is scored on its own slice of the grid.

Each segment, and the whole clip when it fits one model call, comes with its per-modality
attribution (:mod:`service.core.attribution`); every clip of a timeline goes through the
micro-batcher together, so they share model calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from service.core.attribution import (
    AttributionPlan,
    attribution,
    attribution_plan,
    mean_attribution,
    weighted_mean,
)
from service.core.types import CLASS_NAMES, Attribution, ClipFeatures, ClipResult, ModelIdentity


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


def label_of(probabilities: Sequence[float]) -> str:
    """The class with the highest probability."""
    return CLASS_NAMES[int(np.argmax(np.asarray(probabilities)))]


# -- one request --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoredSegment:
    """A segment's prediction and attribution."""

    segment: Segment
    score: float
    label: str
    probabilities: dict[str, float]
    attribution: Attribution
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
    attribution: Attribution
    overall_method: str
    clips_scored: int
    emotions: dict[str, float] | None = None


@dataclass(frozen=True)
class TimelinePrediction:
    """The answer to one timeline request: the timeline and the request's facts."""

    timeline: Timeline
    modalities: dict[str, Any]  # what the extractor found (see assembly.media_summary)
    timings_ms: dict[str, float]
    model: ModelIdentity
    largest_batch: int


@dataclass(frozen=True)
class TimelinePlan:
    """The segments of a clip and the attribution plans that score them: one per segment, and
    one for the whole clip when it fits one model call (``whole``, else None)."""

    duration_s: float
    segments: list[Segment]
    plans: list[AttributionPlan]
    whole: AttributionPlan | None

    @property
    def clips(self) -> list[ClipFeatures]:
        """Every clip to score, in the order :func:`assemble` reads their results."""
        plans = [*self.plans, self.whole] if self.whole is not None else self.plans
        return [clip for plan in plans for clip in plan.clips]


def plan_timeline(
    clip: ClipFeatures,
    rate_hz: float,
    utterances: Sequence[tuple[float, float, str]],
    model_modalities: Sequence[str],
    max_sequence_length: int,
    *,
    media_duration_s: float | None = None,
    window_s: float = 5.0,
    whole_clip: bool = True,
) -> TimelinePlan:
    """Cut a clip's grid into segments (utterances, and windows where nobody speaks) and plan
    the scoring of each segment and, when it fits (and ``whole_clip``), of the whole clip."""
    duration = clip.length / rate_hz
    if media_duration_s:
        duration = min(duration, float(media_duration_s))
    segments = plan_segments(
        utterances,
        duration,
        window_s=window_s,
        max_segment_s=min(30.0, max_sequence_length / rate_hz),
    )
    plans = []
    for segment in segments:
        first, stop = step_range(segment, rate_hz, clip.length)
        plans.append(attribution_plan(slice_clip(clip, first, stop), model_modalities))
    fits = whole_clip and clip.length <= max_sequence_length
    whole = attribution_plan(clip, model_modalities) if fits else None
    return TimelinePlan(duration_s=duration, segments=segments, plans=plans, whole=whole)


def assemble(planned: TimelinePlan, results: Sequence[ClipResult]) -> Timeline:
    """Put the model's results (in the order of ``planned.clips``) together."""
    whole = planned.whole
    scored = scored_segments(planned, results)
    if whole is None:
        return segment_mean(scored, planned.duration_s, clips_scored=len(results))
    cursor = sum(len(plan.clips) for plan in planned.plans)
    part = results[cursor : cursor + len(whole.clips)]
    probabilities = _named(part[0].probabilities)
    return Timeline(
        duration_s=planned.duration_s,
        segments=scored,
        score=float(part[0].score),
        label=label_of([probabilities[n] for n in CLASS_NAMES]),
        probabilities=probabilities,
        attribution=attribution(whole, part),
        overall_method="clip",
        clips_scored=len(results),
        emotions=dict(part[0].emotions) if part[0].emotions else None,
    )


def scored_segments(planned: TimelinePlan, results: Sequence[ClipResult]) -> list[ScoredSegment]:
    """Each segment's prediction and attribution, from the model's results (in the order of
    ``planned.clips``; the whole clip's, when planned, come after the segments' and are not
    read here)."""
    scored: list[ScoredSegment] = []
    cursor = 0
    for segment, plan in zip(planned.segments, planned.plans, strict=True):
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
    return scored


def segment_mean(scored: list[ScoredSegment], duration_s: float, *, clips_scored: int) -> Timeline:
    """The timeline whose overall prediction is the duration-weighted mean of its segments
    (``overall_method`` ``"segment_mean"``): clips longer than one model call, and long
    recordings scored part by part (:mod:`service.jobs.runner`)."""
    weights = [s.segment.end_s - s.segment.start_s for s in scored]
    probabilities = {
        name: weighted_mean([s.probabilities[name] for s in scored], weights)
        for name in CLASS_NAMES
    }
    emotions = None
    if scored and all(s.emotions for s in scored):
        names = list(scored[0].emotions or {})
        emotions = {
            name: weighted_mean([(s.emotions or {})[name] for s in scored], weights)
            for name in names
        }
    return Timeline(
        duration_s=duration_s,
        segments=scored,
        score=weighted_mean([s.score for s in scored], weights),
        label=label_of([probabilities[n] for n in CLASS_NAMES]),
        probabilities=probabilities,
        attribution=mean_attribution([s.attribution for s in scored], weights),
        overall_method="segment_mean",
        clips_scored=clips_scored,
        emotions=emotions,
    )


def shifted(segment: ScoredSegment, offset_s: float, end_s: float) -> ScoredSegment:
    """The same scored segment, its times moved by ``offset_s`` (a part's start in its
    recording) and its end cut at ``end_s`` (the part's end: a part's last packet may
    reach a little past it)."""
    start = min(segment.segment.start_s + offset_s, end_s)
    moved = replace(
        segment.segment,
        start_s=start,
        end_s=max(start, min(segment.segment.end_s + offset_s, end_s)),
    )
    return replace(segment, segment=moved)


def segment_record(segment: ScoredSegment) -> dict[str, Any]:
    """A scored segment as JSON (what a job stores; :func:`segment_from_record` reads it)."""
    return {
        "start_s": segment.segment.start_s,
        "end_s": segment.segment.end_s,
        "source": segment.segment.source,
        "transcript": segment.segment.transcript,
        "score": segment.score,
        "label": segment.label,
        "probabilities": dict(segment.probabilities),
        "attribution": dict(segment.attribution),
        "emotions": dict(segment.emotions) if segment.emotions else None,
    }


def segment_from_record(record: dict[str, Any]) -> ScoredSegment:
    """The scored segment stored by :func:`segment_record`."""
    return ScoredSegment(
        segment=Segment(
            float(record["start_s"]),
            float(record["end_s"]),
            record.get("transcript"),
            str(record["source"]),
        ),
        score=float(record["score"]),
        label=str(record["label"]),
        probabilities={k: float(v) for k, v in record["probabilities"].items()},
        attribution=dict(record["attribution"]),
        emotions=record.get("emotions"),
    )


def _named(probabilities: Sequence[float]) -> dict[str, float]:
    return {name: float(p) for name, p in zip(CLASS_NAMES, probabilities, strict=True)}
