"""The upload limit is enforced while the body streams in, before it is read in full."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.main import create_app

CHUNK = 64 * 1024
LIMIT = 1024 * 1024
BOUNDARY = "cmambatestboundary"


class CountingBody:
    """An ASGI ``receive`` that streams a huge body in chunks and counts what the app read."""

    def __init__(self, total_bytes: int, head: bytes = b"", filler: bytes = b"\0") -> None:
        self.head = head
        self.remaining = total_bytes
        self.filler = filler
        self.bytes_read = 0

    async def __call__(self) -> dict[str, Any]:
        if self.head:
            chunk, self.head = self.head, b""
        else:
            chunk = self.filler * min(CHUNK, self.remaining)
        self.remaining -= len(chunk)
        self.bytes_read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": self.remaining > 0}


def call_app(
    client: TestClient, path: str, headers: dict[str, str], body: CountingBody
) -> tuple[int, dict[str, Any]]:
    """Run one request through the app's ASGI interface on the client's event loop."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "state": {},
    }
    assert client.portal is not None
    client.portal.call(client.app, scope, body, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(payload)


class UnusedExtractor:
    """Media is enabled, but these requests never get as far as extraction."""

    def warmup(self) -> None:
        pass

    def extract(self, path: Path, transcript: str | None = None) -> Any:
        raise AssertionError("an oversized or refused upload must not be extracted")


@pytest.fixture
def media_app(
    make_settings: Callable[..., Any], start_client: Callable[..., TestClient], tmp_path: Path
) -> Callable[..., TestClient]:
    def build(**overrides: Any) -> TestClient:
        settings = make_settings(enable_media=True, upload_dir=tmp_path, **overrides)
        return start_client(create_app(settings, extractor=UnusedExtractor()))

    return build


def multipart_head(content_type: str = "video/mp4") -> bytes:
    return (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="file"; filename="big.mp4"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()


def test_oversized_upload_is_cut_off_near_the_limit(
    media_app: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = media_app(max_upload_bytes=LIMIT)
    body = CountingBody(200 * LIMIT, head=multipart_head())  # 200 MiB offered, no length given
    status, answer = call_app(
        client,
        "/v1/predict",
        {"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
        body,
    )
    assert status == 413
    assert answer["error"]["type"] == "payload_too_large"
    assert LIMIT < body.bytes_read <= LIMIT + CHUNK  # stopped one chunk past the limit
    assert list(tmp_path.iterdir()) == []  # the partial temp file is gone


def test_declared_length_over_the_limit_reads_nothing(
    media_app: Callable[..., TestClient],
) -> None:
    client = media_app(max_upload_bytes=LIMIT)
    body = CountingBody(200 * LIMIT, head=multipart_head())
    status, answer = call_app(
        client,
        "/v1/predict",
        {
            "content-type": f"multipart/form-data; boundary={BOUNDARY}",
            "content-length": str(200 * LIMIT),
        },
        body,
    )
    assert status == 413 and answer["error"]["type"] == "payload_too_large"
    assert body.bytes_read == 0


def test_oversized_features_body_is_cut_off(features_app: Callable[..., TestClient]) -> None:
    client = features_app(max_upload_bytes=LIMIT)
    body = CountingBody(
        100 * LIMIT, head=b'{"profile": "default-v1", "features": {"text": [[', filler=b"1"
    )
    status, answer = call_app(
        client, "/v1/predict/features", {"content-type": "application/json"}, body
    )
    assert status == 413 and answer["error"]["type"] == "payload_too_large"
    assert body.bytes_read <= LIMIT + CHUNK


def test_unsupported_part_type_stops_reading(
    media_app: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = media_app(max_upload_bytes=100 * LIMIT)
    body = CountingBody(50 * LIMIT, head=multipart_head("image/png"))
    status, answer = call_app(
        client,
        "/v1/predict",
        {"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
        body,
    )
    assert status == 415 and answer["error"]["type"] == "unsupported_media"
    assert body.bytes_read <= CHUNK + len(multipart_head())
    assert list(tmp_path.iterdir()) == []


def test_features_only_server_refuses_media_before_reading(
    features_app: Callable[..., TestClient],
) -> None:
    client = features_app()
    body = CountingBody(10 * LIMIT, head=multipart_head())
    status, answer = call_app(
        client,
        "/v1/predict",
        {"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
        body,
    )
    assert status == 501 and answer["error"]["type"] == "media_disabled"
    assert body.bytes_read == 0


class DisconnectingBody(CountingBody):
    """The client goes away after a few chunks."""

    def __init__(self, chunks: int) -> None:
        super().__init__(100 * LIMIT, head=multipart_head())
        self.chunks = chunks

    async def __call__(self) -> dict[str, Any]:
        if self.chunks == 0:
            return {"type": "http.disconnect"}
        self.chunks -= 1
        return await super().__call__()


def test_client_disconnect_mid_upload_cleans_up(
    media_app: Callable[..., TestClient], tmp_path: Path, metric: Callable[..., float]
) -> None:
    client = media_app(max_upload_bytes=10 * LIMIT)
    status, answer = call_app(
        client,
        "/v1/predict",
        {"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
        DisconnectingBody(chunks=3),
    )
    assert status == 499 and answer["error"]["type"] == "client_closed_request"
    assert list(tmp_path.iterdir()) == []
    text = client.get("/metrics").text
    assert metric(text, "cmamba_requests_total", endpoint="/v1/predict", status="499") == 1.0
    assert metric(text, "cmamba_inflight_requests") == 0.0
