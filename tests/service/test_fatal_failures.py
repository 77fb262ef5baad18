"""Failures that heal: a CUDA error other than out of memory, a dead model worker thread and a
dead extraction thread each turn a real ``cmamba serve`` process not ready and not live, fail
what it holds with a 503 ``unavailable``, count ``cmamba_fatal_errors_total{kind}`` and exit
non-zero after the grace (``CMAMBA_FATAL_EXIT_GRACE_S``), so that a supervisor restarts it.

The faults are injected by ``CMAMBA_FAULT_INJECTION`` (``service.core.faults``): the CUDA error
is the RuntimeError torch raises for an illegal memory access, raised in the model runner.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ServerProcess, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

GRACE_S = 8.0
FATAL_EXIT_CODE = 3


def _post_form(url: str, fields: dict[str, str]) -> httpx.Response:
    boundary = "cmamba-fatal-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    ]
    return httpx.post(
        url + "/v1/predict",
        content=("".join(parts) + f"--{boundary}--\r\n").encode(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=60,
    )


def _assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["type"] == "unavailable", error
    assert "restart" in error["message"], error
    assert response.headers.get("retry-after") is not None


@pytest.mark.parametrize(
    ("fault", "kind"),
    [("cuda_error:2", "cuda"), ("model_worker_exit:2", "model_worker")],
)
def test_a_fatal_model_failure_fails_work_with_503_and_exits(
    fault: str,
    kind: str,
    checkpoint: Path,
    spawn_server: Callable[..., ServerProcess],
    payload: Callable[..., dict[str, Any]],
    metric: Callable[..., float],
) -> None:
    server = spawn_server(
        {
            "CMAMBA_MODEL_PATH": str(checkpoint),
            "CMAMBA_ENABLE_MEDIA": "false",
            "CMAMBA_MAX_BATCH_SIZE": "1",
            "CMAMBA_FAULT_INJECTION": fault,
            "CMAMBA_FATAL_EXIT_GRACE_S": str(GRACE_S),
        }
    )
    server.wait_ready()
    url = server.url
    first = httpx.post(f"{url}/v1/predict/features", json=payload(20, seed=0), timeout=30)
    assert first.status_code == 200, first.text
    assert httpx.get(f"{url}/v2/health/live").status_code == 200

    # The second model call fails; requests sent with it are queued behind it, held, or come
    # after: every one is answered 503 unavailable, none 500, none left waiting.
    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(
                lambda seed: httpx.post(
                    f"{url}/v1/predict/features", json=payload(20, seed=seed), timeout=30
                ),
                range(1, 7),
            )
        )
    for response in answers:
        _assert_unavailable(response)
    failed_at = time.monotonic()

    for probe in ("/v2/health/live", "/v2/health/ready"):
        _assert_unavailable(httpx.get(url + probe, timeout=5))
    assert httpx.get(f"{url}/v2/models/tiny/ready", timeout=5).status_code == 503
    scraped = httpx.get(f"{url}/metrics", timeout=5).text
    assert metric(scraped, "cmamba_fatal_errors_total", kind=kind) == 1.0
    others = [k for k in ("cuda", "model_worker", "extraction_worker") if k != kind]
    assert all(metric(scraped, "cmamba_fatal_errors_total", kind=k) == 0.0 for k in others)
    assert metric(scraped, "cmamba_ready") == 0.0
    assert f"fatal {kind} failure" in server.output()

    code = server.proc.wait(timeout=GRACE_S + 40)
    assert code == FATAL_EXIT_CODE, server.log_tail()
    assert time.monotonic() - failed_at < GRACE_S + 40


def test_a_dead_extraction_thread_fails_its_job_with_503_and_exits(
    make_checkpoint: Callable[..., Path],
    tmp_path: Path,
    spawn_server: Callable[..., ServerProcess],
    metric: Callable[..., float],
) -> None:
    text_only = make_checkpoint(tmp_path / "text", ("text",))
    server = spawn_server(
        {
            "CMAMBA_MODEL_PATH": str(text_only),
            "CMAMBA_FAULT_INJECTION": "extraction_worker_exit:2",
            "CMAMBA_FATAL_EXIT_GRACE_S": str(GRACE_S),
        }
    )
    server.wait_ready()
    url = server.url
    first = _post_form(url, {"transcript": "what a lovely day it was"})
    assert first.status_code == 200, first.text

    _assert_unavailable(_post_form(url, {"transcript": "the thread that runs this dies"}))
    _assert_unavailable(_post_form(url, {"transcript": "and nothing runs after it"}))
    for probe in ("/v2/health/live", "/v2/health/ready"):
        _assert_unavailable(httpx.get(url + probe, timeout=5))
    scraped = httpx.get(f"{url}/metrics", timeout=5).text
    assert metric(scraped, "cmamba_fatal_errors_total", kind="extraction_worker") == 1.0
    assert metric(scraped, "cmamba_extraction_busy_workers") == 0.0

    code = server.proc.wait(timeout=GRACE_S + 40)
    assert code == FATAL_EXIT_CODE, server.log_tail()


def test_health_stays_200_without_a_fault(
    checkpoint: Path,
    spawn_server: Callable[..., ServerProcess],
    payload: Callable[..., dict[str, Any]],
    metric: Callable[..., float],
) -> None:
    # The same server without the injection: many model calls, still live and ready.
    server = spawn_server(
        {
            "CMAMBA_MODEL_PATH": str(checkpoint),
            "CMAMBA_ENABLE_MEDIA": "false",
            "CMAMBA_MAX_BATCH_SIZE": "1",
        }
    )
    server.wait_ready()
    for seed in range(4):
        response = httpx.post(f"{server.url}/v1/predict/features", json=payload(20, seed=seed))
        assert response.status_code == 200, response.text
    wait_until(lambda: httpx.get(f"{server.url}/v2/health/live").status_code == 200)
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    scraped = httpx.get(f"{server.url}/metrics").text
    assert metric(scraped, "cmamba_fatal_errors_total") == 0.0
    assert server.proc.poll() is None
