"""The health state (fatal failures, queue saturation) and the worker threads that report
their own death: the real ``MicroBatcher`` and ``WatchedThreads`` with small stand-in jobs."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter

from service.core.batcher import MicroBatcher
from service.core.extraction import WatchedThreads
from service.core.faults import InjectedWorkerExit, parse_fault
from service.core.health_state import FatalFailure, HealthState
from service.core.types import ClipFeatures, ClipOutcome
from service.errors import FatalServiceError

WAIT_S = 10.0


def _health(limit_s: float = 0.0) -> tuple[HealthState, CollectorRegistry]:
    registry = CollectorRegistry()
    counter = Counter("cmamba_fatal_errors_total", "fatal", ["kind"], registry=registry)
    return HealthState(counter, limit_s), registry


def test_only_the_first_fatal_failure_counts_and_listeners_hear_it() -> None:
    health, registry = _health()
    heard: list[FatalFailure] = []
    health.on_fatal(heard.append)

    assert health.trip("cuda", "RuntimeError: CUDA error") is True
    assert health.trip("model_worker", "later") is False

    assert health.fatal is not None and health.fatal.kind == "cuda"
    assert [f.kind for f in heard] == ["cuda"]
    value = registry.get_sample_value("cmamba_fatal_errors_total", {"kind": "cuda"})
    assert value == 1.0
    # Every kind is exported from the start (at 0), so an alert on increase() sees the first one.
    assert registry.get_sample_value("cmamba_fatal_errors_total", {"kind": "model_worker"}) == 0.0


def test_saturation_lasts_until_the_queue_drains_below_half() -> None:
    health, _ = _health(limit_s=0.05)
    health.observe_queue(3, 4)
    assert health.saturated_for() == 0.0
    health.observe_queue(4, 4)  # full: saturated from now
    health.observe_queue(3, 4)  # a batch taken, refilling: still saturated
    deadline = time.monotonic() + WAIT_S
    while not health.overloaded and time.monotonic() < deadline:
        time.sleep(0.01)
    assert health.overloaded and health.saturated_for() >= 0.05
    health.observe_queue(1, 4)  # drained below half
    assert not health.overloaded and health.saturated_for() == 0.0


def test_a_zero_limit_never_reports_overload() -> None:
    health, _ = _health(limit_s=0.0)
    health.observe_queue(4, 4)
    assert health.saturated_for() >= 0.0 and not health.overloaded


def _clip() -> ClipFeatures:
    return ClipFeatures(
        features={"text": np.zeros((2, 1), np.float32)}, masks={"text": np.ones(2, bool)}, length=2
    )


def test_a_dying_model_worker_fails_what_it_held_and_queued_and_reports() -> None:
    release = threading.Event()
    entered = threading.Event()

    def run_batch(clips: Sequence[ClipFeatures], padded_length: int) -> list[ClipOutcome]:
        entered.set()
        release.wait(WAIT_S)
        raise InjectedWorkerExit("the worker ends")

    deaths: list[BaseException] = []
    batcher = MicroBatcher(
        run_batch, max_batch_size=1, max_batch_delay_s=0.0, max_queue_size=8,
        on_death=deaths.append,
    )  # fmt: skip
    batcher.start()
    held = batcher.submit(_clip(), deadline=time.monotonic() + 60)
    assert entered.wait(WAIT_S)
    queued = [batcher.submit(_clip(), deadline=time.monotonic() + 60) for _ in range(3)]
    release.set()

    for future in [held, *queued]:
        with pytest.raises(FatalServiceError):
            future.result(WAIT_S)
    assert len(deaths) == 1 and isinstance(deaths[0], InjectedWorkerExit)
    assert not batcher.alive
    with pytest.raises(FatalServiceError):
        batcher.submit(_clip(), deadline=time.monotonic() + 60)


def test_a_dying_extraction_thread_fails_its_job_and_the_queue_is_failed_on_demand() -> None:
    deaths: list[BaseException] = []
    threads = WatchedThreads(1, "test-extract", deaths.append)
    ok: Future[int] = threads.submit(lambda: 1)
    assert ok.result(WAIT_S) == 1
    ordinary: Future[int] = threads.submit(lambda: 1 // 0)
    with pytest.raises(ZeroDivisionError):
        ordinary.result(WAIT_S)
    assert threads.alive  # an ordinary error is the job's, not the thread's

    def die() -> int:
        raise InjectedWorkerExit("the thread ends")

    dying = threads.submit(die)
    with pytest.raises(FatalServiceError):
        dying.result(WAIT_S)
    assert len(deaths) == 1
    deadline = time.monotonic() + WAIT_S
    while threads.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not threads.alive

    discarded: list[int] = []
    stranded: Future[int] = threads.submit(lambda: 2, discard=lambda: discarded.append(1))
    threads.fail(FatalServiceError("broken"))
    with pytest.raises(FatalServiceError):
        stranded.result(WAIT_S)
    assert discarded == [1]
    with pytest.raises(FatalServiceError):
        threads.submit(lambda: 3)


def test_fault_plans_are_inert_until_armed_and_fire_on_their_call() -> None:
    assert parse_fault(None) is None
    plan = parse_fault("model_worker_exit:2")
    assert plan is not None
    plan.before_forward({}, {})  # not armed: warm-up calls are not counted
    plan.arm()
    plan.before_forward({}, {})
    with pytest.raises(InjectedWorkerExit):
        plan.before_forward({}, {})
    plan.before_forward({}, {})  # once only
    cuda = parse_fault("cuda_error:1")
    assert cuda is not None
    cuda.arm()
    for _ in range(2):  # sticky
        with pytest.raises(RuntimeError, match="illegal memory access"):
            cuda.before_forward({}, {})
