"""Reading the ``/v1/predict/features`` JSON body: a fast path, and the schema for the rest.

A features body is mostly numbers (50 steps of 384 text features are 157 kB of JSON). Parsing
it with orjson and turning each modality's list of steps into one numpy array takes about half
the time of validating the same body through the pydantic model and then converting its lists
(0.9 ms against 1.2 ms for that body on this project's CPU host), and it keeps that work off
the per-float pydantic path.

The fast path only takes bodies whose every value already has the schema's exact JSON type
(numbers in rectangular lists of steps, booleans for masks, strings): for those, validating
through :class:`FeaturesRequest` would give the same values. Anything else (a string where a
number goes, a ragged list, a missing or unknown field, invalid JSON...) goes through
``FeaturesRequest.model_validate_json``, so errors and lax conversions are exactly the
schema's, and the OpenAPI document still describes the body with that model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from service.api.schemas import FeaturesRequest
from service.errors import InvalidInputError

_FIELDS = frozenset(FeaturesRequest.model_fields)
_TRANSCRIPT_MAX: int = next(
    m.max_length
    for m in FeaturesRequest.model_fields["transcript"].metadata
    if hasattr(m, "max_length")
)
_NUMBER_KINDS = frozenset("biuf")  # bool, int, unsigned, float: what the schema's float takes


@dataclass(frozen=True)
class FeaturesBody:
    """A validated features body; ``features`` and ``masks`` hold numpy arrays or lists."""

    profile: str
    features: dict[str, Any]
    masks: dict[str, Any] | None
    transcript: str | None


def parse_features_body(body: bytes) -> FeaturesBody:
    """Validate a features body against :class:`FeaturesRequest`.

    Raises:
        InvalidInputError: the body is not valid JSON or does not match the schema (the
            message names up to five fields and what is wrong with them).
    """
    fast = _parse_fast(body)
    if fast is not None:
        return fast
    try:
        payload = FeaturesRequest.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidInputError(describe_validation_error(exc)) from None
    return FeaturesBody(payload.profile, dict(payload.features), payload.masks, payload.transcript)


def describe_validation_error(exc: ValidationError) -> str:
    """A one-line summary of a pydantic error: ``where: what`` for up to five problems."""
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def _parse_fast(body: bytes) -> FeaturesBody | None:
    """The body when every value has the schema's exact JSON type; None sends it to pydantic."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict or not data.keys() <= _FIELDS:
        return None
    profile = data.get("profile")
    features = data.get("features")
    transcript = data.get("transcript")
    masks = data.get("masks")
    if type(profile) is not str or type(features) is not dict:
        return None
    if transcript is not None and (
        type(transcript) is not str or len(transcript) > _TRANSCRIPT_MAX
    ):
        return None
    arrays: dict[str, np.ndarray] = {}
    for modality, steps in features.items():
        array = _array(steps, ndim=2, kinds=_NUMBER_KINDS)
        if array is None:
            return None
        arrays[modality] = array
    flags: dict[str, np.ndarray] | None = None
    if masks is not None:
        if type(masks) is not dict:
            return None
        flags = {}
        for modality, values in masks.items():
            mask = _array(values, ndim=1, kinds=frozenset("b"))
            if mask is None:
                return None
            flags[modality] = mask
    return FeaturesBody(profile, dict(arrays), flags, transcript)


def _array(value: Any, *, ndim: int, kinds: frozenset[str]) -> np.ndarray | None:
    """``value`` (a JSON list) as a numpy array of ``ndim`` dimensions and one of ``kinds``,
    or None when it is anything else (empty, ragged, mixed with strings or nulls, ...)."""
    if type(value) is not list or not value:
        return None
    try:
        array = np.array(value)
    except (ValueError, TypeError, OverflowError):
        return None
    if array.ndim != ndim or array.dtype.kind not in kinds:
        return None
    return array
