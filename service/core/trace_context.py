"""What a traced request carries through the core, without the tracing library.

When tracing is on (:mod:`service.tracing`), the HTTP layer puts a :class:`RequestTrace` in
:data:`request_trace_var` for each request; the core fills in what it measured (the stage
timings, the batch the request rode in) and the tracing layer turns that into spans after
the answer. When tracing is off the variable stays None and nothing here costs more than one
lookup per request.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class RequestTrace:
    """A traced request's span and what the core measured for it."""

    span_context: Any
    """The request span's ``SpanContext`` (parent of its stage spans, linked from batches)."""
    timings_ms: dict[str, float] | None = None
    recorded_at_ns: int = 0
    """``time.time_ns()`` when the timings were recorded (just after the last model call)."""
    batch_contexts: list[Any] = field(default_factory=list)
    """The ``SpanContext`` of each batch span the request's clips rode in."""


request_trace_var: ContextVar[RequestTrace | None] = ContextVar(
    "cmamba_request_trace", default=None
)
"""The trace of the request being served (None when tracing is off or outside a request)."""


def note_timings(timings_ms: Mapping[str, float]) -> None:
    """Keep a request's ``timings_ms`` for its stage spans (nothing when it is not traced)."""
    trace = request_trace_var.get()
    if trace is not None:
        trace.timings_ms = dict(timings_ms)
        trace.recorded_at_ns = time.time_ns()


class BatchTracer(Protocol):
    """Opens a span around one model call, linked to the traced requests it serves."""

    def batch(
        self, traces: Sequence[RequestTrace], size: int, padded_length: int
    ) -> AbstractContextManager[None]: ...
