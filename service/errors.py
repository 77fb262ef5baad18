"""Domain errors of the service and their one mapping to HTTP.

The inference core raises these exceptions and knows nothing of HTTP; :func:`install_handlers`
turns each into a JSON answer ``{"error": {"type": ..., "message": ...}}`` with its status code.
Preprocessing errors are translated here too, so every status is decided in this module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

MAX_ECHO_CHARS = 64
"""Longest client-sent value quoted in an error message (longer ones are cut)."""
MAX_ECHO_ITEMS = 5
"""Most client-sent names listed in an error message."""
MAX_MESSAGE_CHARS = 1000
"""Longest error message answered (a last bound on anything a message quotes)."""


def echo(value: object) -> str:
    """A client-sent value quoted for an error message, cut to ``MAX_ECHO_CHARS``."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= MAX_ECHO_CHARS:
        return repr(text)
    return f"{text[:MAX_ECHO_CHARS]!r}... ({len(text)} characters)"


def echo_names(names: Sequence[object]) -> str:
    """Client-sent names quoted for an error message: the first ``MAX_ECHO_ITEMS``, each cut."""
    shown = [echo(name) for name in names[:MAX_ECHO_ITEMS]]
    if len(names) > MAX_ECHO_ITEMS:
        shown.append(f"... {len(names) - MAX_ECHO_ITEMS} more")
    return f"[{', '.join(shown)}]"


class ServiceError(Exception):
    """Base of every error the service answers with; ``error_type`` names it in the JSON."""

    error_type: ClassVar[str] = "internal_error"
    status_code: ClassVar[int] = 500
    reject_reason: str | None = None
    """Label of ``rejected_requests_total`` when this error refuses a request on a limit."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self, retry_after_s: int) -> dict[str, str]:
        """Extra response headers for this error."""
        del retry_after_s
        return {}


class InvalidInputError(ServiceError):
    """The request is well-formed HTTP but its content is not acceptable."""

    error_type = "invalid_input"
    status_code = 422


class FeatureMismatchError(InvalidInputError):
    """Precomputed features do not match the loaded checkpoint's profile or dimensions."""

    error_type = "feature_mismatch"


class UndecodableMediaError(InvalidInputError):
    """The uploaded media cannot be decoded, is too long, or has no usable stream."""

    error_type = "undecodable_media"


class UnsupportedMediaError(ServiceError):
    """The request or the uploaded file has a media type the service does not take."""

    error_type = "unsupported_media"
    status_code = 415


class PayloadTooLargeError(ServiceError):
    """The request body is over the upload limit."""

    error_type = "payload_too_large"
    status_code = 413
    reject_reason = "too_large"


class UnauthorizedError(ServiceError):
    """A bearer token is required and was missing or wrong."""

    error_type = "unauthorized"
    status_code = 401

    def headers(self, retry_after_s: int) -> dict[str, str]:
        del retry_after_s
        return {"WWW-Authenticate": "Bearer"}


class ModelNotFoundError(ServiceError):
    """No model of that name is served here."""

    error_type = "model_not_found"
    status_code = 404


class MediaDisabledError(ServiceError):
    """This deployment serves precomputed features only."""

    error_type = "media_disabled"
    status_code = 501


class ClientDisconnectedError(ServiceError):
    """The client went away before its request was read (nginx's 499; nobody gets the answer)."""

    error_type = "client_closed_request"
    status_code = 499


class RetryableError(ServiceError):
    """Temporary refusal: the client may retry after ``Retry-After`` seconds."""

    status_code = 503

    def headers(self, retry_after_s: int) -> dict[str, str]:
        return {"Retry-After": str(retry_after_s)}


class NotReadyError(RetryableError):
    """The model is still loading or warming up."""

    error_type = "not_ready"
    reject_reason = "not_ready"


class DrainingError(RetryableError):
    """The server is shutting down and takes no new work."""

    error_type = "draining"
    reject_reason = "draining"


class OverCapacityError(RetryableError):
    """The queue or the in-flight limit is full; ``reason`` says which."""

    error_type = "over_capacity"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reject_reason = reason


class GpuOutOfMemoryError(RetryableError):
    """The clip did not fit in GPU memory even in a batch of one."""

    error_type = "gpu_oom"
    reject_reason = "gpu_oom"


class DeadlineExceededError(ServiceError):
    """The request was not answered within the request deadline."""

    error_type = "deadline_exceeded"
    status_code = 504
    reject_reason = "deadline"


class StartupError(RuntimeError):
    """The service cannot start (missing checkpoint, mismatched extractor...)."""


def from_preprocessing_error(exc: Exception) -> ServiceError:
    """Translate a ``preprocessing.errors`` exception into the service's own error."""
    from preprocessing import errors as pre

    message = str(exc) or type(exc).__name__
    if isinstance(exc, pre.UnsupportedMediaError):
        return UnsupportedMediaError(message)
    if isinstance(exc, pre.MediaTooLargeError):
        return PayloadTooLargeError(message)
    if isinstance(exc, pre.ExtractionStoppedError):
        return DeadlineExceededError("the request deadline passed during extraction")
    return UndecodableMediaError(message)


def error_body(error_type: str, message: str) -> dict[str, Any]:
    """The JSON body of every error answer (the message cut to ``MAX_MESSAGE_CHARS``)."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return {"error": {"type": error_type, "message": message}}


def error_response(exc: ServiceError, retry_after_s: int) -> JSONResponse:
    """The HTTP answer for a domain error."""
    return JSONResponse(
        error_body(exc.error_type, exc.message),
        status_code=exc.status_code,
        headers=exc.headers(retry_after_s),
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
