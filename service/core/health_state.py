"""The instance's health beyond its lifecycle: a fatal failure, after which the process must be
restarted, and saturation of the model queue, during which it should get no new traffic.

A fatal failure is one the process cannot recover from by itself: a CUDA error other than out
of memory (the CUDA context is left unusable), or a dead model worker or extraction thread.
Once one is reported (:meth:`HealthState.trip`), readiness and liveness answer 503, the work
held is failed with :class:`~service.errors.FatalServiceError`, and the server process exits
non-zero after a short grace so that its supervisor (Docker ``restart:``, Kubernetes) starts a
fresh one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from prometheus_client import Counter

logger = logging.getLogger(__name__)

FatalKind = Literal["cuda", "model_worker", "extraction_worker"]
"""What failed: the label ``kind`` of ``cmamba_fatal_errors_total``."""

FATAL_KINDS: tuple[FatalKind, ...] = ("cuda", "model_worker", "extraction_worker")


@dataclass(frozen=True)
class FatalFailure:
    """The first fatal failure of the process."""

    kind: FatalKind
    reason: str
    at: float
    """``time.monotonic()`` when it was reported."""


class HealthState:
    """The fatal failure (once set, for good) and the model queue's saturation.

    Thread-safe: the model worker, the extraction threads and the event loop all report here.

    Args:
        fatal_errors: ``cmamba_fatal_errors_total{kind}``, counted once per process.
        saturation_limit_s: readiness turns false once the queue has been saturated this long
            (0: never).
    """

    def __init__(self, fatal_errors: Counter, saturation_limit_s: float = 0.0) -> None:
        self._fatal_errors = fatal_errors
        for kind in FATAL_KINDS:  # each kind exported at 0 from the start, so increase() sees the 1
            fatal_errors.labels(kind=kind)
        self.saturation_limit_s = saturation_limit_s
        self._lock = threading.Lock()
        self._fatal: FatalFailure | None = None
        self._listeners: list[Callable[[FatalFailure], None]] = []
        self._saturated_since: float | None = None

    # -- fatal failures -------------------------------------------------------------------------

    @property
    def fatal(self) -> FatalFailure | None:
        """The fatal failure, or None while the process is sound."""
        return self._fatal

    def on_fatal(self, listener: Callable[[FatalFailure], None]) -> None:
        """Call ``listener`` (on the reporting thread) when the first fatal failure comes."""
        self._listeners.append(listener)

    def trip(self, kind: FatalKind, reason: str) -> bool:
        """Report a fatal failure; only the first one counts. True when this one is it."""
        with self._lock:
            if self._fatal is not None:
                return False
            failure = FatalFailure(kind=kind, reason=reason, at=time.monotonic())
            self._fatal = failure
        self._fatal_errors.labels(kind=kind).inc()
        logger.critical(
            "fatal %s failure: %s; the instance is no longer live and exits to be restarted",
            kind,
            reason,
        )
        for listener in self._listeners:
            try:
                listener(failure)
            except Exception:
                logger.exception("a fatal-failure listener failed")
        return True

    # -- saturation -----------------------------------------------------------------------------

    def observe_queue(self, depth: int, capacity: int) -> None:
        """Follow the model queue: saturation starts when it is full and ends once it has
        drained below half (so a queue that refills after each batch stays saturated)."""
        with self._lock:
            if depth >= capacity:
                if self._saturated_since is None:
                    self._saturated_since = time.monotonic()
            elif 2 * depth < capacity:
                self._saturated_since = None

    def saturated_for(self) -> float:
        """Seconds the queue has been saturated without a break (0 when it is not)."""
        since = self._saturated_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def overloaded(self) -> bool:
        """Saturated for at least ``saturation_limit_s`` (never when the limit is 0)."""
        limit = self.saturation_limit_s
        return limit > 0 and self._saturated_since is not None and self.saturated_for() >= limit
