"""ASGI middleware: request id and start time, per-request metrics, security headers."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.logging_setup import request_id_var
from service.metrics import ServiceMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestContextMiddleware:
    """Gives every HTTP request a start time and an id (``X-Request-ID``, echoed back).

    A client-sent ``X-Request-ID`` is kept when it is short and plain, else a new one is made.
    Handlers read both from ``request.state``; log records read the id from
    :data:`~service.logging_setup.request_id_var`. The variable is not reset on the way out:
    the server logs the answer (access log) and any error after the app returns, in the
    request's own task, whose context dies with it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _CLIENT_ID.match(candidate):
                    request_id = candidate
                break
        state = scope.setdefault("state", {})
        state["request_id"] = request_id or uuid.uuid4().hex
        request_id_var.set(state["request_id"])
        state["start_time"] = time.perf_counter()
        header = (b"x-request-id", state["request_id"].encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


class RequestMetricsMiddleware:
    """Counts every HTTP answer by route template and status, and times it.

    Paths that match no route count as ``endpoint="other"``, so scans of random paths cannot
    grow the label set.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            self.metrics.request_duration.labels(endpoint=endpoint).observe(
                time.perf_counter() - start
            )


# The web page loads its own script and style only; the video preview is a blob: URL.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# Swagger UI comes from a CDN with an inline script: only framing is refused there.
DOCS_POLICY = "frame-ancestors 'none'"
# Everything else is JSON or text, which loads nothing.
API_POLICY = "default-src 'none'; frame-ancestors 'none'"


def content_security_policy(path: str) -> str:
    """The ``Content-Security-Policy`` of an answer to ``path``."""
    if path == "/" or path.startswith("/static/"):
        return PAGE_POLICY
    if path == "/docs":
        return DOCS_POLICY
    return API_POLICY


class SecurityHeadersMiddleware:
    """Adds ``X-Content-Type-Options``, ``Content-Security-Policy`` (with ``frame-ancestors``)
    and ``Referrer-Policy`` to every HTTP answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [
            (b"x-content-type-options", b"nosniff"),
            (b"content-security-policy", content_security_policy(scope["path"]).encode()),
            (b"referrer-policy", b"no-referrer"),
        ]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
