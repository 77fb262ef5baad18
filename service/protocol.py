"""The HTTP protocol of ``cmamba serve``: uvicorn's httptools protocol with slow-client timeouts.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) but waits forever for a
request whose headers or body never finish: each such connection holds a file descriptor. This
subclass closes a connection whose request headers are not complete ``header_timeout_s`` after
its first byte (or after the connection opened), and one whose body is not complete
``body_timeout_s`` after its headers.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class SlowClientGuard(HttpToolsProtocol):
    """Closes connections whose request headers or body take too long to arrive."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slow_timer: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._slow_timer = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._slow_timer is not None:
            self._slow_timer.cancel()
            self._slow_timer = None

    def _too_slow(self) -> None:
        self._slow_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout_s)  # the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.body_timeout_s)

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # the WebSocket protocol takes the connection over
        super().handle_websocket_upgrade()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


def slow_client_guard(header_timeout_s: float, body_timeout_s: float) -> type[SlowClientGuard]:
    """The protocol class to hand to ``uvicorn.Config(http=...)`` with these timeouts."""
    return type(
        "ConfiguredSlowClientGuard",
        (SlowClientGuard,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s},
    )
