"""``cmamba serve`` as a real process: graceful drain on SIGTERM, clear startup errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import wait_until

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_sigterm_drains_in_flight_requests_then_exits(
    checkpoint: Path,
    spawn_server: Callable[..., Any],
    payload: Callable[..., dict],
    metric: Callable,
) -> None:
    # A clip waits up to 3 s for batch company, so it is still in flight when SIGTERM comes.
    server = spawn_server(
        {
            "CMAMBA_MODEL_PATH": str(checkpoint),
            "CMAMBA_MAX_BATCH_SIZE": "8",
            "CMAMBA_MAX_BATCH_DELAY_MS": "3000",
            "CMAMBA_ADAPTIVE_BATCH_DELAY": "false",
        },
        ["--features-only"],
    )
    server.wait_ready()
    answers: list[httpx.Response] = []
    in_flight = threading.Thread(
        target=lambda: answers.append(
            httpx.post(f"{server.url}/v1/predict/features", json=payload(8, 0), timeout=30)
        )
    )
    in_flight.start()
    wait_until(
        lambda: metric(httpx.get(f"{server.url}/metrics").text, "cmamba_inflight_requests") == 1,
        "the request to get in flight",
        10,
        interval=0.02,
    )

    def not_ready() -> httpx.Response | None:
        answer = httpx.get(f"{server.url}/v2/health/ready")
        return answer if answer.status_code != 200 else None

    server.proc.send_signal(signal.SIGTERM)
    ready = wait_until(not_ready, "readiness to go 503", 5, interval=0.02)
    assert ready.status_code == 503
    assert ready.json()["error"]["type"] == "draining"
    refused = httpx.post(f"{server.url}/v1/predict/features", json=payload(8, 1))
    assert refused.status_code == 503 and "retry-after" in refused.headers

    in_flight.join(30)
    assert len(answers) == 1 and answers[0].status_code == 200, answers
    assert server.proc.wait(30) == 0


def test_serve_refuses_a_missing_checkpoint_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--model-path", str(missing)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"no checkpoint at {missing}" in result.stderr
    assert "CMAMBA_MODEL_PATH" in result.stderr


def test_serve_exits_when_the_checkpoint_cannot_load(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"config_version": 1, "d_model": "wide"}')
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", "0", "--model-path", str(broken)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "startup failed" in result.stderr


def test_serve_help_lists_settings_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    for option in ("--host", "--port", "--max-batch-size", "--max-batch-delay-ms", "--model-path"):
        assert option in result.stdout
