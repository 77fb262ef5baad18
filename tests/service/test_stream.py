"""WS /v1/stream through the real app: updates, the final answer (equal to /v1/predict/features
on the same features), limits, the token, malformed input that ends only its own stream, video
frames dropped when behind, metrics. The live features come from ``live_rows.BundleRows``
(rows of the offline extractor's features as the audio arrives)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import profile_dims
from live_rows import BundleRows
from starlette.websockets import WebSocketDisconnect

from service.main import create_app
from service.settings import ServiceSettings
from service.stream_wire import KIND_AUDIO, KIND_VIDEO, encode_frame

RATE = 16_000


def _random_rows(length: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    features = {
        m: rng.standard_normal((length, d)).astype(np.float32) for m, d in profile_dims().items()
    }
    masks = {m: np.ones(length, dtype=np.bool_) for m in features}
    masks["visual"][length // 3 : length // 2] = False  # no face for a while
    return features, masks


class Streams:
    """An app whose live sources serve given rows; remembers what each stream was given."""

    def __init__(self, client: TestClient, rows: Callable[[], tuple[dict, dict]]) -> None:
        self.client = client
        self.rows = rows
        self.sources: list[BundleRows] = []


@pytest.fixture
def stream_app(
    checkpoint: Path, start_client: Callable[..., TestClient]
) -> Iterator[Callable[..., Streams]]:
    def build(
        rows: Callable[[], tuple[dict, dict]] | None = None,
        preview: bool = False,
        **overrides: Any,
    ) -> Streams:
        values: dict[str, Any] = {
            "model_path": checkpoint,
            "enable_media": False,
            "max_batch_delay_ms": 2.0,
            "torch_threads": 1,
            "stream_tick_s": 0.01,
        }
        values.update(overrides)
        lock = threading.Lock()
        streams = Streams(None, rows or (lambda: _random_rows(60, 0)))  # type: ignore[arg-type]

        def factory(options: Any) -> BundleRows:
            features, masks = streams.rows()
            source = BundleRows(
                features, masks, sample_rate=options.sample_rate, provisional=preview
            )
            with lock:
                streams.sources.append(source)
            return source

        app = create_app(ServiceSettings(**values), live_source_factory=factory)
        streams.client = start_client(app)
        return streams

    yield build


def _start(ws: Any, **fields: Any) -> dict[str, Any]:
    message = {"type": "start", "audio": {"format": "f32le", "sample_rate": RATE}}
    message.update(fields)
    ws.send_text(json.dumps(message))
    ready = ws.receive_json()
    assert ready["type"] == "ready", ready
    return ready


def _send_audio(ws: Any, audio: np.ndarray, piece_s: float = 0.2, fmt: str = "f32le") -> None:
    step = int(RATE * piece_s)
    for first in range(0, len(audio), step):
        chunk = audio[first : first + step]
        payload = (
            chunk.astype("<f4").tobytes()
            if fmt == "f32le"
            else (np.clip(chunk, -1, 1) * 32767).astype("<i2").tobytes()
        )
        ws.send_bytes(encode_frame(KIND_AUDIO, first / RATE, payload))


def _until_final(ws: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    updates = []
    while True:
        message = ws.receive_json()
        if message["type"] == "final":
            return updates, message
        assert message["type"] == "update", message
        updates.append(message)


def _closed_with(ws: Any) -> tuple[int, dict[str, Any] | None]:
    """The close code after the server's error message (None when it sent none)."""
    error = None
    try:
        while True:
            message = ws.receive_json()
            if "error" in message:
                error = message
    except WebSocketDisconnect as exc:
        return exc.code, error
    raise AssertionError("not closed")


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def clip(real_extractor: Any, shared_media: Path) -> tuple[Any, np.ndarray]:
    """The offline extractor's features of a shared clip, and its 16 kHz audio."""
    from preprocessing import ExtractorSettings
    from preprocessing.media import decode_media

    path = shared_media / "cremad_1001_DFA_HAP_XX.mp4"
    bundle = real_extractor.extract(path)
    audio = decode_media(path, ExtractorSettings(), audio=True, video=False).audio
    assert audio is not None
    return bundle, audio


