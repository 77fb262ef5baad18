"""``WS /v1/stream``: live sentiment over a WebSocket (the protocol: docs/STREAMING.md).

This module only translates: the start message to :class:`StreamOptions`, binary frames to
samples and JPEG bytes for the stream's session, the session's events to JSON messages, and
domain errors to close codes (:data:`service.api.errors.WS_CLOSE_CODES`). The use case lives in
:mod:`service.core.streaming`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from service.api.auth import check_token
from service.api.errors import ws_close_code
from service.api.schemas import PredictResponse
from service.core.engine import InferenceCore
from service.core.streaming import (
    StreamFailed,
    StreamFinal,
    StreamOptions,
    StreamSession,
    StreamUpdate,
)
from service.core.types import CLASS_NAMES
from service.errors import (
    ServiceError,
    StreamMessageTooLargeError,
    StreamProtocolError,
    error_body,
)
from service.settings import ServiceSettings
from service.stream_wire import HEADER, KIND_AUDIO, KIND_VIDEO, PROTOCOL, TOKEN_PREFIX

logger = logging.getLogger(__name__)

router = APIRouter(tags=["stream"])


CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
FINAL_CLOSE_CODES = {"stop": CLOSE_NORMAL, "draining": CLOSE_GOING_AWAY, "max_duration": 4002,
                     "idle": 4408}  # fmt: skip
"""Close code after the final answer, by the reason the stream ended."""


class AudioFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["s16le", "f32le"]
    sample_rate: int = Field(ge=8000, le=48000)


class VideoFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["jpeg"]


class StartMessage(BaseModel):
    """The client's first message (docs/STREAMING.md, "Start message")."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["start"]
    audio: AudioFormat
    video: VideoFormat | None = None
    update_interval_s: float = Field(default=1.0, ge=0.2, le=10.0)
    transcript_hint: str | None = Field(default=None, max_length=10_000)
    token: str | None = Field(default=None, max_length=1000)


def parse_start(text: str) -> StartMessage:
    """The start message, validated.

    Raises:
        StreamProtocolError: not JSON, or not a valid start message.
    """
    try:
        return StartMessage.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3]
        )
        raise StreamProtocolError(f"bad start message: {problems}") from None


def parse_frame(data: bytes) -> tuple[int, float, bytes]:
    """(kind, timestamp, payload) of a binary message.

    Raises:
        StreamProtocolError: short header, unknown kind, reserved bytes set, bad timestamp,
            or a length that does not match the payload.
    """
    if len(data) < HEADER.size:
        raise StreamProtocolError(f"a binary message shorter than the {HEADER.size}-byte header")
    kind, reserved, timestamp, length = HEADER.unpack_from(data)
    if kind not in (KIND_AUDIO, KIND_VIDEO):
        raise StreamProtocolError(f"unknown frame kind {kind} (1 = audio, 2 = video)")
    if reserved != b"\0\0\0":
        raise StreamProtocolError("the frame header's reserved bytes must be zero")
    if not math.isfinite(timestamp) or timestamp < 0:
        raise StreamProtocolError("the frame timestamp must be finite and not negative")
    if length != len(data) - HEADER.size:
        raise StreamProtocolError(
            f"the frame header says {length} payload bytes, the message has "
            f"{len(data) - HEADER.size}"
        )
    return kind, timestamp, data[HEADER.size :]


def decode_pcm(payload: bytes, audio_format: str) -> np.ndarray:
    """Mono float32 samples of a PCM payload.

    Raises:
        StreamProtocolError: a partial sample, or non-finite float samples.
    """
    width = 2 if audio_format == "s16le" else 4
    if len(payload) % width:
        raise StreamProtocolError(
            f"an {audio_format} audio payload must be a multiple of {width} bytes"
        )
    if audio_format == "s16le":
        return np.frombuffer(payload, dtype="<i2").astype(np.float32) / 32768.0
    samples = np.frombuffer(payload, dtype="<f4").astype(np.float32)
    if not np.isfinite(samples).all():
        raise StreamProtocolError("f32le audio samples must be finite")
    return samples


