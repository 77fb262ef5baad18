"""The Open Inference Protocol (KServe v2 / Triton HTTP), driven by the real ``tritonclient``
against a real server, and by the test client for what a client library cannot send."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import ServerProcess

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODALITIES = ("text", "audio", "visual")


@pytest.fixture(scope="module")
def triton(features_server: ServerProcess) -> Iterator[Any]:
    client = httpclient.InferenceServerClient(url=features_server.url.removeprefix("http://"))
    yield client
    client.close()


def clip_arrays(length: int, seed: int, dims: dict[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m: rng.standard_normal((length, dims[m])).round(4).astype(np.float32) for m in dims}


def v1_answer(
    url: str,
    arrays: dict[str, np.ndarray],
    masks: dict[str, np.ndarray] | None = None,
    attribution: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "profile": "default-v1",
        "features": {m: a.tolist() for m, a in arrays.items()},
    }
    if masks:
        body["masks"] = {m: a.tolist() for m, a in masks.items()}
    answer = httpx.post(
        f"{url}/v1/predict/features",
        json=body,
        params={"attribution": str(attribution).lower()},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def tensor(name: str, values: np.ndarray, binary: bool) -> Any:
    datatype = "BOOL" if values.dtype == np.bool_ else "FP32"
    item = httpclient.InferInput(name, list(values.shape), datatype)
    item.set_data_from_numpy(values, binary_data=binary)
    return item


def outputs(names: tuple[str, ...], binary: bool) -> list[Any]:
    return [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]


# -- health and metadata -------------------------------------------------------------------------


def test_probes_and_metadata_through_tritonclient(triton: Any, dims: dict[str, int]) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("tiny")
    assert triton.is_model_ready("tiny", "7")
    assert not triton.is_model_ready("tiny", "8")
    assert not triton.is_model_ready("other")
    server = triton.get_server_metadata()
    assert server["name"] == "cmamba" and server["version"]
    assert "binary_tensor_data" in server["extensions"]
    for version in ("", "7"):
        model = triton.get_model_metadata("tiny", version)
        assert model["name"] == "tiny" and model["versions"] == ["7"]
        inputs = {i["name"]: (i["datatype"], i["shape"]) for i in model["inputs"]}
        for m in MODALITIES:
            assert inputs[m] == ("FP32", [-1, -1, dims[m]])
            assert inputs[f"{m}_mask"] == ("BOOL", [-1, -1])
        assert {o["name"]: o["shape"] for o in model["outputs"]} == {
            "score": [-1],
            "probabilities": [-1, 3],
        }
    with pytest.raises(InferenceServerException) as caught:
        triton.get_model_metadata("tiny", "8")
    assert caught.value.status() == "404" and "version" in caught.value.message()


# -- inference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_equals_v1_predict_features(
    triton: Any, features_server: ServerProcess, dims: dict[str, int], binary: bool
) -> None:
    # Three clips in one request, one with masked steps: each row must equal /v1's answer.
    batch = [clip_arrays(12, seed, dims) for seed in range(3)]
    masks = np.ones((3, 12), dtype=np.bool_)
    masks[1, 8:] = False
    audio_masks = {1: {"audio": masks[1]}}
    inputs = [tensor(m, np.stack([clip[m] for clip in batch]), binary) for m in MODALITIES]
    inputs.append(tensor("audio_mask", masks, binary))
    result = triton.infer(
        "tiny",
        inputs,
        model_version="7",
        outputs=outputs(("score", "probabilities", "attribution"), binary),
        request_id="clip-42",
        parameters={"attribution": True},
    )
    answer = result.get_response()
    assert answer["id"] == "clip-42" and answer["model_name"] == "tiny"
    assert answer["model_version"] == "7"
    score = result.as_numpy("score")
    probabilities = result.as_numpy("probabilities")
    attribution = result.as_numpy("attribution")
    assert score.shape == (3,) and probabilities.shape == (3, 3) and attribution.shape == (3, 3)
    assert score.dtype == np.float32
    for row, clip in enumerate(batch):
        expected = v1_answer(features_server.url, clip, audio_masks.get(row), attribution=True)
        assert score[row] == pytest.approx(expected["sentiment"]["score"], abs=1e-6)
        assert probabilities[row].tolist() == pytest.approx(
            list(expected["sentiment"]["probabilities"].values()), abs=1e-6
        )
        assert attribution[row].tolist() == pytest.approx(
            [expected["attribution"][m] for m in MODALITIES], abs=1e-6
        )
    parameters = answer["parameters"]
    assert parameters["device"] == "cpu" and parameters["model_ms"] > 0
    assert parameters["total_ms"] >= parameters["model_ms"]
    assert parameters["batch_size"] >= 1 and isinstance(parameters["request_id"], str)


def test_default_outputs_come_back_binary(triton: Any, dims: dict[str, int]) -> None:
    # Without outputs, tritonclient asks for every output as binary data.
    clip = clip_arrays(5, 7, dims)
    result = triton.infer("tiny", [tensor("text", clip["text"][None], binary=True)])
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["score", "probabilities"]
    assert result.as_numpy("probabilities").sum() == pytest.approx(1.0, abs=1e-5)


BAD_TENSORS: dict[str, tuple[str, np.ndarray]] = {
    "datatype": ("text", np.zeros((1, 4, 384), dtype=np.float64)),
    "integer datatype": ("text", np.zeros((1, 4, 384), dtype=np.int64)),
    "rank": ("text", np.zeros((4, 384), dtype=np.float32)),
    "feature size": ("text", np.zeros((1, 4, 383), dtype=np.float32)),
    "name": ("words", np.zeros((1, 4, 384), dtype=np.float32)),
    "nan": ("text", np.full((1, 4, 384), np.nan, dtype=np.float32)),
    "mask datatype": ("text_mask", np.ones((1, 4), dtype=np.float32)),
    "empty batch": ("text", np.zeros((0, 4, 384), dtype=np.float32)),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_tensors_get_400_through_tritonclient(triton: Any, case: str) -> None:
    name, values = BAD_TENSORS[case]
    datatype = {np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64"}.get(values.dtype)
    item = httpclient.InferInput(name, list(values.shape), datatype or "FP32")
    item.set_data_from_numpy(values, binary_data=True)
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("tiny", [item])
    assert caught.value.status() == "400", caught.value
    assert caught.value.message()


def test_unknown_model_and_version_get_404(triton: Any, dims: dict[str, int]) -> None:
    item = tensor("text", clip_arrays(3, 0, dims)["text"][None], binary=False)
    for name, version in [("other", ""), ("tiny", "8")]:
        with pytest.raises(InferenceServerException) as caught:
            triton.infer(name, [item], model_version=version)
        assert caught.value.status() == "404"


# -- what a client library does not send (test client) ------------------------------------------


def v2_json(inputs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"inputs": inputs, **extra}


def text_input(steps: int = 3, **changes: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "name": "text",
        "datatype": "FP32",
        "shape": [1, steps, 384],
        "data": [0.5] * (steps * 384),
    }
    item.update(changes)
    return item


def binary_request(
    header: dict[str, Any], data: bytes, header_length: int | None = None
) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    length = len(head) if header_length is None else header_length
    return head + data, {"Inference-Header-Content-Length": str(length)}


def assert_protocol_error(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    if status == 503:
        assert int(response.headers["retry-after"]) >= 0
    message: str = body["error"]
    return message


BAD_BODIES: dict[str, tuple[Any, dict[str, str]]] = {
    "not json": (b"{nope", {}),
    "not an object": (b"[1, 2]", {}),
    "no inputs": (json.dumps({"inputs": []}).encode(), {}),
    "unknown field": (json.dumps(v2_json([text_input()], extra=1)).encode(), {}),
    "too few values": (json.dumps(v2_json([text_input(data=[0.5] * 10)])).encode(), {}),
    "string values": (json.dumps(v2_json([text_input(data=["a"] * (3 * 384))])).encode(), {}),
    "negative shape": (json.dumps(v2_json([text_input(shape=[1, -3, 384])])).encode(), {}),
    "mask of numbers": (
        json.dumps(
            v2_json(
                [
                    text_input(),
                    {"name": "text_mask", "datatype": "BOOL", "shape": [1, 3], "data": [1, 0, 1]},
                ]
            )
        ).encode(),
        {},
    ),
    "mask steps": (
        json.dumps(
            v2_json(
                [
                    text_input(),
                    {
                        "name": "text_mask",
                        "datatype": "BOOL",
                        "shape": [1, 2],
                        "data": [True, False],
                    },
                ]
            )
        ).encode(),
        {},
    ),
    "batch sizes differ": (
        json.dumps(
            v2_json(
                [
                    text_input(),
                    {
                        "name": "audio",
                        "datatype": "FP32",
                        "shape": [2, 3, 33],
                        "data": [0.0] * (2 * 3 * 33),
                    },
                ]
            )
        ).encode(),
        {},
    ),
    "every step masked": (
        json.dumps(
            v2_json(
                [
                    text_input(),
                    {"name": "text_mask", "datatype": "BOOL", "shape": [1, 3], "data": [False] * 3},
                ]
            )
        ).encode(),
        {},
    ),
    "unknown output": (json.dumps(v2_json([text_input()], outputs=[{"name": "x"}])).encode(), {}),
    "profile": (
        json.dumps(v2_json([text_input()], parameters={"feature_profile": "mmsa-mosei"})).encode(),
        {},
    ),
    "header length not a number": (b"{}", {"Inference-Header-Content-Length": "ten"}),
    "header length past the body": (b"{}", {"Inference-Header-Content-Length": "99"}),
    "binary size not the shape's": binary_request(
        v2_json([text_input(data=None, parameters={"binary_data_size": 100})]), b"\0" * 100
    ),
    "binary bytes left over": binary_request(
        v2_json([text_input(data=None, parameters={"binary_data_size": 3 * 384 * 4})]),
        b"\0" * (3 * 384 * 4 + 4),
    ),
    "binary bytes missing": binary_request(
        v2_json([text_input(data=None, parameters={"binary_data_size": 3 * 384 * 4})]),
        b"\0" * 8,
    ),
    "binary inf": binary_request(
        v2_json([text_input(data=None, parameters={"binary_data_size": 3 * 384 * 4})]),
        np.full(3 * 384, np.inf, dtype="<f4").tobytes(),
    ),
    "binary bool not 0 or 1": binary_request(
        v2_json(
            [
                text_input(),
                {
                    "name": "text_mask",
                    "datatype": "BOOL",
                    "shape": [1, 3],
                    "parameters": {"binary_data_size": 3},
                },
            ]
        ),
        b"\x01\x02\x01",
    ),
    "both data and binary": binary_request(
        v2_json([text_input(parameters={"binary_data_size": 3 * 384 * 4})]),
        b"\0" * (3 * 384 * 4),
    ),
    "batch over the limit": (
        json.dumps(v2_json([text_input(shape=[9, 1, 384], data=[0.5] * (9 * 384))])).encode(),
        {},
    ),
}


@pytest.fixture
def client(features_app: Callable[..., TestClient]) -> TestClient:
    return features_app(max_batch_size=8)


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_requests_get_the_protocols_400(client: TestClient, case: str) -> None:
    body, headers = BAD_BODIES[case]
    answer = client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert_protocol_error(answer, 400)


def test_binary_request_with_json_answer(client: TestClient, dims: dict[str, int]) -> None:
    clip = clip_arrays(6, 3, dims)
    mask = np.array([True, True, False, True, True, True])
    header = v2_json(
        [
            {"name": "audio", "datatype": "FP32", "shape": [1, 6, dims["audio"]],
             "parameters": {"binary_data_size": clip["audio"].nbytes}},
            {"name": "audio_mask", "datatype": "BOOL", "shape": [1, 6],
             "parameters": {"binary_data_size": 6}},
        ],
        outputs=[{"name": "score"}],
    )  # fmt: skip
    body, headers = binary_request(header, clip["audio"].astype("<f4").tobytes() + mask.tobytes())
    answer = client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert "inference-header-content-length" not in answer.headers
    assert "queue;dur=" in answer.headers["server-timing"]
    assert answer.headers["x-request-id"] == answer.json()["parameters"]["request_id"]
    expected = client.post(
        "/v1/predict/features",
        json={
            "profile": "default-v1",
            "features": {"audio": clip["audio"].tolist()},
            "masks": {"audio": mask.tolist()},
        },
    ).json()
    [score] = answer.json()["outputs"]
    assert score["shape"] == [1]
    assert score["data"][0] == pytest.approx(expected["sentiment"]["score"], abs=1e-6)


def test_binary_answer_layout(client: TestClient) -> None:
    answer = client.post(
        "/v2/models/tiny/infer",
        json=v2_json([text_input()], parameters={"binary_data_output": True}),
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/octet-stream"
    length = int(answer.headers["inference-header-content-length"])
    head = json.loads(answer.content[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert sizes == [4, 12] and len(answer.content) == length + 16
    probabilities = np.frombuffer(answer.content[length + 4 :], dtype="<f4")
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_infer_is_counted_in_the_service_metrics(
    client: TestClient, metric: Callable[..., float]
) -> None:
    answer = client.post("/v2/models/tiny/versions/7/infer", json=v2_json([text_input()]))
    assert answer.status_code == 200, answer.text
    text = client.get("/metrics").text
    endpoint = "/v2/models/{name}/versions/{version}/infer"
    assert metric(text, "cmamba_requests_total", endpoint=endpoint, status="200") == 1.0
    assert metric(text, "cmamba_stage_duration_seconds_count", stage="model") == 1.0


def test_over_capacity_and_draining_are_503_with_retry_after(
    features_app: Callable[..., TestClient], payload: Callable[..., dict], metric: Callable
) -> None:
    release = threading.Event()
    entered = threading.Event()

    def gate(features: Any, masks: Any) -> None:
        entered.set()
        assert release.wait(30)

    client = features_app(max_inflight=1, warmup=False, before_forward=gate)
    body = payload(8, 1)
    first = threading.Thread(target=lambda: client.post("/v1/predict/features", json=body))
    first.start()
    assert entered.wait(10)
    assert_protocol_error(client.post("/v2/models/tiny/infer", json=v2_json([text_input()])), 503)
    release.set()
    first.join(30)
    text = client.get("/metrics").text
    assert metric(text, "cmamba_rejected_requests_total", reason="inflight_limit") == 1.0
    client.app.state.core.begin_drain()  # type: ignore[attr-defined]
    assert_protocol_error(client.get("/v2/models/tiny/ready"), 503)
    assert_protocol_error(client.post("/v2/models/tiny/infer", json=v2_json([text_input()])), 503)
    health = client.get("/v2/health/ready")  # the service's own error shape on health
    assert health.status_code == 503 and health.json()["error"]["type"] == "draining"
    assert int(health.headers["retry-after"]) >= 0


def test_emotion_head_is_an_output(
    make_checkpoint: Callable[..., Path],
    make_settings: Callable[..., Any],
    start_client: Callable[..., TestClient],
    tmp_path: Path,
) -> None:
    from service.main import create_app

    folder = make_checkpoint(tmp_path / "emo", emotion_classes=("happy", "sad"))
    client = start_client(create_app(make_settings(model_path=folder)))
    model = client.get("/v2/models/tiny").json()
    assert {"name": "emotions", "datatype": "FP32", "shape": [-1, 2]} in model["outputs"]
    answer = client.post("/v2/models/tiny/infer", json=v2_json([text_input()])).json()
    emotions = next(o for o in answer["outputs"] if o["name"] == "emotions")
    expected = client.post(
        "/v1/predict/features",
        json={"profile": "default-v1", "features": {"text": [[0.5] * 384] * 3}},
    ).json()["emotions"]
    assert emotions["data"] == pytest.approx([expected["happy"], expected["sad"]], abs=1e-6)


def test_v2_errors_are_never_500(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    good = json.dumps(v2_json([text_input(steps=2)])).encode()
    for _ in range(60):
        body = bytearray(good)
        for _ in range(int(rng.integers(1, 6))):
            body[int(rng.integers(0, len(body)))] = int(rng.integers(32, 127))
        answer = client.post("/v2/models/tiny/infer", content=bytes(body))
        assert answer.status_code in (200, 400), (answer.status_code, answer.text)
    for path in ("/v2/models/tiny/versions", "/v2/models", "/v2/models/tiny/infer/x"):
        assert_protocol_error(client.get(path), 404)
    assert_protocol_error(client.get("/v2/models/tiny/infer"), 405)


# -- the OpenAPI schema --------------------------------------------------------------------------

OPERATIONS = {
    ("post", "/v1/predict"): "predict_media",
    ("post", "/v1/predict/features"): "predict_features",
    ("post", "/v1/timeline"): "predict_timeline",
    ("post", "/v1/jobs"): "submit_job",
    ("get", "/v1/jobs"): "list_jobs",
    ("get", "/v1/jobs/{job_id}"): "get_job",
    ("delete", "/v1/jobs/{job_id}"): "delete_job",
    ("get", "/v1/jobs/{job_id}/result"): "get_job_result",
    ("get", "/metrics"): "metrics",
    ("get", "/v2/health/live"): "server_live",
    ("get", "/v2/health/ready"): "server_ready",
    ("get", "/v2"): "server_metadata",
    ("get", "/v2/models/{name}"): "model_metadata",
    ("get", "/v2/models/{name}/versions/{version}"): "model_version_metadata",
    ("get", "/v2/models/{name}/ready"): "model_ready",
    ("get", "/v2/models/{name}/versions/{version}/ready"): "model_version_ready",
    ("post", "/v2/models/{name}/infer"): "model_infer",
    ("post", "/v2/models/{name}/versions/{version}/infer"): "model_version_infer",
}


def openapi_schema() -> dict[str, Any]:
    from service.main import create_app
    from service.settings import ServiceSettings

    schema: dict[str, Any] = create_app(ServiceSettings(model_path=Path("unused"))).openapi()
    return schema


def test_openapi_operation_ids_are_stable_and_readable() -> None:
    paths = openapi_schema()["paths"]
    found = {(m, p): o["operationId"] for p, ops in paths.items() for m, o in ops.items()}
    assert found == OPERATIONS


def test_openapi_documents_the_headers_and_protocol_errors() -> None:
    paths = openapi_schema()["paths"]
    for path, operations in paths.items():
        for operation in operations.values():
            assert any(p["name"] == "X-Request-ID" for p in operation["parameters"])
            for status, response in operation["responses"].items():
                assert "X-Request-ID" in response["headers"], (path, status)
                if status == "503":
                    assert "Retry-After" in response["headers"], path
            if path.startswith("/v2"):
                assert "422" not in operation["responses"], path  # the protocol says 400
                for status, response in operation["responses"].items():
                    if status != "200":
                        schema = response["content"]["application/json"]["schema"]
                        assert schema["$ref"].endswith("/ProtocolError"), (path, status)
    for path in ("/v1/predict/features", "/v2/models/{name}/infer"):
        assert "Server-Timing" in paths[path]["post"]["responses"]["200"]["headers"]
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert infer["requestBody"]["content"]["application/json"]["schema"]["examples"]
    assert "Inference-Header-Content-Length" in infer["responses"]["200"]["headers"]