@pytest.mark.slow
@pytest.mark.parametrize("preview", [False, True], ids=["committed", "provisional"])
def test_final_answer_equals_predict_features(stream_app, clip, preview) -> None:
    """With provisional rows too: each provisional step runs on a copy of the committed state,
    so the final answer is still the model on the whole clip."""
    bundle, audio = clip
    features = {m: np.asarray(f, np.float32) for m, f in bundle.features.items()}
    masks = {m: np.asarray(k, np.bool_) for m, k in bundle.masks.items()}
    streams = stream_app(rows=lambda: (features, masks), preview=preview)
    with streams.client.websocket_connect("/v1/stream") as ws:
        ready = _start(ws, update_interval_s=0.2)
        assert ready["modalities"] == ["text", "audio", "visual"] and ready["rate_hz"] == 10.0
        _send_audio(ws, audio, piece_s=0.1)
        ws.send_text(json.dumps({"type": "stop"}))
        updates, final = _until_final(ws)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1000
    assert updates, "no update before the final answer"
    assert [u["seq"] for u in updates] == list(range(1, len(updates) + 1))
    times = [u["stream_time_s"] for u in updates]
    assert times == sorted(times) and times[-1] < bundle.length / 10
    for u in updates:
        assert u["lag_s"] >= 0 and u["latency_ms"] > 0 and u["dropped_frames"] == 0
        assert set(u["sentiment"]["probabilities"]) == {"negative", "neutral", "positive"}
    assert final["reason"] == "stop" and final["stream_time_s"] == pytest.approx(bundle.length / 10)
    result = final["result"]
    assert result["modalities"]["steps"] == bundle.length
    assert result["modalities"]["audio_seconds"] == pytest.approx(len(audio) / RATE, abs=1e-3)
    body = {
        "profile": bundle.profile,
        "features": {m: f.tolist() for m, f in features.items()},
        "masks": {m: k.tolist() for m, k in masks.items()},
    }
    offline = streams.client.post("/v1/predict/features", json=body)
    assert offline.status_code == 200, offline.text
    want = offline.json()
    assert result["sentiment"]["score"] == pytest.approx(want["sentiment"]["score"], abs=1e-4)
    assert result["sentiment"]["label"] == want["sentiment"]["label"]
    for name, p in want["sentiment"]["probabilities"].items():
        assert result["sentiment"]["probabilities"][name] == pytest.approx(p, abs=1e-4)
    assert result["modalities"]["used"] == want["modalities"]["used"]
    # The last update's answer is the model on the rows it covers: a prefix of the clip.
    rows = round(updates[-1]["stream_time_s"] * 10)
    prefix = {
        "profile": bundle.profile,
        "features": {m: f[:rows].tolist() for m, f in features.items()},
        "masks": {m: k[:rows].tolist() for m, k in masks.items()},
    }
    want_prefix = streams.client.post("/v1/predict/features", json=prefix).json()
    assert updates[-1]["sentiment"]["score"] == pytest.approx(
        want_prefix["sentiment"]["score"], abs=1e-4
    )
    # The source holds rows back 3 steps (0.3 s) after their audio; a provisional update
    # covers them, a committed one does not.
    provisional = [u["provisional_s"] for u in updates]
    if preview:
        assert max(provisional) >= 0.2 and sum(p > 0 for p in provisional) >= len(updates) // 2
    else:
        assert provisional == [0.0] * len(updates)
    for u in updates:
        assert u["committed_time_s"] <= u["stream_time_s"]
        assert u["provisional_s"] == pytest.approx(
            u["stream_time_s"] - u["committed_time_s"], abs=2e-3
        )


def test_s16le_audio_and_update_fields(stream_app) -> None:
    streams = stream_app()
    with streams.client.websocket_connect("/v1/stream") as ws:
        _start(ws, audio={"format": "s16le", "sample_rate": RATE}, update_interval_s=1.0)
        _send_audio(ws, _tone(4.0), piece_s=0.5, fmt="s16le")
        ws.send_text(json.dumps({"type": "stop"}))
        updates, final = _until_final(ws)
    assert streams.sources[0].received == 4 * RATE
    assert updates  # sent faster than real time: updates coalesce
    first = updates[0]
    assert set(first) == {"type", "seq", "stream_time_s", "received_s", "sentiment", "emotions",
                          "words", "words_total", "modalities", "latency_ms", "lag_s",
                          "dropped_frames", "committed_time_s", "provisional_s",
                          "committed_lag_s"}  # fmt: skip
    assert first["modalities"]["active"] == ["text", "audio", "visual"]
    assert first["lag_s"] == pytest.approx(first["received_s"] - first["stream_time_s"], abs=1e-3)
    assert first["committed_lag_s"] == pytest.approx(first["lag_s"], abs=1e-3)  # no preview
    assert final["result"]["modalities"]["steps"] == 40