# -- server messages -------------------------------------------------------------------------------


def update_message(update: StreamUpdate) -> dict[str, Any]:
    result = update.result
    best = int(np.argmax(result.probabilities))
    return {
        "type": "update",
        "seq": update.seq,
        "stream_time_s": round(update.stream_time_s, 3),
        "received_s": round(update.received_s, 3),
        "sentiment": {
            "score": result.score,
            "label": CLASS_NAMES[best],
            "probabilities": dict(zip(CLASS_NAMES, result.probabilities, strict=True)),
        },
        "emotions": dict(result.emotions) if result.emotions else None,
        "words": [
            {"text": w.text, "start_s": round(w.start_s, 3), "end_s": round(w.end_s, 3)}
            for w in update.words
        ],
        "words_total": update.words_total,
        "modalities": {"active": list(update.active)},
        "latency_ms": round(update.latency_ms, 3),
        "lag_s": round(update.lag_s, 3),
        "dropped_frames": update.dropped_frames,
        "committed_time_s": round(update.committed_time_s, 3),
        "provisional_s": round(update.provisional_s, 3),
        "committed_lag_s": round(update.committed_lag_s, 3),
    }


def final_message(final: StreamFinal, stream_id: str) -> dict[str, Any]:
    result = (
        PredictResponse.from_prediction(final.prediction, stream_id).model_dump(mode="json")
        if final.prediction is not None
        else None
    )
    return {
        "type": "final",
        "reason": final.reason,
        "stream_time_s": round(final.stream_time_s, 3),
        "words_total": final.words_total,
        "dropped_frames": final.dropped_frames,
        "result": result,
    }


# -- the endpoint ----------------------------------------------------------------------------------


@router.websocket("/v1/stream")
async def stream(websocket: WebSocket) -> None:
    """A live stream: start message, media frames, stop; updates, then the final answer."""
    core: InferenceCore = websocket.app.state.core
    settings: ServiceSettings = websocket.app.state.settings
    offered = [p.strip() for p in websocket.scope.get("subprotocols", [])]
    protocol_token = next((p[len(TOKEN_PREFIX) :] for p in offered if p.startswith(TOKEN_PREFIX)),
                          None)  # fmt: skip
    await websocket.accept(subprotocol=PROTOCOL if PROTOCOL in offered else None)
    session: StreamSession | None = None
    try:
        if offered and PROTOCOL not in offered:
            raise StreamProtocolError(f"offer the subprotocol {PROTOCOL!r}")
        if protocol_token is not None:
            check_token(settings, protocol_token, "the token in the subprotocol is not valid")
        try:
            first = await _receive(websocket, settings)
        except _Idle:
            await websocket.close(FINAL_CLOSE_CODES["idle"], "idle")
            return
        if first is None:
            return
        if not isinstance(first, str):
            raise StreamProtocolError("the first message must be the JSON start message")
        start = parse_start(first)
        if protocol_token is None:
            check_token(
                settings,
                start.token,
                "a valid token is required (start message `token`, or the subprotocol "
                f"{TOKEN_PREFIX}<token>)",
            )
        options = StreamOptions(
            sample_rate=start.audio.sample_rate,
            audio_format=start.audio.format,
            video=start.video is not None,
            update_interval_s=start.update_interval_s,
            transcript_hint=start.transcript_hint,
        )
        session = await core.open_stream(options)
        await websocket.send_json(
            {
                "type": "ready",
                "stream_id": session.id,
                "protocol": 1,
                "rate_hz": core.stream_rate_hz,
                "modalities": list(core.config.modalities),
                "limits": {
                    "max_message_bytes": settings.stream_max_message_bytes,
                    "idle_timeout_s": settings.stream_idle_timeout_s,
                    "max_duration_s": settings.stream_max_duration_s,
                },
            }
        )
        await _serve(websocket, settings, session)
    except ServiceError as exc:
        if session is not None:
            session.abort()
        await _close_on_error(websocket, exc)
    except WebSocketDisconnect:
        if session is not None:
            session.abort()
    except Exception:
        logger.exception("live stream failed")
        if session is not None:
            session.abort()
        await _close_on_error(websocket, ServiceError("internal error in the live stream"))


