"""OpenTelemetry traces: the service's OTLP/HTTP exporter sends to a receiver started here (a
small HTTP server that decodes ``ExportTraceServiceRequest`` protobuf), and the tests read the
span tree: the request span continues the client's ``traceparent``, the stage spans are its
children with their attributes, and the batch span links to every request it served.

One test runs the app in-process (with a held model worker, so two requests share a batch);
the other a real ``cmamba serve`` process scoring a real clip, whose JSON log lines carry the
trace id. Without ``OTEL_TRACES_EXPORTER`` no part of the SDK is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import ServerProcess, wait_until
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from service.main import create_app

REPO = Path(__file__).resolve().parents[2]
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP trace receiver on a free loopback port: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.resources: list[dict[str, str]] = []
        self.content_types: list[str] = []
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                received.content_types.append(self.headers["Content-Type"])
                for resource_spans in request.resource_spans:
                    received.resources.append(
                        {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
                    )
                    for scope_spans in resource_spans.scope_spans:
                        received.spans.extend(scope_spans.spans)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]

    def children(self, parent: Span) -> dict[str, Span]:
        return {
            s.name: s
            for s in self.spans
            if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def _otel_env(receiver: Receiver) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "cmamba-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


def _attributes(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


def _traceparent(span_id: str = CLIENT_SPAN) -> str:
    return f"00-{CLIENT_TRACE}-{span_id}-01"


class Gate:
    """A ``before_forward`` hook that holds the model worker until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, features: Any, masks: Any) -> None:
        self.entered.set()
        assert self.release.wait(60)


