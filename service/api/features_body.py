"""Reading the ``/v1/predict/features`` JSON body: a fast path, and the schema for the rest.

A features body is mostly numbers (50 steps of 384 text features are 157 kB of JSON). The fast
path parses it with simdjson and copies each modality's numbers straight into one numpy array,
without making a Python float per number (a third of the event-loop time of validating through
the pydantic model; docs/PERFORMANCE.md, "Notes from the code").

The fast path only takes bodies whose every value already has the schema's exact JSON type
(numbers in rectangular lists of steps, booleans for masks, strings, no repeated keys): for
those, validating through :class:`FeaturesRequest` would give the same values. Anything else (a
string where a number goes, a ragged or deeper list, a missing or unknown field, invalid
JSON...) goes through ``FeaturesRequest.model_validate_json``, so errors and lax conversions are
exactly the schema's, and the OpenAPI document still describes the body with that model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import simdjson
from pydantic import ValidationError

from service.api.schemas import FeaturesRequest
from service.errors import MAX_ECHO_CHARS, InvalidInputError

_FIELDS = frozenset(FeaturesRequest.model_fields)
_QUOTE = ord('"')
_OPEN_BRACKET = ord("[")  # counted with numpy, faster than bytes.count
_TRANSCRIPT_MAX: int = next(
    m.max_length
    for m in FeaturesRequest.model_fields["transcript"].metadata
    if hasattr(m, "max_length")
)
_local = threading.local()


@dataclass(frozen=True)
class FeaturesBody:
    """A validated features body; ``features`` and ``masks`` hold numpy arrays or lists."""

    profile: str
    features: dict[str, Any]
    masks: dict[str, Any] | None
    transcript: str | None


def parse_features_body(body: bytes, *, lax: bool = True) -> FeaturesBody:
    """Validate a features body against :class:`FeaturesRequest`.

    ``lax=False`` takes the fast path only: a body it declines is refused instead of being
    validated by the schema, whose parse holds the GIL for the whole document (1.5 s for
    48 MB), so that a large body never stalls the event loop's thread for long.

    Raises:
        InvalidInputError: the body is not valid JSON or does not match the schema (the
            message names up to five fields and what is wrong with them).
    """
    if not lax and _too_many_quotes(body):
        fast = None  # strings where numbers go: declined before the GIL-holding parse
    else:
        fast = _parse_fast(body)
    if fast is not None:
        return fast
    if not lax:
        raise InvalidInputError(
            f"a features body of {len(body)} bytes must be plain JSON in the schema's exact "
            'types: {"profile": str, "features": {modality: [[number, ...], ...]}, "masks"?: '
            '{modality: [bool, ...]}, "transcript"?: str}, numbers as JSON numbers, lists '
            "rectangular, no other or repeated fields"
        )
    try:
        payload = FeaturesRequest.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidInputError(describe_validation_error(exc)) from None
    return FeaturesBody(payload.profile, dict(payload.features), payload.masks, payload.transcript)


def _too_many_quotes(body: bytes) -> bool:
    """More ``"`` than the keys, the profile and an escaped transcript can hold: the body
    has strings where the fast path wants numbers or booleans (numpy counts without the GIL)."""
    limit = 2 * _TRANSCRIPT_MAX + 1024
    quotes = np.count_nonzero(np.frombuffer(body, dtype=np.uint8) == _QUOTE)
    return bool(quotes > limit)


def describe_validation_error(exc: ValidationError) -> str:
    """A one-line summary of a pydantic error: ``where: what`` for up to five problems."""
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p)[:MAX_ECHO_CHARS] for p in err.get("loc", ())) or "body"
        parts.append(f"{where}: {str(err.get('msg', 'invalid'))[:200]}")
    return "; ".join(parts)


def _parser() -> simdjson.Parser:
    """This thread's parser (a parser is reused: making one per body costs as much as parsing)."""
    parser: simdjson.Parser | None = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
    return parser


def _parse_fast(body: bytes) -> FeaturesBody | None:
    """The body when every value has the schema's exact JSON type; None sends it to pydantic."""
    try:
        return _read(body)
    except (ValueError, TypeError, RuntimeError, KeyError, IndexError):
        # Invalid JSON, a number simdjson will not take (out of double range, a 65-bit
        # integer), a value of another type: the schema decides what it is.
        return None


def _read(body: bytes) -> FeaturesBody | None:
    try:
        doc = _parser().parse(body)
    except RuntimeError:
        # A parser refuses to parse while proxies of its last document live; start afresh.
        _local.parser = None
        doc = _parser().parse(body)
    if not isinstance(doc, simdjson.Object) or not _unique_keys(doc, _FIELDS):
        return None
    profile = doc.get("profile")
    features = doc.get("features")
    transcript = doc.get("transcript")
    masks = doc.get("masks")
    if type(profile) is not str or not isinstance(features, simdjson.Object):
        return None
    if transcript is not None and (
        type(transcript) is not str or len(transcript) > _TRANSCRIPT_MAX
    ):
        return None
    if not _unique_keys(features):
        return None
    arrays: dict[str, np.ndarray] = {}
    lists = 0  # JSON arrays the body must hold if it holds nothing else
    for modality in features:  # keys; indexing gives a proxy (items() would build lists)
        array = _steps(features[modality])
        if array is None:
            return None
        arrays[modality] = array
        lists += array.shape[0] + 1
    flags: dict[str, np.ndarray] | None = None
    if masks is not None:
        if not isinstance(masks, simdjson.Object) or not _unique_keys(masks):
            return None
        flags = {}
        for modality in masks:
            values = masks[modality]
            if not isinstance(values, simdjson.Array) or len(values) == 0:
                return None
            items = values.as_list()
            if not all(type(v) is bool for v in items):
                return None
            flags[modality] = np.array(items, dtype=np.bool_)
            lists += 1
    # The numbers were read flattened: one more "[" than counted means a list nested deeper
    # than the schema allows (or a "[" inside a string; either way, the slow path decides).
    if np.count_nonzero(np.frombuffer(body, dtype=np.uint8) == _OPEN_BRACKET) != lists:
        return None
    return FeaturesBody(profile, dict(arrays), flags, transcript)


def _unique_keys(obj: simdjson.Object, allowed: frozenset[str] | None = None) -> bool:
    keys = list(obj.keys())
    return len(set(keys)) == len(keys) and (allowed is None or set(keys) <= allowed)


def _steps(value: object) -> np.ndarray | None:
    """A (steps, values) float64 array from a JSON list of equally long lists of numbers, or
    None for anything else (empty, ragged, not lists). Raises TypeError or ValueError when a
    value is not a number (simdjson's ``as_buffer``)."""
    if not isinstance(value, simdjson.Array) or len(value) == 0:
        return None
    width = -1
    for row in value:
        if not isinstance(row, simdjson.Array) or (width >= 0 and len(row) != width):
            return None
        width = len(row)
    flat = np.frombuffer(value.as_buffer(of_type="d"), dtype=np.float64)
    if flat.size != len(value) * width:
        return None
    return flat.reshape(len(value), width)