def test_provisional_updates_cover_more_and_lag_less(stream_app) -> None:
    """The same stream with and without provisional rows: the provisional answer covers the
    rows held back, its lag is the audio received minus the time it covers (docs/STREAMING.md),
    and the committed part is reported as it would be without the preview."""
    covered: dict[bool, list[dict[str, Any]]] = {}
    for preview in (False, True):
        streams = stream_app(preview=preview)
        with streams.client.websocket_connect("/v1/stream") as ws:
            _start(ws, update_interval_s=0.5)
            _send_audio(ws, _tone(5.0), piece_s=0.5)
            ws.send_text(json.dumps({"type": "stop"}))
            updates, final = _until_final(ws)
        assert updates and final["result"]["modalities"]["steps"] == 50
        for u in updates:
            assert u["lag_s"] == pytest.approx(
                max(0.0, u["received_s"] - u["stream_time_s"]), abs=2e-3
            )
            assert u["committed_lag_s"] == pytest.approx(
                max(0.0, u["received_s"] - u["committed_time_s"]), abs=2e-3
            )
            assert u["lag_s"] <= u["committed_lag_s"] + 1e-9
        covered[preview] = [u for u in updates if u["committed_time_s"] > 0]
    # The source holds rows back 3 steps after their audio: a provisional update covers those
    # 0.3 s more than its committed part, and its lag is 0.3 s less.
    assert covered[True] and covered[False]
    for u in covered[True]:
        assert u["provisional_s"] == pytest.approx(0.3, abs=1e-3)
        assert u["lag_s"] == pytest.approx(max(0.0, u["committed_lag_s"] - 0.3), abs=2e-3)
    assert all(u["provisional_s"] == 0 for u in covered[False])


def _expect_refused(client: TestClient, send: Callable[[Any], None], code: int, kind: str) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        send(ws)
        closed, error = _closed_with(ws)
    assert closed == code, (closed, error)
    assert error is not None and error["error"]["type"] == kind, error


def _jpeg(rng: np.random.Generator, width: int = 64, height: int = 48) -> bytes:
    import cv2

    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return bytes(data)


MALFORMED: dict[str, tuple[Callable[[Any], None], int, str]] = {
    "start-not-json": (lambda ws: ws.send_text("{nope"), 4400, "stream_protocol"),
    "start-unknown-field": (
        lambda ws: ws.send_text(
            json.dumps(
                {"type": "start", "audio": {"format": "f32le", "sample_rate": RATE}, "colour": 1}
            )
        ),
        4400,
        "stream_protocol",
    ),
    "start-bad-rate": (
        lambda ws: ws.send_text(
            json.dumps({"type": "start", "audio": {"format": "f32le", "sample_rate": 7}})
        ),
        4400,
        "stream_protocol",
    ),
    "binary-first": (lambda ws: ws.send_bytes(b"\x01"), 4400, "stream_protocol"),
    "short-header": (lambda ws: (_start(ws), ws.send_bytes(b"\x01\x00")), 4400, "stream_protocol"),
    "unknown-kind": (
        lambda ws: (_start(ws), ws.send_bytes(encode_frame(9, 0.0, b"abcd"))),
        4400,
        "stream_protocol",
    ),
    "length-mismatch": (
        lambda ws: (_start(ws), ws.send_bytes(encode_frame(KIND_AUDIO, 0.0, b"abcd") + b"xx")),
        4400,
        "stream_protocol",
    ),
    "nan-timestamp": (
        lambda ws: (_start(ws), ws.send_bytes(encode_frame(KIND_AUDIO, float("nan"), b"abcd"))),
        4400,
        "stream_protocol",
    ),
    "partial-sample": (
        lambda ws: (_start(ws), ws.send_bytes(encode_frame(KIND_AUDIO, 0.0, b"abc"))),
        4400,
        "stream_protocol",
    ),
    "nan-samples": (
        lambda ws: (
            _start(ws),
            ws.send_bytes(encode_frame(KIND_AUDIO, 0.0, np.full(8, np.nan, "<f4").tobytes())),
        ),
        4400,
        "stream_protocol",
    ),
    "video-not-announced": (
        lambda ws: (_start(ws), ws.send_bytes(encode_frame(KIND_VIDEO, 0.0, b"\xff\xd8"))),
        4400,
        "stream_protocol",
    ),
    "not-a-jpeg": (
        lambda ws: (
            _start(ws, video={"format": "jpeg"}),
            _send_audio(ws, _tone(0.5)),
            ws.send_bytes(encode_frame(KIND_VIDEO, 0.1, b"\xff\xd8\xff\xe0garbage")),
            _send_audio(ws, _tone(1.5)),
        ),
        4400,
        "stream_protocol",
    ),
    "frames-back-in-time": (
        lambda ws: (
            _start(ws, video={"format": "jpeg"}),
            ws.send_bytes(encode_frame(KIND_VIDEO, 1.0, _jpeg(np.random.default_rng(0)))),
            ws.send_bytes(encode_frame(KIND_VIDEO, 0.5, _jpeg(np.random.default_rng(1)))),
        ),
        4400,
        "stream_protocol",
    ),
    "text-not-stop": (
        lambda ws: (_start(ws), ws.send_text(json.dumps({"type": "pause"}))),
        4400,
        "stream_protocol",
    ),
    "too-large": (
        lambda ws: (_start(ws), ws.send_bytes(encode_frame(KIND_AUDIO, 0.0, bytes(4096 * 5)))),
        4413,
        "payload_too_large",
    ),
}