def test_request_stage_and_batch_spans_reach_an_otlp_receiver(
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    make_settings: Callable[..., Any],
    start_client: Callable[..., TestClient],
    payload: Callable[..., dict[str, Any]],
) -> None:
    for key, value in _otel_env(receiver).items():
        monkeypatch.setenv(key, value)
    gate = Gate()
    app = create_app(
        make_settings(max_batch_size=4, max_batch_delay_ms=0.0, warmup=False),
        before_forward=gate,
    )
    client = start_client(app)
    core = app.state.core

    def post(span_id: str, seed: int) -> httpx.Response:
        return client.post(
            "/v1/predict/features",
            json=payload(8, seed),
            headers={"traceparent": _traceparent(span_id)},
        )

    # The first request holds the model; the next two wait in the queue and share a batch.
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(post, "1000000000000001", 0)
        assert gate.entered.wait(30)
        second = pool.submit(post, CLIENT_SPAN, 1)
        third = pool.submit(post, "3000000000000003", 2)
        wait_until(lambda: core.queue_depth == 2, "two clips queued")
        gate.release.set()
        answers = [f.result(60) for f in (first, second, third)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[1].json()["batch"]["size"] == 2

    def exported() -> bool:
        return len(receiver.named("batch")) >= 2 and len(receiver.named("model")) >= 3

    wait_until(exported, "the spans to be exported", timeout=20)
    assert receiver.content_types[0] == "application/x-protobuf"
    assert receiver.resources[0]["service.name"] == "cmamba-under-test"

    # The request span continues the client's trace, under the client's span.
    requests = [s for s in receiver.named("POST /v1/predict/features")]
    ours = [s for s in requests if s.parent_span_id.hex() == CLIENT_SPAN]
    assert len(ours) == 1
    request = ours[0]
    assert request.trace_id.hex() == CLIENT_TRACE
    assert request.kind == Span.SPAN_KIND_SERVER
    attributes = _attributes(request)
    assert attributes["http.route"] == "/v1/predict/features"
    assert attributes["http.response.status_code"] == 200

    # Its stage spans: children, inside it, in order, with their measured durations.
    stages = receiver.children(request)
    assert {"queue", "model"} <= set(stages)
    for name, span in stages.items():
        assert _attributes(span)["cmamba.stage"] == name
        assert _attributes(span)["cmamba.stage.duration_ms"] > 0
        assert request.start_time_unix_nano <= span.start_time_unix_nano
        assert span.end_time_unix_nano <= request.end_time_unix_nano
    assert stages["queue"].end_time_unix_nano <= stages["model"].start_time_unix_nano
    timings = answers[1].json()["timings_ms"]
    model_ns = stages["model"].end_time_unix_nano - stages["model"].start_time_unix_nano
    assert model_ns == pytest.approx(timings["model"] * 1e6, rel=1e-3)

    # The batch the request rode in: its own trace, linked to both requests it served; the
    # model stage links back to it.
    shared = [s for s in receiver.named("batch") if len(s.links) == 2]
    assert len(shared) == 1
    batch = shared[0]
    assert _attributes(batch)["cmamba.batch.size"] == 2
    linked = {(link.trace_id.hex(), link.span_id) for link in batch.links}
    assert (CLIENT_TRACE, request.span_id) in linked
    third_span = next(s for s in requests if s.parent_span_id.hex() == "3000000000000003")
    assert (CLIENT_TRACE, third_span.span_id) in linked
    assert [link.span_id for link in stages["model"].links] == [batch.span_id]


def test_a_real_server_traces_every_stage_of_a_clip_and_logs_the_trace_id(
    receiver: Receiver,
    checkpoint: Path,
    shared_media: Path,
    spawn_server: Callable[..., ServerProcess],
) -> None:
    server = spawn_server(
        {
            "CMAMBA_MODEL_PATH": str(checkpoint),
            "CMAMBA_LOG_FORMAT": "json",
            **_otel_env(receiver),
        },
        ["--log-level", "info"],
    )
    server.wait_ready()
    clip = shared_media / "cremad_1001_DFA_ANG_XX.mp4"
    answer = httpx.post(
        f"{server.url}/v1/predict",
        files={"file": (clip.name, clip.read_bytes(), "video/mp4")},
        headers={"traceparent": _traceparent()},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text

    def request_span() -> Span | None:
        found = [s for s in receiver.spans if s.parent_span_id.hex() == CLIENT_SPAN]
        return found[0] if found and receiver.named("batch") else None

    request = wait_until(request_span, "the request's spans", timeout=20, process=server)
    assert request.trace_id.hex() == CLIENT_TRACE
    assert request.name == "POST /v1/predict"
    stages = receiver.children(request)
    expected = {"upload", "decode", "asr", "text", "audio", "visual", "queue", "model"}
    assert expected <= set(stages), sorted(stages)
    timings = answer.json()["timings_ms"]
    for name in expected:
        span = stages[name]
        assert _attributes(span)["cmamba.stage.duration_ms"] == pytest.approx(
            timings[name], abs=1e-3
        )
    assert any(link.span_id == request.span_id for s in receiver.named("batch") for link in s.links)

    # The access log line of the request carries its trace id (and the request span's id).
    def traced_access_line() -> dict[str, Any] | None:
        for line in server.output().splitlines():
            if line.startswith("{") and '"path"' in line:
                entry = json.loads(line)
                if entry.get("path") == "/v1/predict" and entry.get("trace_id"):
                    return entry
        return None

    entry = wait_until(traced_access_line, "the traced access log line", process=server)
    assert entry["trace_id"] == CLIENT_TRACE
    assert entry["span_id"] == request.span_id.hex()


def test_tracing_off_imports_no_sdk(make_settings: Callable[..., Any]) -> None:
    # A fresh interpreter: build the app with no OTEL_* variable and list what got imported
    # (FastAPI itself imports the OpenTelemetry API; the SDK, the protobuf messages and the
    # service's tracing setup stay out).
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(REPO)
    code = (
        "import sys\n"
        "from service.main import create_app\n"
        "from service.settings import ServiceSettings\n"
        "app = create_app(ServiceSettings(enable_media=False))\n"
        "assert app.state.tracing is None\n"
        "heavy = ('opentelemetry.sdk', 'opentelemetry.proto', 'service.otel', 'google.protobuf')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
