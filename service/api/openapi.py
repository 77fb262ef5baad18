"""What the OpenAPI schema says beyond the routes' own declarations: stable ``operationId``s
and the headers every answer carries.

An operation's id is its route's name (the handler's name, or the route's ``operation_id``), so
generated SDKs get readable method names that change only when a handler is renamed. Every
answer carries ``X-Request-ID`` (:class:`service.middleware.RequestContextMiddleware`, which also
takes a client's own); every 503 a ``Retry-After``; the answers of the use cases a
``Server-Timing`` header (:mod:`service.api.answers`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

TIMED_OPERATIONS = frozenset(
    {"predict_media", "predict_features", "predict_timeline", "model_infer", "model_version_infer"}
)
"""Operations whose successful answer repeats its stages in ``Server-Timing``."""

REQUEST_ID: dict[str, Any] = {
    "description": "the request's id: the client's own X-Request-ID when short and plain, "
    "else a new one",
    "schema": {"type": "string"},
    "example": "3f2c9b1e8d7a4c5b9e0f1a2b3c4d5e6f",
}
RETRY_AFTER: dict[str, Any] = {
    "description": "seconds to wait before trying again",
    "schema": {"type": "integer"},
    "example": 1,
}
SERVER_TIMING: dict[str, Any] = {
    "description": "the request's stages in milliseconds (the answer's timings)",
    "schema": {"type": "string"},
    "example": "queue;dur=0.412, model;dur=9.871, total;dur=14.203",
}


def operation_id(route: APIRoute) -> str:
    """The stable ``operationId`` of a route: its name."""
    return route.name


def document_headers(app: FastAPI) -> None:
    """Add the headers to ``app``'s OpenAPI schema, and drop the validation answer FastAPI
    lists on ``/v2`` operations (the protocol answers a bad request with 400)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                _document(path, operation)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document(path: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    if path == "/v2" or path.startswith("/v2/"):
        responses.pop("422", None)
    operation.setdefault("parameters", []).append(
        {"name": "X-Request-ID", "in": "header", "required": False, "schema": REQUEST_ID["schema"],
         "description": "an id for the request, echoed back (kept when at most 64 plain "
         "characters)"}
    )  # fmt: skip
    for status, response in responses.items():
        headers = response.setdefault("headers", {})
        headers["X-Request-ID"] = REQUEST_ID
        if status == "503":
            headers["Retry-After"] = RETRY_AFTER
        if status == "200" and operation.get("operationId") in TIMED_OPERATIONS:
            headers["Server-Timing"] = SERVER_TIMING