def test_malformed_input_ends_only_its_stream(stream_app) -> None:
    """Every malformed input ends its own stream with a close code and reason, while another
    stream keeps getting updates and ends with its final answer."""
    streams = stream_app(
        stream_max_message_bytes=16384, stream_max_streams=3, stream_idle_timeout_s=120.0
    )
    with streams.client.websocket_connect("/v1/stream") as healthy:
        _start(healthy, update_interval_s=0.2)
        tone = _tone(6.0)
        sent = 0
        for name, (send, code, kind) in MALFORMED.items():
            _expect_refused(streams.client, send, code, kind)
            piece = tone[sent : sent + int(0.4 * RATE)]
            _send_audio(healthy, piece, piece_s=0.1)
            sent += len(piece)
            update = healthy.receive_json()
            assert update["type"] == "update", (name, update)
        _send_audio(healthy, tone[sent:])
        healthy.send_text(json.dumps({"type": "stop"}))
        _, final = _until_final(healthy)
    assert final["reason"] == "stop" and final["result"]["modalities"]["steps"] == 60
    health = streams.client.get("/v2/health/ready")
    assert health.status_code == 200
    assert streams.client.app.state.core.active_streams == 0  # type: ignore[attr-defined]
    # Every stream's source was closed once it ended (refused, failed or finished).
    _wait_closed(streams)


