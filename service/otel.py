"""The tracing setup when ``OTEL_TRACES_EXPORTER`` asks for it (:mod:`service.tracing`):
an SDK tracer provider of the app's own (not the global one), an OTLP/HTTP protobuf span
exporter, the ASGI middleware that opens each request's span, and the batch spans.

The exporter encodes with ``opentelemetry-proto`` and posts with the standard library: the
registry's ``opentelemetry-exporter-otlp-proto-http`` for this SDK needs protobuf 5 or later,
which the pinned mediapipe (protobuf < 5) rules out.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ResourceMessage
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanMessage
from opentelemetry.proto.trace.v1.trace_pb2 import Status as StatusMessage
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service import __version__
from service.core.trace_context import RequestTrace, request_trace_var
from service.logging_setup import trace_ids_var

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"
SCOPE = "cmamba"
STAGE_ORDER = ("upload", "extract_wait", "decode", "asr", "text", "audio", "visual", "queue")
"""Stages before the model, in the order a request goes through them."""

_PROPAGATOR = TraceContextTextMapPropagator()


# -- the exporter -----------------------------------------------------------------------------


def _any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list | tuple):
        return AnyValue(array_value=ArrayValue(values=[_any_value(v) for v in value]))
    return AnyValue(string_value=str(value))


def _key_values(attributes: Mapping[str, Any] | None) -> list[KeyValue]:
    return [KeyValue(key=k, value=_any_value(v)) for k, v in (attributes or {}).items()]


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """An OTLP ``ExportTraceServiceRequest`` of ``spans`` (grouped by resource and scope)."""
    grouped: dict[int, tuple[Resource, dict[str, list[SpanMessage]]]] = {}
    for span in spans:
        context = span.context
        if context is None:
            continue
        resource = span.resource
        _, scopes = grouped.setdefault(id(resource), (resource, {}))
        scope = span.instrumentation_scope.name if span.instrumentation_scope else SCOPE
        message = SpanMessage(
            trace_id=context.trace_id.to_bytes(16, "big"),
            span_id=context.span_id.to_bytes(8, "big"),
            parent_span_id=span.parent.span_id.to_bytes(8, "big") if span.parent else b"",
            flags=int(context.trace_flags),
            name=span.name,
            kind=span.kind.value + 1,  # type: ignore[arg-type]  # the protocol's UNSPECIFIED is 0
            start_time_unix_nano=span.start_time or 0,
            end_time_unix_nano=span.end_time or 0,
            attributes=_key_values(span.attributes),
            links=[
                SpanMessage.Link(
                    trace_id=link.context.trace_id.to_bytes(16, "big"),
                    span_id=link.context.span_id.to_bytes(8, "big"),
                    attributes=_key_values(link.attributes),
                )
                for link in span.links
            ],
            status=StatusMessage(
                code=span.status.status_code.value,  # type: ignore[arg-type]  # same numbers
                message=span.status.description or "",
            ),
        )
        scopes.setdefault(scope, []).append(message)
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=ResourceMessage(attributes=_key_values(resource.attributes)),
                scope_spans=[
                    ScopeSpans(scope=InstrumentationScope(name=name), spans=messages)
                    for name, messages in scopes.items()
                ],
            )
            for resource, scopes in grouped.values()
        ]
    )
    return bytes(request.SerializeToString())


def _headers(text: str) -> dict[str, str]:
    """``OTEL_EXPORTER_OTLP_HEADERS``: ``key=value`` pairs, comma separated, URL-encoded."""
    pairs = (item.split("=", 1) for item in text.split(",") if "=" in item)
    return {unquote(k).strip(): unquote(v).strip() for k, v in pairs}


class OtlpHttpSpanExporter(SpanExporter):
    """Posts spans as OTLP/HTTP protobuf to ``endpoint`` (a collector, Jaeger, Tempo...)."""

    def __init__(
        self, endpoint: str, headers: Mapping[str, str] | None = None, timeout_s: float = 10.0
    ) -> None:
        self.endpoint = endpoint
        self.headers = {"Content-Type": "application/x-protobuf", **(headers or {})}
        self.timeout_s = timeout_s

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        body = encode_spans(spans)
        request = urllib.request.Request(
            self.endpoint, data=body, headers=self.headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                answer.read()
        except (urllib.error.URLError, OSError) as exc:
            logger.warning("trace export to %s failed: %s", self.endpoint, exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def exporter_from_environment(env: Mapping[str, str]) -> SpanExporter:
    """The span exporter ``OTEL_TRACES_EXPORTER`` and ``OTEL_EXPORTER_OTLP_*`` describe."""
    names = {n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")}
    if "otlp" not in names:
        return ConsoleSpanExporter()
    protocol = env.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    if protocol and protocol != "http/protobuf":
        logger.warning("OTLP protocol %r is not supported: sending http/protobuf", protocol)
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not endpoint:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        endpoint = base.rstrip("/") + "/v1/traces" if base else DEFAULT_ENDPOINT
    headers = _headers(
        env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS", env.get("OTEL_EXPORTER_OTLP_HEADERS", ""))
    )
    timeout_ms = env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", env.get("OTEL_EXPORTER_OTLP_TIMEOUT"))
    timeout_s = float(timeout_ms) / 1000.0 if timeout_ms else 10.0
    return OtlpHttpSpanExporter(endpoint, headers, timeout_s)


# -- the tracer, the request spans and the batch spans ---------------------------------------


class Tracing:
    """The app's tracer provider and the spans it makes."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(SCOPE, __version__)

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> Tracing:
        """A provider with the ``OTEL_*`` resource and sampler, exporting in batches."""
        resource = Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or "cmamba"})
        provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER
        provider.add_span_processor(BatchSpanProcessor(exporter_from_environment(env)))
        logger.info("tracing on: %s", env.get("OTEL_TRACES_EXPORTER"))
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is left and stop."""
        self.provider.shutdown()

    @contextmanager
    def batch(
        self, traces: Sequence[RequestTrace], size: int, padded_length: int
    ) -> Iterator[None]:
        """A span around one model call, linked to each traced request it serves."""
        links = [Link(t.span_context) for t in traces]
        with self.tracer.start_as_current_span(
            "batch",
            context=trace.set_span_in_context(trace.INVALID_SPAN),  # a root of its own
            kind=SpanKind.INTERNAL,
            links=links,
            attributes={
                "cmamba.batch.size": size,
                "cmamba.batch.traced_requests": len(traces),
                "cmamba.batch.padded_length": padded_length,
            },
        ) as span:
            for t in traces:
                t.batch_contexts.append(span.get_span_context())
            yield

    def stage_spans(self, request_span: Any, record: RequestTrace, started_ns: int) -> None:
        """The request's stage spans, children of its span, laid out from the measured stage
        times: the model call ends when the timings were recorded, each stage before it ends
        where the next begins; the upload starts with the request."""
        timings = record.timings_ms or {}
        parent = trace.set_span_in_context(request_span)
        cursor = record.recorded_at_ns
        spans: list[tuple[str, int, int]] = []
        for stage in ("model", *reversed(STAGE_ORDER)):
            ms = timings.get(stage, 0.0)
            if ms <= 0.0 or stage == "upload":
                continue
            start = cursor - int(ms * 1e6)
            spans.append((stage, start, cursor))
            cursor = start
        upload_ms = timings.get("upload", 0.0)
        if upload_ms > 0.0:
            spans.append(("upload", started_ns, started_ns + int(upload_ms * 1e6)))
        for stage, start, end in spans:
            links = [Link(c) for c in record.batch_contexts] if stage == "model" else None
            span = self.tracer.start_span(
                stage,
                context=parent,
                kind=SpanKind.INTERNAL,
                start_time=start,
                links=links,
                attributes={"cmamba.stage": stage, "cmamba.stage.duration_ms": timings[stage]},
            )
            span.end(end_time=end)


class TracingMiddleware:
    """Opens each HTTP request's server span (continuing the client's ``traceparent``), puts
    its ids where log records read them, and adds the stage spans after the answer."""

    def __init__(self, app: Any, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope.get("headers", ())
            if name in (b"traceparent", b"tracestate")
        }
        method = scope.get("method", "GET")
        started_ns = time.time_ns()
        span = self.tracing.tracer.start_span(
            method,
            context=_PROPAGATOR.extract(carrier),
            kind=SpanKind.SERVER,
            start_time=started_ns,
            attributes={"http.request.method": method, "url.path": scope.get("path", "")},
        )
        context = span.get_span_context()
        record = RequestTrace(span_context=context)
        request_trace_var.set(record)
        if context.is_valid:
            trace_ids_var.set((f"{context.trace_id:032x}", f"{context.span_id:016x}"))
        status = 500

        async def send_with_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            if span.is_recording() and record.timings_ms:
                self.tracing.stage_spans(span, record, started_ns)
            span.end()
