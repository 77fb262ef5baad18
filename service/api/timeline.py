"""``POST /v1/timeline``: sentiment over time, segment by segment, with per-modality attribution."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from service.api.answers import timed_answer
from service.api.auth import BearerRoute
from service.api.dependencies import CoreDep, SettingsDep
from service.api.disconnect import unless_disconnected
from service.api.schemas import ModelInfo, Sentiment, error_responses
from service.api.uploads import MEDIA_UPLOAD_BODY, receive_upload_in_time
from service.core.timeline import TimelinePrediction

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


def timeline_response(answer: TimelinePrediction, request_id: str) -> TimelineResponse:
    """The JSON answer of a timeline (`/v1/timeline`, and a finished job's result)."""
    timeline = answer.timeline
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
        modalities=answer.modalities,
        timings_ms={k: round(v, 3) for k, v in answer.timings_ms.items()},
        clips_scored=timeline.clips_scored,
        largest_batch=answer.largest_batch,
        model=ModelInfo.from_identity(answer.model),
        request_id=request_id,
        emotions=timeline.emotions,
    )


@router.post(
    "/v1/timeline",
    response_model=TimelineResponse,
    responses=error_responses(401, 413, 415, 422, 501, 503, 504),
    openapi_extra=MEDIA_UPLOAD_BODY,
)
async def predict_timeline(
    request: Request,
    core: CoreDep,
    settings: SettingsDep,
    window: Annotated[
        float, Query(ge=1.0, le=30.0, description="fixed window (s) where nobody speaks")
    ] = 5.0,
) -> JSONResponse:
    """Sentiment over time of a video or audio clip (multipart ``file``, optional
    ``transcript``): one prediction per utterance of the ASR (fixed windows where nobody
    speaks), each with its per-modality attribution, and the whole clip's."""
    async with core.admit():
        core.require_media()  # before reading the body
        deadline = time.monotonic() + settings.request_timeout_s
        upload = await receive_upload_in_time(request, settings)
        answer = await unless_disconnected(
            request,
            core.predict_timeline(
                upload.path,
                upload.transcript,
                started=request.state.start_time,
                deadline=deadline,
                remove_after=True,
                upload_ms=upload.receive_ms,
                window_s=window,
            ),
        )
    return timed_answer(timeline_response(answer, request.state.request_id), answer.timings_ms)
