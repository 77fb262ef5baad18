"""Every endpoint and every error status, through the test client on a tiny real model."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import wait_until

from service.main import create_app

CONTRACT_METRICS = (
    "cmamba_requests_total",
    "cmamba_request_duration_seconds",
    "cmamba_stage_duration_seconds",
    "cmamba_batch_size",
    "cmamba_queue_depth",
    "cmamba_inflight_requests",
    "cmamba_rejected_requests_total",
    "cmamba_model_info",
    "cmamba_ready",
)
# Series exported when the model runs on CUDA only: a CPU host has none (not zeros); the
# contract's three gauges are still declared there (HELP and TYPE, no sample).
GPU_CONTRACT_METRICS = (
    "cmamba_gpu_memory_allocated_bytes",
    "cmamba_gpu_memory_reserved_bytes",
    "cmamba_gpu_memory_peak_bytes",
)
GPU_METRICS = (
    "cmamba_gpu_memory_allocated_bytes",
    "cmamba_gpu_memory_reserved_bytes",
    "cmamba_gpu_memory_peak_bytes",
    "cmamba_gpu_batch_peak_memory_bytes",
)
TIMING_KEYS = ("decode", "asr", "text", "audio", "visual", "queue", "model", "total")


def assert_error(response: Any, status: int, error_type: str) -> dict[str, Any]:
    """The service's error answer; on /v2's protocol routes (not health), the Open Inference
    Protocol's (a message only)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    path = response.request.url.path
    if path.startswith("/v2") and not path.startswith("/v2/health/"):
        assert isinstance(body["error"], str) and body["error"]
    else:
        assert body["error"]["type"] == error_type
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if status == 503:
        assert int(response.headers["retry-after"]) >= 0
    return body


