"""Readiness under saturation: ``/v2/health/ready`` turns 503 once the model queue has been
full for ``CMAMBA_READY_SATURATION_S``, and 200 again once it drains; requests are still served.

A real app on the tiny checkpoint whose model worker is held by a gate (a model slowed to a
stop), so the queue fills and stays full until the gate opens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from helpers import wait_until

QUEUE = 3
LIMIT_S = 0.6


class Gate:
    """A ``before_forward`` hook that holds the model worker until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, features: Any, masks: Any) -> None:
        self.entered.set()
        assert self.release.wait(60)


def _fill(
    client: TestClient, gate: Gate, payload: Callable[..., dict[str, Any]]
) -> tuple[list[threading.Thread], list[int], float]:
    """One clip in the model and ``QUEUE`` waiting; returns the threads, their statuses and
    when the last clip was sent (the queue is full from after that moment)."""
    core = client.app.state.core  # type: ignore[attr-defined]
    statuses: list[int] = []

    def post(seed: int) -> None:
        response = client.post("/v1/predict/features", json=payload(8, seed))
        statuses.append(response.status_code)

    threads = [threading.Thread(target=post, args=(0,))]
    threads[0].start()
    assert gate.entered.wait(30)
    for seed in range(1, QUEUE):
        threads.append(threading.Thread(target=post, args=(seed,)))
        threads[-1].start()
    wait_until(lambda: core.queue_depth == QUEUE - 1, "the queue to fill but one")
    last_sent = time.monotonic()
    threads.append(threading.Thread(target=post, args=(QUEUE,)))
    threads[-1].start()
    wait_until(lambda: core.queue_depth == QUEUE, "the queue to fill")
    return threads, statuses, last_sent


def test_ready_turns_503_while_saturated_and_back_once_drained(
    features_app: Callable[..., TestClient], payload: Callable[..., dict[str, Any]]
) -> None:
    gate = Gate()
    client = features_app(
        max_batch_size=1, max_queue_size=QUEUE, ready_saturation_s=LIMIT_S, warmup=False,
        before_forward=gate,
    )  # fmt: skip
    assert client.get("/v2/health/ready").status_code == 200
    threads, statuses, last_sent = _fill(client, gate, payload)

    refused = wait_until(
        lambda: (r := client.get("/v2/health/ready")).status_code == 503 and r,
        "readiness to turn 503",
    )
    assert time.monotonic() - last_sent >= LIMIT_S
    error = refused.json()["error"]
    assert error["type"] == "over_capacity" and "model queue" in error["message"]
    assert refused.headers["retry-after"] is not None
    assert client.get("/v2/health/live").status_code == 200  # slow, not broken

    gate.release.set()
    wait_until(lambda: client.get("/v2/health/ready").status_code == 200, "readiness again")
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * (QUEUE + 1)  # saturation refuses no request itself


def test_saturation_never_turns_ready_503_when_off(
    features_app: Callable[..., TestClient], payload: Callable[..., dict[str, Any]]
) -> None:
    gate = Gate()
    client = features_app(
        max_batch_size=1, max_queue_size=QUEUE, warmup=False, before_forward=gate
    )  # default: ready_saturation_s = 0
    threads, statuses, last_sent = _fill(client, gate, payload)
    while time.monotonic() - last_sent < 2 * LIMIT_S:  # well past what turned it 503 above
        assert client.get("/v2/health/ready").status_code == 200
        time.sleep(0.05)
    gate.release.set()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * (QUEUE + 1)
