"""The one way an endpoint answers a use case: its JSON body, with the request's stages repeated
in a ``Server-Timing`` header."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import JSONResponse
from pydantic import BaseModel


def server_timing(timings_ms: Mapping[str, float]) -> str:
    """The ``Server-Timing`` header value of a request's ``timings_ms``."""
    return ", ".join(f"{stage};dur={ms:.3f}" for stage, ms in timings_ms.items())


def timed_answer(body: BaseModel, timings_ms: Mapping[str, float]) -> JSONResponse:
    """``body`` as JSON, with ``timings_ms`` in the ``Server-Timing`` header."""
    return JSONResponse(
        body.model_dump(mode="json"), headers={"Server-Timing": server_timing(timings_ms)}
    )
