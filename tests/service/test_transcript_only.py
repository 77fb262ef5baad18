"""``POST /v1/predict`` with a ``transcript`` and no ``file``: the text alone is scored.

Against a real ``cmamba serve`` process (the ``media_server`` fixture, with the real
extractor) on the tiny checkpoint.
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

TEXT = "I really loved the film, it was wonderful"


def _post_form(url: str, fields: dict[str, str], path: str = "/v1/predict") -> httpx.Response:
    # httpx sends a multipart body only when there are files: build the form by hand so that a
    # form with fields alone (or none) is multipart/form-data as a browser or curl -F sends it.
    boundary = "cmamba-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    ]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    return httpx.post(
        url + path,
        content=body,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=60,
    )


def test_a_transcript_alone_is_scored_from_the_text(media_server: Any) -> None:
    response = _post_form(media_server.url, {"transcript": f"  {TEXT} "})
    assert response.status_code == 200, response.text
    body = response.json()
    modalities = body["modalities"]
    assert modalities["used"] == ["text"]
    assert modalities["transcript"] == TEXT
    assert modalities["transcript_source"] == "client"
    assert modalities["audio_seconds"] is None and modalities["frames"] is None
    assert modalities["steps"] > 1
    assert -3.0 <= body["sentiment"]["score"] <= 3.0
    assert sum(body["sentiment"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    timings = body["timings_ms"]
    assert timings["text"] > 0 and timings["decode"] == 0 and timings["asr"] == 0
    assert "text;dur=" in response.headers["server-timing"]


def test_the_text_answer_equals_the_features_answer(
    media_server: Any, real_extractor: Any, dims: dict[str, int]
) -> None:
    # The same text features sent precomputed give the same scores: the transcript path is
    # the extractor's text features, nothing added or lost.
    features, mask = real_extractor.text_features(TEXT)
    assert features.shape[1] == dims["text"]
    payload = {
        "profile": "default-v1",
        "features": {"text": features.tolist()},
        "masks": {"text": mask.tolist()},
    }
    from_features = httpx.post(f"{media_server.url}/v1/predict/features", json=payload, timeout=60)
    from_text = _post_form(media_server.url, {"transcript": TEXT})
    assert from_features.status_code == 200, from_features.text
    assert from_text.status_code == 200, from_text.text
    a, b = from_text.json()["sentiment"], from_features.json()["sentiment"]
    assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    np.testing.assert_allclose(
        list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-5
    )


def test_a_transcript_alone_answers_its_attribution(media_server: Any) -> None:
    response = _post_form(media_server.url, {"transcript": TEXT}, "/v1/predict?attribution=true")
    assert response.status_code == 200, response.text
    attribution = response.json()["attribution"]
    assert attribution["text"] is not None


@pytest.mark.parametrize(
    "fields",
    [{}, {"transcript": "   "}, {"comment": "hello"}],
    ids=["empty-form", "blank-transcript", "other-field"],
)
def test_a_form_with_neither_file_nor_transcript_is_refused(
    media_server: Any, fields: dict[str, str]
) -> None:
    response = _post_form(media_server.url, fields)
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "neither a `file` part nor a `transcript`" in message


def test_the_timeline_still_needs_a_file(media_server: Any) -> None:
    response = _post_form(media_server.url, {"transcript": TEXT}, "/v1/timeline")
    assert response.status_code == 422, response.text
    assert "no `file` part" in response.json()["error"]["message"]


def test_a_features_only_server_refuses_a_transcript_with_501(features_server: Any) -> None:
    response = _post_form(features_server.url, {"transcript": TEXT})
    assert response.status_code == 501, response.text


def test_the_schema_takes_a_transcript_alone(media_server: Any) -> None:
    schema = httpx.get(f"{media_server.url}/openapi.json", timeout=30).json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    form = body["multipart/form-data"]["schema"]
    assert "required" not in form
    assert set(form["properties"]) == {"file", "transcript"}
    timeline = schema["paths"]["/v1/timeline"]["post"]["requestBody"]["content"]
    assert timeline["multipart/form-data"]["schema"]["required"] == ["file"]


def test_cmamba_predict_scores_a_transcript_alone(media_server: Any) -> None:
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "predict", "--transcript", TEXT, "--url",
         media_server.url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["modalities"]["used"] == ["text"]
    assert body["modalities"]["transcript"] == TEXT
