"""Prediction endpoints: a media upload, or precomputed features.

Both take no FastAPI dependencies (they read :func:`app_parts`), and the app routes to them
first: the features endpoint is the service's hot path, and everything on it that batching
cannot share is per-request event-loop work.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from service.api.answers import timed_answer
from service.api.auth import BearerRoute
from service.api.dependencies import app_parts
from service.api.disconnect import unless_disconnected
from service.api.features_body import FeaturesBody, parse_features_body
from service.api.schemas import FeaturesRequest, PredictResponse, error_responses
from service.api.uploads import (
    MEDIA_OR_TRANSCRIPT_BODY,
    TranscriptForm,
    read_body,
    receive_upload_or_transcript_in_time,
)
from service.core.engine import InferenceCore
from service.core.types import ClipFeatures, Prediction
from service.errors import UnsupportedMediaError

router = APIRouter(tags=["predict"], route_class=BearerRoute)

AttributionQuery = Annotated[
    bool,
    Query(description="also answer the per-modality attribution (one more model input each)"),
]

_FEATURES_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": FeaturesRequest.model_json_schema()}},
    },
}


def _answer(prediction: Prediction, request: Request) -> JSONResponse:
    body = PredictResponse.from_prediction(prediction, request.state.request_id)
    return timed_answer(body, prediction.timings_ms)


def _parse_large_body(core: InferenceCore, body: bytes) -> tuple[FeaturesBody, ClipFeatures]:
    payload = parse_features_body(body, lax=False)
    return payload, core.clip_from_features(payload.profile, payload.features, payload.masks)


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    responses=error_responses(401, 413, 415, 422, 501, 503, 504),
    openapi_extra=MEDIA_OR_TRANSCRIPT_BODY,
)
async def predict_media(
    request: Request,
    attribution: AttributionQuery = False,
) -> JSONResponse:
    """Score a video or audio clip sent as multipart ``file`` (optional ``transcript``), or a
    ``transcript`` alone (its text only)."""
    core, settings = app_parts(request)
    async with core.admit():
        core.require_media()  # before reading the body
        deadline = time.monotonic() + settings.request_timeout_s
        upload = await receive_upload_or_transcript_in_time(request, settings)
        if isinstance(upload, TranscriptForm):
            scoring = core.predict_text(
                upload.transcript,
                started=request.state.start_time,
                deadline=deadline,
                upload_ms=upload.receive_ms,
                attribution=attribution,
            )
        else:
            scoring = core.predict_media(
                upload.path,
                upload.transcript,
                started=request.state.start_time,
                deadline=deadline,
                remove_after=True,
                upload_ms=upload.receive_ms,
                attribution=attribution,
            )
        prediction = await unless_disconnected(request, scoring)
    return _answer(prediction, request)


@router.post(
    "/v1/predict/features",
    response_model=PredictResponse,
    responses=error_responses(401, 413, 415, 422, 503, 504),
    openapi_extra=_FEATURES_BODY,
)
async def predict_features(
    request: Request,
    attribution: AttributionQuery = False,
) -> JSONResponse:
    """Score precomputed features in the loaded checkpoint's feature profile.

    Features of another profile, modality set or size than the checkpoint's are refused with
    422 ``feature_mismatch``.
    """
    core, settings = app_parts(request)
    async with core.admit():
        deadline = time.monotonic() + settings.request_timeout_s
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise UnsupportedMediaError("send the features as application/json")
        body = await read_body(request, max_bytes=settings.max_upload_bytes)
        if len(body) <= settings.offloop_body_bytes:
            payload = parse_features_body(body)
            clip = core.clip_from_features(payload.profile, payload.features, payload.masks)
        else:  # one large body at a time, on the body thread, strict types only
            payload, clip = await asyncio.get_running_loop().run_in_executor(
                request.app.state.body_executor, _parse_large_body, core, body
            )
        prediction = await core.predict_features(
            clip,
            started=request.state.start_time,
            deadline=deadline,
            transcript=payload.transcript,
            attribution=attribution,
        )
    return _answer(prediction, request)
