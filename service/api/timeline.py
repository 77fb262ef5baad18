"""``POST /v1/timeline``: sentiment over time, segment by segment, with per-modality attribution."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from service.api.auth import BearerRoute
from service.api.dependencies import CoreDep, MetricsDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.predict import _MEDIA_BODY, _count_rejections
from service.api.schemas import ModelInfo, Sentiment, error_responses
from service.api.uploads import receive_upload_in_time
from service.core.engine import _summary_dict
from service.core.timeline import Timeline, score_timeline
from service.core.types import MEDIA_STAGES

router = APIRouter(tags=["predict"], route_class=BearerRoute)


class Attribution(BaseModel):
    """score(all) - score(all but the modality); null for modalities the checkpoint lacks."""

    text: float | None
    audio: float | None
    visual: float | None


class TimelineSegment(BaseModel):
    start: float = Field(description="seconds from the start of the clip")
    end: float = Field(description="seconds from the start of the clip")
    source: str = Field(description="speech (an ASR utterance) or window (a fixed window)")
    transcript: str | None
    score: float
    label: str
    probabilities: dict[str, float]
    attribution: Attribution
    emotions: dict[str, float] | None = Field(
        default=None, description="emotion probabilities (checkpoints with an emotion head)"
    )


class TimelineResponse(BaseModel):
    sentiment: Sentiment = Field(description="the whole clip")
    attribution: Attribution = Field(description="the whole clip")
    overall_method: str = Field(
        description="clip (the whole clip scored at once) or segment_mean (duration-weighted "
        "mean of the segments, for clips longer than one model call takes)"
    )
    duration_s: float
    segments: list[TimelineSegment]
    modalities: dict[str, Any]
    timings_ms: dict[str, float]
    clips_scored: int = Field(description="model inputs: segments, whole clip, and ablations")
    largest_batch: int
    model: ModelInfo
    request_id: str
    emotions: dict[str, float] | None = Field(
        default=None,
        description="the whole clip's emotion probabilities (checkpoints with an emotion head)",
    )


def _response(
    timeline: Timeline,
    summary: dict[str, Any],
    timings: dict[str, float],
    model: ModelInfo,
    request_id: str,
) -> TimelineResponse:
    return TimelineResponse(
        sentiment=Sentiment(
            score=timeline.score,
            label=timeline.label,  # type: ignore[arg-type]
            probabilities=timeline.probabilities,
        ),
        attribution=Attribution(**timeline.attribution),
        overall_method=timeline.overall_method,
        duration_s=round(timeline.duration_s, 3),
        segments=[
            TimelineSegment(
                start=round(s.segment.start_s, 3),
                end=round(s.segment.end_s, 3),
                source=s.segment.source,
                transcript=s.segment.transcript,
                score=s.score,
                label=s.label,
                probabilities=s.probabilities,
                attribution=Attribution(**s.attribution),
                emotions=s.emotions,
            )
            for s in timeline.segments
        ],
        modalities=summary,
        timings_ms={k: round(v, 3) for k, v in timings.items()},
        clips_scored=timeline.clips_scored,
        largest_batch=timeline.largest_batch,
        model=model,
        request_id=request_id,
        emotions=timeline.emotions,
    )


@router.post(
    "/v1/timeline",
    response_model=TimelineResponse,
    responses=error_responses(401, 413, 415, 422, 501, 503, 504),
    openapi_extra=_MEDIA_BODY,
)
async def predict_timeline(
    request: Request,
    core: CoreDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    window: Annotated[
        float, Query(ge=1.0, le=30.0, description="fixed window (s) where nobody speaks")
    ] = 5.0,
) -> JSONResponse:
    """Sentiment over time of a video or audio clip (multipart ``file``, optional
    ``transcript``): one prediction per utterance of the ASR (fixed windows where nobody
    speaks), each with its per-modality attribution, and the whole clip's."""
    with _count_rejections(metrics):
        async with core.admit():
            core.require_media()
            started = request.state.start_time
            deadline = time.monotonic() + settings.request_timeout_s
            upload = await receive_upload_in_time(request, settings)
            bundle, wait_ms = await unless_disconnected(
                request,
                core.extract_bundle(
                    upload.path, upload.transcript, deadline=deadline, remove_after=True
                ),
            )
            timeline = await unless_disconnected(
                request, score_timeline(core, bundle, deadline, window_s=window)
            )
    timings = dict.fromkeys(MEDIA_STAGES, 0.0)
    timings.update({stage: float(ms) for stage, ms in bundle.timings_ms.items()})
    timings["upload"] = upload.receive_ms
    timings["extract_wait"] = wait_ms
    timings["queue"] = timeline.queue_ms
    timings["model"] = timeline.model_ms
    timings["total"] = (time.perf_counter() - started) * 1000.0
    metrics.observe_stages(timings)
    summary = _summary_dict(bundle.summary)
    identity = core.identity
    body = _response(
        timeline,
        summary,
        timings,
        ModelInfo(
            name=identity.name,
            version=identity.version,
            device=identity.device,
            scan_backend=identity.scan_backend,
        ),
        request.state.request_id,
    )
    server_timing = ", ".join(f"{stage};dur={ms:.3f}" for stage, ms in timings.items())
    return JSONResponse(body.model_dump(mode="json"), headers={"Server-Timing": server_timing})
