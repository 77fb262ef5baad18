"""The one mapping of errors to HTTP answers: status, headers and the JSON error body.

Domain errors (:mod:`service.errors`) name what went wrong; this module decides the status code
and headers each is answered with, and answers framework errors (routing, validation) and
unexpected exceptions in the same JSON shape ``{"error": {"type": ..., "message": ...}}``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import (
    MAX_ECHO_CHARS,
    ClientDisconnectedError,
    DeadlineExceededError,
    FatalServiceError,
    InvalidInputError,
    JobNotFinishedError,
    JobNotFoundError,
    JobRequestError,
    JobStorageFullError,
    MediaDisabledError,
    ModelNotFoundError,
    PayloadTooLargeError,
    RetryableError,
    ServiceError,
    StreamMessageTooLargeError,
    TooManyJobsError,
    TooManyStreamsError,
    UnauthorizedError,
    UnsupportedMediaError,
    error_body,
)

logger = logging.getLogger(__name__)

STATUS_CODES: dict[type[ServiceError], int] = {
    InvalidInputError: 422,  # and its kinds: feature_mismatch, undecodable_media
    UnsupportedMediaError: 415,
    PayloadTooLargeError: 413,
    UnauthorizedError: 401,
    ModelNotFoundError: 404,
    MediaDisabledError: 501,
    ClientDisconnectedError: 499,
    FatalServiceError: 503,  # unavailable: the process exits to be restarted
    RetryableError: 503,  # not_ready, draining, over_capacity, gpu_oom
    DeadlineExceededError: 504,
    JobNotFoundError: 404,  # jobs: /v1/jobs
    JobNotFinishedError: 409,
    JobRequestError: 400,  # invalid_path, callback_not_allowed
    TooManyJobsError: 429,
    JobStorageFullError: 507,
    ServiceError: 500,
}
"""HTTP status of each domain error; an error class takes its nearest listed ancestor's."""


WS_CLOSE_CODES: dict[type[ServiceError], int] = {
    StreamMessageTooLargeError: 4413,
    InvalidInputError: 4400,  # stream_protocol and the other bad-input kinds
    UnauthorizedError: 4401,
    TooManyStreamsError: 4429,
    MediaDisabledError: 4501,  # this server makes no live features
    RetryableError: 4503,  # not_ready, draining
    ServiceError: 1011,
}
"""WebSocket close code of each domain error that ends a live stream (docs/STREAMING.md); an
error class takes its nearest listed ancestor's."""


def ws_close_code(exc: ServiceError) -> int:
    """The close code a live stream ended by ``exc`` is closed with."""
    for cls in type(exc).__mro__:
        code = WS_CLOSE_CODES.get(cls)
        if code is not None:
            return code
    return 1011


def http_status(exc: ServiceError) -> int:
    """The HTTP status a domain error is answered with."""
    for cls in type(exc).__mro__:
        status = STATUS_CODES.get(cls)
        if status is not None:
            return status
    return 500


def error_headers(exc: ServiceError, retry_after_s: int) -> dict[str, str]:
    """Extra response headers of a domain error's answer."""
    if isinstance(exc, RetryableError | TooManyJobsError):
        return {"Retry-After": str(retry_after_s)}
    if isinstance(exc, UnauthorizedError):
        return {"WWW-Authenticate": "Bearer"}
    return {}


def error_response(exc: ServiceError, retry_after_s: int) -> JSONResponse:
    """The HTTP answer for a domain error."""
    return JSONResponse(
        error_body(exc.error_type, exc.message),
        status_code=http_status(exc),
        headers=error_headers(exc, retry_after_s),
    )


# Statuses raised by the framework itself (routing, body parsing) keep their code.
_HTTP_ERROR_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media",
    422: "invalid_input",
}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p)[:MAX_ECHO_CHARS] for p in err.get("loc", ()))
        parts.append(f"{where}: {str(err.get('msg', 'invalid'))[:200]}")
    return "; ".join(parts) or "invalid request"


def install_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Map domain errors, validation errors and framework errors to JSON answers."""

    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(exc, retry_after_s)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse(error_body("invalid_input", _validation_message(exc)), status_code=422)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(error_type, str(exc.detail)),
            status_code=exc.status_code,
            headers=dict(exc.headers or {}),
        )

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    # Any other exception: UnhandledErrorMiddleware (a handler for Exception would answer,
    # then re-raise to the server, which logs the same error a second time).
    app.add_middleware(UnhandledErrorMiddleware)


class UnhandledErrorMiddleware:
    """Answers an unexpected exception with a JSON 500 and logs it once (not re-raised)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                return  # the answer is under way: nothing more can be said
            response = JSONResponse(
                error_body("internal_error", "internal server error"), status_code=500
            )
            await response(scope, receive, send)