async def _serve(websocket: WebSocket, settings: ServiceSettings, session: StreamSession) -> None:
    """Read media until stop/idle while sending the session's events; end on its last one."""
    reader: asyncio.Future[Any] = asyncio.create_task(_read_media(websocket, settings, session))
    try:
        while True:
            events = asyncio.ensure_future(session.outbox.get())
            done, _ = await asyncio.wait({events, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done and events not in done:
                events.cancel()
                reader.result()  # a protocol error or a disconnect ends the stream here
                reader = asyncio.get_running_loop().create_future()  # reading is over
                continue
            event = events.result()
            if isinstance(event, StreamUpdate):
                await websocket.send_json(update_message(event))
            elif isinstance(event, StreamFinal):
                await websocket.send_json(final_message(event, session.id))
                await websocket.close(FINAL_CLOSE_CODES[event.reason], event.reason)
                return
            else:
                assert isinstance(event, StreamFailed)
                raise event.error
    finally:
        # Not awaited: a cancellation that meets a message arriving can be lost in wait_for
        # (Python 3.11), and the reader then waits for the next message; it also stops at its
        # next message once the session has ended, and its outcome is read by the callback.
        reader.cancel()
        reader.add_done_callback(lambda task: task.cancelled() or task.exception())


async def _read_media(
    websocket: WebSocket, settings: ServiceSettings, session: StreamSession
) -> None:
    """Feed binary frames to the session until the stop message or the idle timeout."""
    while True:
        try:
            message = await _receive(websocket, settings)
        except _Idle:
            session.request_stop("idle")
            return
        if message is None:
            raise WebSocketDisconnect(CLOSE_NORMAL)
        if session.ended:
            return
        if isinstance(message, str):
            try:
                body = json.loads(message)
            except ValueError:
                body = None
            if isinstance(body, dict) and body.get("type") == "stop" and len(body) == 1:
                session.request_stop("stop")
                return
            raise StreamProtocolError('the only text message after start is {"type": "stop"}')
        kind, timestamp, payload = parse_frame(message)
        if kind == KIND_AUDIO:
            session.push_audio(decode_pcm(payload, session.options.audio_format))
        else:
            session.push_frame(payload, timestamp)


class _Idle(Exception):
    """Nothing came within the idle timeout."""


async def _receive(websocket: WebSocket, settings: ServiceSettings) -> str | bytes | None:
    """The next message (text or bytes), or None on disconnect.

    Raises:
        _Idle: nothing came within ``stream_idle_timeout_s``.
        StreamMessageTooLargeError: over ``stream_max_message_bytes``.
    """
    try:
        message = await asyncio.wait_for(websocket.receive(), settings.stream_idle_timeout_s)
    except TimeoutError:
        raise _Idle from None
    if message["type"] == "websocket.disconnect":
        return None
    data = message.get("bytes")
    if data is None:
        data = message.get("text") or ""
    if len(data) > settings.stream_max_message_bytes:
        raise StreamMessageTooLargeError(
            f"a message of {len(data)} bytes is over the limit of "
            f"{settings.stream_max_message_bytes}"
        )
    return data if isinstance(data, bytes) else str(data)


async def _close_on_error(websocket: WebSocket, exc: ServiceError) -> None:
    if websocket.application_state != WebSocketState.CONNECTED:
        return
    code = ws_close_code(exc)
    with contextlib.suppress(Exception):
        await websocket.send_json(error_body(exc.error_type, exc.message))
        await websocket.close(code, exc.error_type[:123])
