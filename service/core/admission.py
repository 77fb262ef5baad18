"""Admission: the in-flight limit, refusals while not ready or draining, and the count of
requests refused or failed on a limit (``rejected_requests_total``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from service.errors import OverCapacityError, ServiceError
from service.metrics import ServiceMetrics


class Admission:
    """Hands out in-flight slots on the event loop.

    Args:
        max_inflight: the most requests inside at once.
        metrics: where the in-flight gauge and the rejection counter live.
        refusal: the error that refuses every request now (not ready, draining), or None.
    """

    def __init__(
        self,
        max_inflight: int,
        metrics: ServiceMetrics,
        refusal: Callable[[], ServiceError | None],
    ) -> None:
        self.max_inflight = max_inflight
        self.metrics = metrics
        self._refusal = refusal
        self._inflight = 0
        self._idle: asyncio.Event | None = None

    @property
    def inflight(self) -> int:
        """Requests holding a slot now (a plain int: other threads may read it)."""
        return self._inflight

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold one in-flight slot for the body of the ``async with``.

        A :class:`ServiceError` with a ``reject_reason``, raised here or in the body, is counted
        in ``rejected_requests_total`` before it goes on.

        Raises:
            ServiceError: what ``refusal`` answers (not ready, draining).
            OverCapacityError: ``max_inflight`` requests are already inside (``inflight_limit``).
        """
        try:
            refused = self._refusal()
            if refused is not None:
                raise refused
            if self._inflight >= self.max_inflight:
                raise OverCapacityError(
                    f"{self._inflight} requests in flight (limit {self.max_inflight})",
                    reason="inflight_limit",
                )
            self._inflight += 1
            self.metrics.inflight.set(self._inflight)
            if self._idle is not None:
                self._idle.clear()
            try:
                yield
            finally:
                self._inflight -= 1
                self.metrics.inflight.set(self._inflight)
                if self._inflight == 0:
                    if self._idle is None:
                        self._idle = asyncio.Event()
                    self._idle.set()
        except ServiceError as exc:
            if exc.reject_reason is not None:
                self.metrics.rejected.labels(reason=exc.reject_reason).inc()
            raise

    def wake_idle_waiters(self) -> None:
        """Let :meth:`wait_idle` return now when nothing is in flight."""
        if self._inflight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` passed first."""
        if self._inflight == 0:
            return True
        if self._idle is None:
            self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return self._inflight == 0
        return True