def _wait_closed(streams: Streams, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(source.closed for source in streams.sources):
        assert time.monotonic() < deadline, [s.closed for s in streams.sources]
        time.sleep(0.01)
    assert streams.sources


def test_too_many_streams_are_refused(stream_app) -> None:
    streams = stream_app(stream_max_streams=1)
    with streams.client.websocket_connect("/v1/stream") as first:
        _start(first)
        _expect_refused(streams.client, _start_only, 4429, "over_capacity")
        first.send_text(json.dumps({"type": "stop"}))
        _, final = _until_final(first)
    assert final["result"] is None  # no audio: nothing scored
    with streams.client.websocket_connect("/v1/stream") as again:  # the slot is free again
        _start(again)
    metrics = streams.client.get("/metrics").text
    assert 'cmamba_rejected_requests_total{reason="streams"} 1.0' in metrics


def _start_only(ws: Any) -> None:
    ws.send_text(json.dumps({"type": "start", "audio": {"format": "f32le", "sample_rate": RATE}}))


def test_token_in_first_message_or_subprotocol(stream_app) -> None:
    streams = stream_app(api_key="s3cret")
    client = streams.client
    _expect_refused(client, _start_only, 4401, "unauthorized")
    with client.websocket_connect("/v1/stream") as ws:
        _start(ws, token="s3cret")
    with client.websocket_connect(
        "/v1/stream", subprotocols=["cmamba.v1", "cmamba.token.s3cret"]
    ) as ws:
        assert ws.accepted_subprotocol == "cmamba.v1"
        _start(ws)
    with client.websocket_connect(
        "/v1/stream", subprotocols=["cmamba.v1", "cmamba.token.wrong"]
    ) as ws:
        closed, error = _closed_with(ws)
    assert closed == 4401 and error is not None


def test_idle_timeout_ends_with_a_final_answer(stream_app) -> None:
    streams = stream_app(stream_idle_timeout_s=0.5)
    with streams.client.websocket_connect("/v1/stream") as ws:
        _start(ws, update_interval_s=0.5)
        _send_audio(ws, _tone(1.5))
        _, final = _until_final(ws)  # the client sends nothing more
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert final["reason"] == "idle" and closed.value.code == 4408
    assert final["result"]["modalities"]["steps"] == 15  # finish() gives every row received


def test_max_duration_ends_with_a_final_answer(stream_app) -> None:
    streams = stream_app(stream_max_duration_s=1.0)
    with streams.client.websocket_connect("/v1/stream") as ws:
        _start(ws)
        _send_audio(ws, _tone(2.0))
        _, final = _until_final(ws)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert final["reason"] == "max_duration" and closed.value.code == 4002
    assert streams.sources[0].received == RATE  # audio past the limit is not taken


def test_video_frames_are_dropped_when_behind_never_audio(stream_app) -> None:
    """With a drop threshold of 0 s every frame that arrives while audio waits for the live
    features is dropped (an update interval of 10 s: no feature job before the stop); all
    audio is still taken."""
    streams = stream_app(stream_drop_video_lag_s=0.0)
    rng = np.random.default_rng(0)
    with streams.client.websocket_connect("/v1/stream") as ws:
        _start(ws, video={"format": "jpeg"}, update_interval_s=10.0)
        tone = _tone(3.0)
        for i in range(6):
            _send_audio(ws, tone[i * RATE // 2 : (i + 1) * RATE // 2])
            ws.send_bytes(encode_frame(KIND_VIDEO, i * 0.5, _jpeg(rng)))
        ws.send_text(json.dumps({"type": "stop"}))
        updates, final = _until_final(ws)
    source = streams.sources[0]
    assert source.received == len(tone)
    assert final["dropped_frames"] == 6 - len(source.frames) == 6
    assert updates == []
    metrics = streams.client.get("/metrics").text
    assert f"cmamba_stream_dropped_frames_total {float(final['dropped_frames'])}" in metrics


def test_frames_kept_when_not_behind_and_metrics(stream_app) -> None:
    streams = stream_app(stream_drop_video_lag_s=100.0)
    rng = np.random.default_rng(1)
    with streams.client.websocket_connect("/v1/stream") as ws:
        _start(ws, video={"format": "jpeg"}, update_interval_s=0.5)
        for i in range(4):
            ws.send_bytes(encode_frame(KIND_VIDEO, i * 0.5, _jpeg(rng)))
            _send_audio(ws, _tone(0.5))
        ws.send_text(json.dumps({"type": "stop"}))
        updates, final = _until_final(ws)
    assert streams.sources[0].frames == [0.0, 0.5, 1.0, 1.5]
    assert final["dropped_frames"] == 0 and final["result"]["modalities"]["frames"] == 4
    metrics = streams.client.get("/metrics").text
    assert "cmamba_stream_active 0.0" in metrics
    assert f"cmamba_stream_updates_total {float(len(updates))}" in metrics
    assert f"cmamba_stream_lag_seconds_count {float(len(updates))}" in metrics
    assert 'cmamba_stream_ended_total{reason="stop"} 1.0' in metrics


def test_jpeg_size_is_read_from_the_header() -> None:
    from service.core.streaming import StreamProtocolError, decode_jpeg, jpeg_size

    data = _jpeg(np.random.default_rng(2), width=40, height=30)
    assert jpeg_size(data) == (40, 30)
    assert decode_jpeg(data).shape == (30, 40, 3)
    big = _jpeg(np.random.default_rng(3), width=2000, height=8)
    with pytest.raises(StreamProtocolError, match="larger"):
        decode_jpeg(big)
    for bad in (b"", b"\xff\xd8", b"\x89PNG\r\n", data[:20]):
        with pytest.raises(StreamProtocolError):
            jpeg_size(bad)


def test_a_features_only_server_refuses_streams(features_app) -> None:
    client = features_app()  # no media extractor, so no live features
    with client.websocket_connect("/v1/stream") as ws:
        _start_only(ws)
        closed, error = _closed_with(ws)
    assert closed == 4501 and error is not None and error["error"]["type"] == "media_disabled"


def test_a_fatal_failure_ends_every_stream_and_refuses_new_ones(stream_app) -> None:
    streams = stream_app()
    client = streams.client
    with client.websocket_connect("/v1/stream") as ws:
        _start(ws, update_interval_s=0.2)
        _send_audio(ws, _tone(1.0))
        assert ws.receive_json()["type"] == "update"  # the stream is running
        # The instance breaks (as a dead model worker reports itself): the open stream ends
        # with "retry elsewhere" rather than hanging until the process exits.
        client.app.state.core.health.trip("model_worker", "test: the worker died")
        closed, error = _closed_with(ws)
    assert closed == 4503 and error is not None, (closed, error)
    assert error["error"]["type"] == "unavailable"
    _wait_closed(streams)  # the failed stream's source (its recogniser) is released
    _expect_refused(client, _start_only, 4503, "unavailable")