class Gate:
    """A ``before_forward`` hook that holds the model worker until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, features: Any, masks: Any) -> None:
        self.entered.set()
        assert self.release.wait(30)


# -- health, metadata, metrics, docs ---------------------------------------------------------


def test_health_live_and_ready(features_app: Callable[..., TestClient]) -> None:
    client = features_app()
    assert client.get("/v2/health/live").json() == {"status": "live"}
    assert client.get("/v2/health/ready").json() == {"status": "ready"}


def test_model_metadata_and_card(features_app: Callable[..., TestClient], dims: dict) -> None:
    client = features_app()
    body = client.get("/v2/models/tiny").json()
    assert body["name"] == "tiny" and body["versions"] == ["7"]
    assert body["feature_profile"] == "default-v1"
    assert {i["name"]: i["shape"] for i in body["inputs"] if i["datatype"] == "FP32"} == {
        m: [-1, -1, dim] for m, dim in dims.items()
    }
    assert body["classes"] == ["negative", "neutral", "positive"]
    assert body["architecture"]["d_model"] == 16
    assert "# tiny" in body["model_card"]
    assert len(body["checkpoint"]["sha256"]) == 64
    assert_error(client.get("/v2/models/other"), 404, "model_not_found")


def test_metrics_exposes_every_contract_name(
    features_app: Callable[..., TestClient], payload: Callable[..., dict], metric: Callable
) -> None:
    client = features_app()
    assert client.post("/v1/predict/features", json=payload(12, 0)).status_code == 200
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in CONTRACT_METRICS:
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    for name in GPU_METRICS:
        assert not any(line.startswith(name) for line in samples), f"{name} on a CPU host"
    for name in GPU_CONTRACT_METRICS:
        assert f"# TYPE {name} gauge" in text, name
    assert metric(text, "cmamba_ready") == 1.0
    assert metric(text, "cmamba_model_info", name="tiny", version="7", device="cpu") == 1.0
    assert metric(text, "cmamba_requests_total", endpoint="/v1/predict/features", status="200")
    assert metric(text, "cmamba_stage_duration_seconds_count", stage="model") == 1.0
    assert metric(text, "cmamba_batch_size_count") >= 1.0


def test_each_app_has_its_own_registry(features_app: Callable[..., TestClient]) -> None:
    first, second = features_app(), features_app()
    first.get("/v2/health/live")
    assert 'endpoint="/v2/health/live"' in first.get("/metrics").text
    assert 'endpoint="/v2/health/live"' not in second.get("/metrics").text


def test_docs_and_openapi(features_app: Callable[..., TestClient]) -> None:
    client = features_app()
    assert "swagger" in client.get("/docs").text.lower()
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/predict", "/v1/predict/features", "/v2/health/ready", "/v2/models/{name}"):
        assert path in paths
    media = paths["/v1/predict"]["post"]["requestBody"]["content"]
    assert "file" in media["multipart/form-data"]["schema"]["properties"]


def test_openapi_declares_the_bearer_token_where_it_is_checked(
    features_app: Callable[..., TestClient],
) -> None:
    # The token is checked by the routes' class, not by a FastAPI security dependency, so the
    # schema's operations and components say so through the route class and the app.
    schema = features_app().get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    for path, method in [
        ("/v1/predict/features", "post"),
        ("/v1/predict", "post"),
        ("/v2/models/{name}", "get"),
        ("/v1/timeline", "post"),
    ]:
        security = schema["paths"][path][method]["security"]
        assert security == [{"HTTPBearer": []}], path
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    assert "security" not in schema["paths"]["/v2/health/ready"]["get"]


def test_unknown_path_and_method_are_json_errors(features_app: Callable[..., TestClient]) -> None:
    client = features_app()
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/v1/predict/features"), 405, "method_not_allowed")


# -- /v1/predict/features ----------------------------------------------------------------------


def test_features_answer_fields(
    features_app: Callable[..., TestClient], payload: Callable[..., dict]
) -> None:
    client = features_app()
    response = client.post(
        "/v1/predict/features",
        json={**payload(20, 1), "transcript": "so good"},
        headers={"X-Request-ID": "abc-123"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    sentiment = body["sentiment"]
    assert -3.0 <= sentiment["score"] <= 3.0
    probabilities = sentiment["probabilities"]
    assert list(probabilities) == ["negative", "neutral", "positive"]
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert sentiment["label"] == max(probabilities, key=probabilities.get)
    assert body["modalities"]["used"] == ["text", "audio", "visual"]
    assert body["modalities"]["steps"] == 20
    assert body["modalities"]["transcript"] == "so good"
    timings = body["timings_ms"]
    assert set(TIMING_KEYS) <= set(timings)
    assert all(v >= 0 for v in timings.values())
    assert timings["total"] >= timings["model"] > 0
    assert body["gpu_memory"] == {
        "device": "cpu",
        "allocated_bytes": None,
        "reserved_bytes": None,
        "peak_allocated_bytes": None,
        "total_bytes": None,
    }
    assert body["model"] == {
        "name": "tiny",
        "version": "7",
        "device": "cpu",
        "scan_backend": body["model"]["scan_backend"],
    }
    assert body["model"]["scan_backend"]
    assert body["request_id"] == "abc-123" == response.headers["x-request-id"]
    stages = dict(
        item.strip().split(";dur=") for item in response.headers["server-timing"].split(",")
    )
    assert set(TIMING_KEYS) <= set(stages)
    assert float(stages["total"]) == pytest.approx(timings["total"], abs=1e-3)


def test_absent_modality_and_masks(
    features_app: Callable[..., TestClient], payload: Callable[..., dict]
) -> None:
    client = features_app()
    body = payload(10, 2, modalities=("text", "audio"))
    body["masks"] = {"text": [True] * 5 + [False] * 5, "audio": [False] * 10}
    answer = client.post("/v1/predict/features", json=body).json()
    assert answer["modalities"]["used"] == ["text"]


@pytest.mark.parametrize(
    ("mutate", "error_type"),
    [
        (lambda b: b.update(profile="mmsa-mosei"), "feature_mismatch"),
        (lambda b: b["features"].update(text=[[0.0] * 768] * 8), "feature_mismatch"),
        (lambda b: b["features"].update(pose=[[0.0] * 3] * 8), "feature_mismatch"),
        (lambda b: b["features"].update(audio=[[0.0] * 33] * 7), "invalid_input"),
        (lambda b: b["features"]["text"].append([0.0] * 5), "invalid_input"),
        (lambda b: b["features"].update(text=[]), "invalid_input"),
        (lambda b: b.update(features={}), "invalid_input"),
        (lambda b: b["features"].update(text=[[1e39] * 384] * 8), "invalid_input"),
        (lambda b: b.update(masks={"text": [True] * 3}), "invalid_input"),
        (lambda b: b.update(masks={m: [False] * 8 for m in b["features"]}), "invalid_input"),
        (lambda b: b.update(extra_field=1), "invalid_input"),
        (lambda b: b.pop("profile"), "invalid_input"),
    ],
    ids=[
        "profile",
        "dims",
        "modality",
        "lengths",
        "ragged",
        "empty",
        "no-modality",
        "float32-overflow",
        "mask-length",
        "all-masked",
        "extra-field",
        "no-profile",
    ],
)
def test_features_refused_with_422(
    features_app: Callable[..., TestClient],
    payload: Callable[..., dict],
    mutate: Callable[[dict], Any],
    error_type: str,
) -> None:
    client = features_app()
    body = payload(8, 3)
    mutate(body)
    assert_error(client.post("/v1/predict/features", json=body), 422, error_type)


def test_features_too_long_invalid_json_and_wrong_type(
    features_app: Callable[..., TestClient], payload: Callable[..., dict]
) -> None:
    client = features_app(max_sequence_length=16)
    assert_error(client.post("/v1/predict/features", json=payload(17, 0)), 422, "invalid_input")
    headers = {"content-type": "application/json"}
    bad = client.post("/v1/predict/features", content=b'{"profile": ', headers=headers)
    assert_error(bad, 422, "invalid_input")
    form = client.post("/v1/predict/features", data={"profile": "default-v1"})
    assert_error(form, 415, "unsupported_media")


def test_features_body_over_limit_is_413(
    features_app: Callable[..., TestClient], payload: Callable[..., dict], metric: Callable
) -> None:
    client = features_app(max_upload_bytes=50_000)
    assert_error(client.post("/v1/predict/features", json=payload(40, 0)), 413, "payload_too_large")
    assert metric(client.get("/metrics").text, "cmamba_rejected_requests_total", reason="too_large")


# -- admission, deadline -----------------------------------------------------------------------


def test_queue_full_is_503_with_retry_after(
    features_app: Callable[..., TestClient], payload: Callable[..., dict], metric: Callable
) -> None:
    gate = Gate()
    client = features_app(max_batch_size=1, max_queue_size=1, warmup=False, before_forward=gate)
    core = client.app.state.core  # type: ignore[attr-defined]
    results: list[int] = []

    def post(seed: int) -> None:
        results.append(client.post("/v1/predict/features", json=payload(8, seed)).status_code)

    running = threading.Thread(target=post, args=(1,))
    running.start()
    assert gate.entered.wait(10)  # the first clip is in the model
    queued = threading.Thread(target=post, args=(2,))
    queued.start()
    wait_until(lambda: core.queue_depth == 1)  # the second waits in the queue
    assert_error(client.post("/v1/predict/features", json=payload(8, 3)), 503, "over_capacity")
    gate.release.set()
    running.join(30)
    queued.join(30)
    assert results == [200, 200]
    text = client.get("/metrics").text
    assert metric(text, "cmamba_rejected_requests_total", reason="queue_full") == 1.0


def test_inflight_limit_is_503(
    features_app: Callable[..., TestClient], payload: Callable[..., dict], metric: Callable
) -> None:
    gate = Gate()
    client = features_app(max_inflight=1, warmup=False, before_forward=gate)
    done: list[int] = []
    first = threading.Thread(
        target=lambda: done.append(
            client.post("/v1/predict/features", json=payload(8, 1)).status_code
        )
    )
    first.start()
    assert gate.entered.wait(10)
    assert "cmamba_inflight_requests 1.0" in client.get("/metrics").text
    assert_error(client.post("/v1/predict/features", json=payload(8, 2)), 503, "over_capacity")
    gate.release.set()
    first.join(30)
    assert done == [200]
    text = client.get("/metrics").text
    assert metric(text, "cmamba_rejected_requests_total", reason="inflight_limit") == 1.0
    assert metric(text, "cmamba_inflight_requests") == 0.0


def test_deadline_is_504_and_the_worker_goes_on(
    features_app: Callable[..., TestClient], payload: Callable[..., dict], metric: Callable
) -> None:
    gate = Gate()
    client = features_app(request_timeout_s=0.3, warmup=False, before_forward=gate)
    assert_error(client.post("/v1/predict/features", json=payload(8, 1)), 504, "deadline_exceeded")
    gate.release.set()
    assert client.post("/v1/predict/features", json=payload(8, 2)).status_code == 200
    text = client.get("/metrics").text
    assert metric(text, "cmamba_rejected_requests_total", reason="deadline") == 1.0


def test_not_ready_until_warm(
    checkpoint: Path, make_settings: Callable, start_client: Callable, payload: Callable
) -> None:
    class SlowExtractor:
        """Warm-up blocks until released: the app must stay not-ready meanwhile."""

        release = threading.Event()

        def warmup(self) -> None:
            assert self.release.wait(30)

        def extract(self, path: Path, transcript: str | None = None) -> Any:
            raise AssertionError("not used")

    extractor = SlowExtractor()
    app = create_app(make_settings(enable_media=True), extractor=extractor)
    client = start_client(app, wait=False)
    assert_error(client.get("/v2/health/ready"), 503, "not_ready")
    assert client.get("/v2/health/live").status_code == 200
    assert_error(client.post("/v1/predict/features", json=payload(8, 0)), 503, "not_ready")
    assert "cmamba_ready 0.0" in client.get("/metrics").text
    extractor.release.set()
    assert app.state.core.wait_started(30)
    assert client.get("/v2/health/ready").status_code == 200
    assert "cmamba_ready 1.0" in client.get("/metrics").text


def test_draining_refuses_new_work(
    features_app: Callable[..., TestClient], payload: Callable[..., dict]
) -> None:
    client = features_app()
    client.app.state.core.begin_drain()  # type: ignore[attr-defined]
    assert_error(client.get("/v2/health/ready"), 503, "draining")
    assert_error(client.post("/v1/predict/features", json=payload(8, 0)), 503, "draining")
    assert client.get("/v2/health/live").status_code == 200


def test_missing_checkpoint_is_a_clear_startup_error(
    make_settings: Callable, tmp_path: Path
) -> None:
    from service.errors import StartupError

    app = create_app(make_settings(model_path=tmp_path / "missing"))
    with pytest.raises(StartupError, match=r"no checkpoint at .*missing"), TestClient(app):
        pass


# -- auth --------------------------------------------------------------------------------------


def test_bearer_token_guards_all_but_health_and_metrics(
    features_app: Callable[..., TestClient], payload: Callable[..., dict]
) -> None:
    client = features_app(api_key="s3cret")
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/metrics").status_code == 200
    for method, path in [
        ("post", "/v1/predict/features"),
        ("post", "/v1/predict"),
        ("get", "/v2/models/tiny"),
        ("get", "/docs"),
        ("get", "/openapi.json"),
    ]:
        response = client.request(method, path, json=payload(8, 0))
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    wrong = {"Authorization": "Bearer nope"}
    assert_error(client.get("/v2/models/tiny", headers=wrong), 401, "unauthorized")
    right = {"Authorization": "Bearer s3cret"}
    assert client.post("/v1/predict/features", json=payload(8, 0), headers=right).status_code == 200
    assert client.get("/v2/models/tiny", headers=right).status_code == 200
    # The header is read as FastAPI's HTTPBearer reads it: scheme in any case, other schemes
    # and an empty token refused.
    for headers, status in [
        ({"Authorization": "bearer s3cret"}, 200),
        ({"Authorization": "Basic s3cret"}, 401),
        ({"Authorization": "Bearer "}, 401),
        ({"Authorization": "s3cret"}, 401),
    ]:
        for path in ("/v1/predict/features", "/v2/models/tiny"):
            response = client.request(
                "post" if "predict" in path else "get", path, json=payload(8, 0), headers=headers
            )
            assert response.status_code == status, (path, headers)


def test_bearer_token_is_checked_before_anything_else(
    features_app: Callable[..., TestClient], payload: Callable[..., dict]
) -> None:
    # A request without the token learns nothing about its other faults: 401, not 422.
    client = features_app(api_key="s3cret")
    right = {"Authorization": "Bearer s3cret"}
    as_json = {"Content-Type": "application/json"}
    for path, kwargs, headers in [
        ("/v1/predict/features?attribution=maybe", {"json": payload(8, 0)}, {}),
        ("/v1/predict/features", {"content": b"{not json"}, as_json),
        ("/v1/timeline?window=-3", {"files": {"file": ("a.wav", b"x")}}, {}),
    ]:
        assert_error(client.post(path, headers=headers, **kwargs), 401, "unauthorized")
        answer = client.post(path, headers={**headers, **right}, **kwargs)
        assert answer.status_code == 422, (path, answer.text)


def test_public_docs_setting(features_app: Callable[..., TestClient]) -> None:
    client = features_app(api_key="s3cret", public_docs=True)
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/v2/models/tiny").status_code == 401


def test_auth_off_by_default(features_app: Callable[..., TestClient]) -> None:
    client = features_app()
    assert client.get("/v2/models/tiny").status_code == 200


# -- /v1/predict (real extractor) ---------------------------------------------------------------


@pytest.fixture
def media_client(
    checkpoint: Path,
    make_settings: Callable,
    start_client: Callable[..., TestClient],
    real_extractor: Any,
    tmp_path: Path,
) -> TestClient:
    settings = make_settings(enable_media=True, upload_dir=tmp_path / "uploads")
    return start_client(create_app(settings, extractor=real_extractor))


def test_predict_media_clip(media_client: TestClient, shared_media: Path) -> None:
    clip = shared_media / "cremad_1001_DFA_HAP_XX.mp4"
    response = media_client.post(
        "/v1/predict",
        files={"file": (clip.name, clip.read_bytes(), "video/mp4")},
        data={"transcript": "Don't forget a jacket"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    modalities = body["modalities"]
    assert modalities["transcript"] == "Don't forget a jacket"
    assert modalities["frames"] > 0 and modalities["frames_with_face"] > 0
    assert modalities["audio_seconds"] == pytest.approx(1.9, abs=0.2)
    assert modalities["used"] == ["text", "audio", "visual"]
    timings = body["timings_ms"]
    assert timings["decode"] > 0 and timings["visual"] > 0 and timings["audio"] > 0
    assert timings["asr"] == 0.0  # the transcript was given
    assert timings["total"] >= timings["decode"] + timings["model"]
    assert "decode;dur=" in response.headers["server-timing"]


def test_predict_media_errors(media_client: TestClient, shared_media: Path, tmp_path: Path) -> None:
    image = (shared_media / "obama.jpg").read_bytes()
    video = (shared_media / "grid_bbaf2n.mp4").read_bytes()
    truncated = video[: len(video) // 3]
    two_files = {"file": ("a.mp4", video, "video/mp4"), "file2": ("b", b"1", "video/mp4")}
    cases = [
        ({"files": {"file": ("a.jpg", image, "image/jpeg")}}, 415, "unsupported_media"),
        ({"files": {"file": ("a.mp4", image, "video/mp4")}}, 415, "unsupported_media"),
        ({"files": {"file": ("a.txt", b"hello", "text/plain")}}, 415, "unsupported_media"),
        ({"json": {"file": "x"}}, 415, "unsupported_media"),
        ({"files": {"file": ("a.mp4", truncated, "video/mp4")}}, 422, "undecodable_media"),
        ({"files": {"file": ("a.mp4", b"\x00" * 4096, "video/mp4")}}, None, None),
        ({"files": {"file": ("a.mp4", b"", "video/mp4")}}, 422, "invalid_input"),
        ({"files": {"other": ("a.mp4", video, "video/mp4")}}, 422, "invalid_input"),
        ({"data": {"transcript": "x"}, "files": two_files}, 200, None),
    ]  # fmt: skip
    for kwargs, status, error_type in cases:
        response = media_client.post("/v1/predict", **kwargs)
        if status is None:  # zero bytes: unrecognised (415) or broken (422), never a 5xx
            assert response.status_code in (415, 422), response.text
            continue
        if error_type is None:
            assert response.status_code == status, response.text
            continue
        assert_error(response, status, error_type)
    assert list((tmp_path / "uploads").iterdir()) == []  # every temp file was removed


def test_features_only_server_answers_501_for_media(
    features_app: Callable[..., TestClient], shared_media: Path
) -> None:
    client = features_app()
    clip = shared_media / "jfk.flac"
    response = client.post(
        "/v1/predict", files={"file": (clip.name, clip.read_bytes(), "audio/flac")}
    )
    assert_error(response, 501, "media_disabled")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_figures_on_cuda(
    features_app: Callable[..., TestClient], payload: Callable[..., dict], metric: Callable
) -> None:
    client = features_app(device="cuda")
    body = client.post("/v1/predict/features", json=payload(32, 0)).json()
    memory = body["gpu_memory"]
    assert memory["device"].startswith("cuda")
    assert body["model"]["device"].startswith("cuda")
    assert 0 < memory["allocated_bytes"] <= memory["reserved_bytes"] <= memory["total_bytes"]
    assert memory["allocated_bytes"] <= memory["peak_allocated_bytes"] <= memory["total_bytes"]
    text = client.get("/metrics").text
    for name in GPU_METRICS:
        assert f"# TYPE {name}" in text, name
    assert metric(text, "cmamba_gpu_memory_allocated_bytes") > 0
    assert metric(text, "cmamba_gpu_memory_peak_bytes") > 0
    assert metric(text, "cmamba_gpu_batch_peak_memory_bytes_count") >= 1
    assert metric(text, "cmamba_gpu_batch_peak_memory_bytes_sum") > 0


def test_clip_without_the_models_inputs_is_422(
    make_checkpoint: Callable[..., Path],
    make_settings: Callable,
    start_client: Callable[..., TestClient],
    real_extractor: Any,
    tmp_path: Path,
) -> None:
    import soundfile

    folder = make_checkpoint(tmp_path / "text-only", modalities=("text",))
    settings = make_settings(model_path=folder, enable_media=True)
    client = start_client(create_app(settings, extractor=real_extractor))
    silence = tmp_path / "silence.wav"
    soundfile.write(silence, np.zeros(32_000, dtype=np.float32), 16_000)
    response = client.post(
        "/v1/predict", files={"file": ("silence.wav", silence.read_bytes(), "audio/wav")}
    )
    body = assert_error(response, 422, "undecodable_media")
    assert "no speech" in body["error"]["message"]


def test_emotions_answer_with_an_emotion_head_and_null_without(
    make_checkpoint, make_settings, start_client, payload, features_app, tmp_path: Path
) -> None:
    import torch

    from model import load_checkpoint
    from service.main import create_app

    classes = ("neutral", "happy", "sad")
    folder = make_checkpoint(tmp_path / "emo", emotion_classes=classes)
    client = start_client(create_app(make_settings(model_path=folder)))
    body = payload(12, 3)
    response = client.post("/v1/predict/features", json=body)
    assert response.status_code == 200, response.text
    emotions = response.json()["emotions"]
    assert list(emotions) == list(classes)
    # The answer is the model's own emotion head on the same features.
    model = load_checkpoint(folder)
    feats = {m: torch.tensor(v, dtype=torch.float32)[None] for m, v in body["features"].items()}
    with torch.no_grad():
        expected = model(feats, {}).emotion_probabilities[0].tolist()
    assert list(emotions.values()) == pytest.approx(expected, abs=1e-5)
    schema = client.get("/openapi.json").json()["components"]["schemas"]["PredictResponse"]
    assert "emotions" in schema["properties"]
    plain = features_app().post("/v1/predict/features", json=body)
    assert plain.status_code == 200 and plain.json()["emotions"] is None
