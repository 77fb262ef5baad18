"""Logs: one format for the app, uvicorn and the CLI; timestamps, request ids, no secrets."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import ServerProcess, features_payload, stop_process
from pydantic import ValidationError

from service.logging_setup import (
    REDACTED,
    LoggingSettings,
    Redactor,
    configure_logging,
    request_id_var,
)
from service.main import create_app
from service.settings import ServiceSettings

KEY = "k3y-Sup3r.Secret_value"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def log_stream() -> Iterator[Callable[[str], io.StringIO]]:
    """``log_stream(format)``: configure logging into a buffer (the CLI's setup, at debug); the
    handler goes away after the test."""
    root = logging.getLogger()
    before = list(root.handlers), root.level

    def start(log_format: str) -> io.StringIO:
        buffer = io.StringIO()
        configure_logging(log_format, "debug", secrets=[KEY], stream=buffer)
        return buffer

    yield start
    for handler in root.handlers[:]:
        if handler not in before[0]:
            root.removeHandler(handler)
    root.setLevel(before[1])


def test_log_settings_are_validated() -> None:
    assert ServiceSettings(log_level="WARNING", log_format="json").log_level == "warning"
    assert LoggingSettings(log_level="Trace").log_level == "trace"
    with pytest.raises(ValidationError):
        ServiceSettings(log_level="loud")
    with pytest.raises(ValidationError):
        LoggingSettings(log_format="xml")


def test_an_invalid_environment_stops_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.cli import main

    monkeypatch.setenv("CMAMBA_LOG_FORMAT", "yaml")
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "no-such-benchmark"])
    assert stopped.value.code == 2


def test_commands_log_warnings_unless_the_environment_asks_for_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        monkeypatch.delenv("CMAMBA_LOG_LEVEL", raising=False)
        assert configure_logging(default_level="warning").log_level == "warning"
        assert root.level == logging.WARNING
        monkeypatch.setenv("CMAMBA_LOG_LEVEL", "DEBUG")
        assert configure_logging(default_level="warning").log_level == "debug"
        assert root.level == logging.DEBUG
        assert configure_logging("json", "error").log_level == "error"
        handlers = [h for h in root.handlers if h not in before[0]]
        assert len(handlers) == 1  # each call replaces its handler
    finally:
        for handler in root.handlers[:]:
            if handler not in before[0]:
                root.removeHandler(handler)
        root.setLevel(before[1])


def test_redactor_masks_secrets_and_bearer_credentials() -> None:
    redact = Redactor([KEY])
    assert KEY not in redact(f"path /v1/x?token={KEY}")
    assert redact("Authorization: Bearer abc.def") == f"Authorization: Bearer {REDACTED}"
    assert redact("headers=[(b'authorization', b'Basic dXNlcjpwYXNz')]").count(REDACTED) == 1
    assert "dXNlcjpwYXNz" not in redact("headers=[(b'authorization', b'Basic dXNlcjpwYXNz')]")
    assert redact("'authorization': 'tok3n'") == f"'authorization': '{REDACTED}'"
    assert redact("no secret here") == "no secret here"


def test_json_lines_carry_time_level_logger_and_request_id(
    log_stream: Callable[[str], io.StringIO],
) -> None:
    buffer = log_stream("json")
    log = logging.getLogger("cmamba.test")
    log.info("outside %d", 1)
    token = request_id_var.set("req-42")
    try:
        log.warning("inside, key %s", KEY)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
        log.info("traced", extra={"trace_id": "ab" * 16, "span_id": "cd" * 8})
    finally:
        request_id_var.reset(token)
    outside, inside, failed, traced = (json.loads(line) for line in buffer.getvalue().splitlines())
    assert TIMESTAMP.match(outside["ts"]) and outside["level"] == "INFO"
    assert outside["logger"] == "cmamba.test" and outside["message"] == "outside 1"
    assert "request_id" not in outside
    assert inside["request_id"] == "req-42" and inside["message"] == f"inside, key {REDACTED}"
    assert failed["request_id"] == "req-42" and "RuntimeError: boom" in failed["exception"]
    assert traced["trace_id"] == "ab" * 16 and traced["span_id"] == "cd" * 8


def test_text_lines_start_with_a_timestamp(log_stream: Callable[[str], io.StringIO]) -> None:
    buffer = log_stream("text")
    token = request_id_var.set("req-7")
    try:
        logging.getLogger("cmamba.test").info("hello")
    finally:
        request_id_var.reset(token)
    (line,) = buffer.getvalue().splitlines()
    stamp, level, rest = line.split(" ", 2)
    assert TIMESTAMP.match(stamp) and level == "INFO"
    assert rest == "cmamba.test request_id=req-7: hello"


def test_an_unhandled_error_is_logged_with_its_request_id(
    log_stream: Callable[[str], io.StringIO], make_settings: Callable[..., ServiceSettings]
) -> None:
    app = create_app(make_settings())

    async def broken() -> None:
        raise RuntimeError("the handler broke")

    app.add_api_route("/broken", broken)
    buffer = log_stream("json")
    client = TestClient(app)  # no lifespan: the route needs no model
    response = client.get("/broken", headers={"x-request-id": "broken-1"})
    assert response.status_code == 500
    entries = [json.loads(line) for line in buffer.getvalue().splitlines()]
    errors = [e for e in entries if "the handler broke" in e.get("exception", "")]
    assert len(errors) == 1 and errors[0]["request_id"] == "broken-1"
    assert errors[0]["level"] == "ERROR"


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_real_server_logs_json_with_request_ids_and_never_the_key(
    checkpoint: Path, spawn_server: Callable[..., ServerProcess]
) -> None:
    server = spawn_server(
        {
            "CMAMBA_MODEL_PATH": str(checkpoint),
            "CMAMBA_ENABLE_MEDIA": "false",
            "CMAMBA_API_KEY": KEY,
            "CMAMBA_LOG_FORMAT": "json",
        },
        ["--log-level", "trace"],
    )
    server.wait_ready()
    auth = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        ok = client.post(
            "/v1/predict/features",
            json=features_payload(5, 0),
            headers={**auth, "x-request-id": "good-1"},
        )
        assert ok.status_code == 200, ok.text
        assert client.get("/v2/models", headers={"authorization": "Bearer nope"}).status_code
        # Clients that put the key where it does not belong: a URL, the request id.
        client.get(f"/v1/{KEY}?api_key={KEY}", headers=auth)
        client.get("/v2/health/live", headers={"x-request-id": KEY})
        client.get("/v2/health/live", headers={"x-request-id": "live-1"})
    stop_process(server.proc)  # the server flushes its last lines on the way out
    output = server.output()
    assert KEY not in output
    lines = [line for line in output.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is a JSON object
    assert all(TIMESTAMP.match(entry["ts"]) for entry in entries)
    access = [
        e for e in entries if e["logger"] == "uvicorn.access" and e["path"] != "/v2/health/ready"
    ]
    assert len(access) == 5 and all(e.get("request_id") for e in access)
    by_id = {e["request_id"]: e for e in access}
    assert by_id["good-1"]["status"] == 200 and by_id["good-1"]["method"] == "POST"
    assert by_id["live-1"]["path"] == "/v2/health/live"
    assert by_id[REDACTED]["path"] == "/v2/health/live"
    assert any(e["path"] == f"/v1/{REDACTED}?api_key={REDACTED}" for e in access)
    # The ASGI messages of every answer name their request.
    serving: list[dict[str, Any]] = [
        e for e in entries if e["logger"] == "uvicorn.asgi" and "http.response" in e["message"]
    ]
    assert serving and all(e.get("request_id") for e in serving)
