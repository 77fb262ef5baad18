"""OpenTelemetry traces, configured by the standard ``OTEL_*`` environment variables.

Off by default, at no cost: unless ``OTEL_TRACES_EXPORTER`` names ``otlp`` (or ``console``),
nothing of OpenTelemetry is imported and requests do no tracing work. When on
(:mod:`service.otel`), each request gets a server span that continues the client's W3C
``traceparent``, a child span per pipeline stage (upload, extract_wait, decode, asr, text,
audio, visual, queue, model) laid out from the measured stage times, and each model call a
``batch`` span linked to the requests it served. Spans go to an OTLP/HTTP (protobuf) endpoint:
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, else ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/traces``,
else ``http://localhost:4318/v1/traces``. The SDK reads the rest: ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` / ``_ARG``, ``OTEL_BSP_*``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.otel import Tracing

EXPORTERS = ("otlp", "console")
"""``OTEL_TRACES_EXPORTER`` values that turn tracing on."""


def tracing_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces (``OTEL_TRACES_EXPORTER`` names an exporter
    here, and ``OTEL_SDK_DISABLED`` is not true)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = {n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")}
    return bool(names & set(EXPORTERS))


def tracing_from_environment(env: Mapping[str, str] | None = None) -> Tracing | None:
    """The tracing setup the environment asks for, or None (nothing imported) when off."""
    env = os.environ if env is None else env
    if not tracing_requested(env):
        return None
    from service.otel import Tracing

    return Tracing.from_environment(env)
