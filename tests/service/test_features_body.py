"""The features body reader: its fast path answers exactly what the pydantic schema answers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api.features_body import describe_validation_error, parse_features_body
from service.api.schemas import FeaturesRequest
from service.errors import InvalidInputError


def schema_reading(body: bytes) -> tuple[str, dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """What the pydantic model makes of a body, as float32 / bool arrays."""
    payload = FeaturesRequest.model_validate_json(body)
    with np.errstate(over="ignore"):  # 1e39 is out of float32 range: inf, refused later
        features = {m: np.asarray(v, dtype=np.float32) for m, v in payload.features.items()}
    masks = (
        {m: np.asarray(v, dtype=np.bool_) for m, v in payload.masks.items()}
        if payload.masks is not None
        else None
    )
    return payload.profile, features, masks


TYPED = {
    "floats": {"profile": "p", "features": {"text": [[0.5, -1.25], [3.0, 1e-3]]}},
    "ints and floats": {"profile": "p", "features": {"text": [[1, 2.5], [-3, 0]]}},
    "with masks": {
        "profile": "p",
        "features": {"text": [[0.1], [0.2]], "audio": [[1.0], [2.0]]},
        "masks": {"text": [True, False], "audio": [False, True]},
        "transcript": "hello",
    },
    "null masks and transcript": {
        "profile": "p",
        "features": {"text": [[0.1]]},
        "masks": None,
        "transcript": None,
    },
    "huge value": {"profile": "p", "features": {"text": [[1e39, 1.0]]}},
}
LAX = {
    "bools as numbers": {"profile": "p", "features": {"text": [[True, 0.5]]}},
    "numbers as strings": {"profile": "p", "features": {"text": [["0.5", "-1.25"]]}},
    "masks as 0/1": {
        "profile": "p",
        "features": {"text": [[0.1], [0.2]]},
        "masks": {"text": [1, 0]},
    },
    "masks as words": {
        "profile": "p",
        "features": {"text": [[0.1], [0.2]]},
        "masks": {"text": ["yes", "off"]},
    },
}


@pytest.mark.parametrize("body", [*TYPED.values(), *LAX.values()], ids=[*TYPED, *LAX])
def test_values_equal_the_schemas(body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    parsed = parse_features_body(raw)
    profile, features, masks = schema_reading(raw)
    assert parsed.profile == profile
    assert parsed.transcript == body.get("transcript")
    assert parsed.features.keys() == features.keys()
    for m, expected in features.items():
        with np.errstate(over="ignore"):
            got = np.asarray(parsed.features[m], dtype=np.float32)
        np.testing.assert_array_equal(got, expected)
    if masks is None:
        assert parsed.masks is None
    else:
        assert parsed.masks is not None
        for m, expected_mask in masks.items():
            np.testing.assert_array_equal(
                np.asarray(parsed.masks[m], dtype=np.bool_), expected_mask
            )


SLOW = {
    "ragged": b'{"profile": "p", "features": {"text": [[1.0, 2.0], [3.0]]}}',
    "nested deeper": b'{"profile": "p", "features": {"text": [[1.0, [2.0]]]}}',
    "bracket in a string": b'{"profile": "[p]", "features": {"text": [[1.0, 2.0]]}}',
    "repeated key": b'{"profile": "p", "profile": "q", "features": {"text": [[1.0]]}}',
    "65-bit integer": b'{"profile": "p", "features": {"text": [[36893488147419103232]]}}',
}


@pytest.mark.parametrize("raw", list(SLOW.values()), ids=list(SLOW))
def test_other_bodies_go_to_the_schema(raw: bytes) -> None:
    """What the fast path does not take is read by the pydantic model: same value or error."""
    try:
        FeaturesRequest.model_validate_json(raw)
    except ValidationError as exc:
        with pytest.raises(InvalidInputError, match=re.escape(describe_validation_error(exc))):
            parse_features_body(raw)
        return
    parsed = parse_features_body(raw)
    assert not any(isinstance(v, np.ndarray) for v in parsed.features.values())
    assert parsed.features == FeaturesRequest.model_validate_json(raw).features
    assert parsed.profile == FeaturesRequest.model_validate_json(raw).profile


@pytest.mark.parametrize("body", list(TYPED.values()), ids=list(TYPED))
def test_typed_bodies_take_the_fast_path(body: dict[str, Any]) -> None:
    parsed = parse_features_body(json.dumps(body).encode())
    assert all(isinstance(v, np.ndarray) for v in parsed.features.values())


INVALID = {
    "not json": b"{not json",
    "NaN token": b'{"profile": "p", "features": {"text": [[NaN]]}}',
    "overflow": b'{"profile": "p", "features": {"text": [[1e999]]}}',
    "flat list": b'{"profile": "p", "features": {"text": [1.0, 2.0]}}',
    "null value": b'{"profile": "p", "features": {"text": [[1.0, null]]}}',
    "word": b'{"profile": "p", "features": {"text": [["one"]]}}',
    "extra field": b'{"profile": "p", "features": {"text": [[1.0]]}, "extra": 1}',
    "no profile": b'{"features": {"text": [[1.0]]}}',
    "profile number": b'{"profile": 3, "features": {"text": [[1.0]]}}',
    "long transcript": json.dumps(
        {"profile": "p", "features": {"text": [[1.0]]}, "transcript": "x" * 10_001}
    ).encode(),
    "mask of 2": b'{"profile": "p", "features": {"text": [[1.0]]}, "masks": {"text": [2]}}',
    "array body": b"[1, 2]",
}


@pytest.mark.parametrize("raw", list(INVALID.values()), ids=list(INVALID))
def test_invalid_bodies_get_the_schemas_message(raw: bytes) -> None:
    with pytest.raises(ValidationError) as expected:
        FeaturesRequest.model_validate_json(raw)
    with pytest.raises(InvalidInputError) as got:
        parse_features_body(raw)
    assert str(got.value) == describe_validation_error(expected.value)


def test_lax_body_gets_the_typed_bodys_answer(
    features_app: Callable[..., TestClient], payload: Callable[..., dict]
) -> None:
    client = features_app()
    typed = payload(12, seed=3)
    lax = json.loads(json.dumps(typed))
    lax["features"] = {
        m: [[str(x) for x in row] for row in v] for m, v in typed["features"].items()
    }
    first = client.post("/v1/predict/features", json=typed)
    second = client.post("/v1/predict/features", json=lax)
    assert first.status_code == second.status_code == 200
    assert first.json()["sentiment"] == second.json()["sentiment"]
