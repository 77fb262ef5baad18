"""A real server process with the real extractor: shared clips over HTTP, metrics, load, CLI."""

from __future__ import annotations

import asyncio
import http.client
import json
import mimetypes
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
CLIPS = ("cremad_1001_DFA_ANG_XX.mp4", "jfk.flac", "grid_bbaf2n.mpg", "cremad_1001_DFA_HAP_XX.flv")
TIMING_KEYS = ("decode", "asr", "text", "audio", "visual", "queue", "model", "total")

pytestmark = pytest.mark.slow


def post_clip(url: str, clip: Path, **data: str) -> httpx.Response:
    content_type = mimetypes.guess_type(clip.name)[0] or "application/octet-stream"
    return httpx.post(
        f"{url}/v1/predict",
        files={"file": (clip.name, clip.read_bytes(), content_type)},
        data=data,
        timeout=120,
    )


def test_shared_clips_over_http_and_metrics_move(
    media_server: Any, shared_media: Path, metric: Callable[..., float]
) -> None:
    url = media_server.url
    before = httpx.get(f"{url}/metrics").text
    for name in CLIPS:
        response = post_clip(url, shared_media / name)
        assert response.status_code == 200, (name, response.text)
        body = response.json()
        assert set(body) >= {"sentiment", "modalities", "timings_ms", "gpu_memory", "model"}
        assert body["request_id"] == response.headers["x-request-id"]
        probabilities = body["sentiment"]["probabilities"]
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert body["sentiment"]["label"] in probabilities
        assert body["model"]["name"] == "tiny" and body["model"]["version"] == "7"
        assert body["gpu_memory"]["device"] == "cpu"
        assert body["gpu_memory"]["peak_allocated_bytes"] is None
        timings = body["timings_ms"]
        assert all(timings[k] >= 0 for k in TIMING_KEYS)
        assert timings["asr"] > 0  # no transcript sent: speech recognition ran
        assert timings["total"] >= timings["asr"] + timings["model"]
        assert "total;dur=" in response.headers["server-timing"]
        modalities = body["modalities"]
        assert modalities["audio_seconds"] > 1.0
        if name == "jfk.flac":
            assert "fellow americans" in modalities["transcript"].lower()
            assert modalities["frames"] == 0 and "visual" not in modalities["used"]
        else:
            assert modalities["frames_with_face"] > 0 and "visual" in modalities["used"]
    after = httpx.get(f"{url}/metrics").text

    def moved(sample: str, **labels: str) -> float:
        return metric(after, sample, **labels) - metric(before, sample, **labels)

    assert moved("cmamba_requests_total", endpoint="/v1/predict", status="200") == len(CLIPS)
    assert moved("cmamba_request_duration_seconds_count", endpoint="/v1/predict") == len(CLIPS)
    for stage in ("decode", "asr", "text", "audio", "model"):
        assert moved("cmamba_stage_duration_seconds_count", stage=stage) == len(CLIPS), stage
    assert moved("cmamba_stage_duration_seconds_count", stage="visual") >= len(CLIPS) - 1
    assert moved("cmamba_batch_size_count") == len(CLIPS)
    assert metric(after, "cmamba_model_info", name="tiny", version="7") == 1.0
    assert metric(after, "cmamba_ready") == 1.0


def test_client_transcript_skips_asr(media_server: Any, shared_media: Path) -> None:
    response = post_clip(media_server.url, shared_media / "grid_bbaf2n.mp4", transcript="bin blue")
    body = response.json()
    assert body["modalities"]["transcript"] == "bin blue"
    assert body["timings_ms"]["asr"] == 0.0


def test_declared_oversized_body_is_refused_before_it_is_sent(media_server: Any) -> None:
    # Only the headers are sent: the server must answer 413 without waiting for the body.
    connection = http.client.HTTPConnection("127.0.0.1", media_server.port, timeout=30)
    connection.putrequest("POST", "/v1/predict")
    connection.putheader("Content-Type", "multipart/form-data; boundary=x")
    connection.putheader("Content-Length", str(10**10))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["type"] == "payload_too_large"
    connection.close()


def test_200_concurrent_requests_against_a_small_queue(
    media_server: Any, payload: Callable[..., dict], metric: Callable[..., float]
) -> None:
    url = media_server.url
    bodies = [payload(16 + i % 48, seed=i) for i in range(200)]
    before = httpx.get(f"{url}/metrics").text

    async def fire() -> list[httpx.Response | BaseException]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
            return await asyncio.gather(
                *(client.post("/v1/predict/features", json=b) for b in bodies),
                return_exceptions=True,
            )

    answers = asyncio.run(fire())
    errors = [a for a in answers if isinstance(a, BaseException)]
    assert not errors, errors[:3]  # none dropped
    responses = [a for a in answers if isinstance(a, httpx.Response)]
    statuses = [r.status_code for r in responses]
    assert len(statuses) == 200
    assert set(statuses) <= {200, 503}, set(statuses)
    assert statuses.count(200) > 0 and statuses.count(503) > 0  # the small queue did refuse
    for response in responses:
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) >= 0
            assert response.json()["error"]["type"] == "over_capacity"
        else:
            assert "sentiment" in response.json()
    after = httpx.get(f"{url}/metrics").text
    rejected = metric(after, "cmamba_rejected_requests_total") - metric(
        before, "cmamba_rejected_requests_total"
    )
    assert rejected == statuses.count(503)
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert metric(after, "cmamba_queue_depth") == 0.0
    assert httpx.post(f"{url}/v1/predict/features", json=bodies[0]).status_code == 200


def test_cli_predict_against_the_server(media_server: Any, shared_media: Path) -> None:
    clip = shared_media / "cremad_1001_DFA_HAP_XX.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "predict", str(clip), "--url", media_server.url,
         "--transcript", "Don't forget a jacket"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["modalities"]["transcript"] == "Don't forget a jacket"
    assert body["sentiment"]["label"] in ("negative", "neutral", "positive")

    image = shared_media / "obama.jpg"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "predict", str(image), "--url", media_server.url],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["type"] == "unsupported_media"


def test_cli_predict_in_process(
    make_checkpoint: Callable[..., Path], shared_media: Path, tmp_path: Path
) -> None:
    # An audio-only checkpoint: only the audio extractor is loaded and run.
    folder = make_checkpoint(tmp_path / "audio-only", modalities=("audio",))
    clip = shared_media / "jfk.flac"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "predict", str(clip), "--model-path", str(folder)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    body = json.loads(result.stdout)
    assert body["modalities"]["used"] == ["audio"]
    assert body["timings_ms"]["asr"] == 0.0 and body["timings_ms"]["visual"] == 0.0
    assert body["timings_ms"]["audio"] > 0
    assert body["modalities"]["audio_seconds"] == pytest.approx(11.0, abs=0.1)
    assert clip.is_file()  # the local mode never deletes the user's file
