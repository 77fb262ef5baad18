"""Admission on its own: the in-flight limit, refusals, idleness, and the rejection count."""

from __future__ import annotations

import asyncio

import pytest

from service.core.admission import Admission
from service.errors import (
    DeadlineExceededError,
    DrainingError,
    InvalidInputError,
    OverCapacityError,
    ServiceError,
)
from service.metrics import ServiceMetrics


def _rejected(metrics: ServiceMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("cmamba_rejected_requests_total", {"reason": reason})
    return value or 0.0


def test_the_limit_refuses_the_next_request_and_frees_on_exit() -> None:
    metrics = ServiceMetrics()
    admission = Admission(2, metrics, lambda: None)

    async def scenario() -> None:
        async with admission.admit(), admission.admit():
            assert admission.inflight == 2
            assert metrics.registry.get_sample_value("cmamba_inflight_requests") == 2
            with pytest.raises(OverCapacityError) as refused:
                async with admission.admit():
                    pass
            assert refused.value.reject_reason == "inflight_limit"
        assert admission.inflight == 0
        async with admission.admit():
            assert admission.inflight == 1

    asyncio.run(scenario())
    assert _rejected(metrics, "inflight_limit") == 1.0


def test_a_refusal_and_errors_on_a_limit_are_counted_others_are_not() -> None:
    metrics = ServiceMetrics()
    refusal: list[ServiceError | None] = [DrainingError("shutting down")]
    admission = Admission(4, metrics, lambda: refusal[0])

    async def run(error: ServiceError | None) -> None:
        async with admission.admit():
            if error is not None:
                raise error

    with pytest.raises(DrainingError):
        asyncio.run(run(None))
    refusal[0] = None
    with pytest.raises(DeadlineExceededError):
        asyncio.run(run(DeadlineExceededError("late")))
    with pytest.raises(InvalidInputError):
        asyncio.run(run(InvalidInputError("bad")))
    assert admission.inflight == 0
    assert _rejected(metrics, "draining") == 1.0
    assert _rejected(metrics, "deadline") == 1.0
    samples = [
        s
        for family in metrics.registry.collect()
        if family.name == "cmamba_rejected_requests"
        for s in family.samples
        if s.name.endswith("_total")
    ]
    assert {s.labels["reason"] for s in samples} == {"draining", "deadline"}


def test_wait_idle_returns_when_the_last_request_leaves() -> None:
    admission = Admission(4, ServiceMetrics(), lambda: None)

    async def scenario() -> tuple[bool, bool]:
        release = asyncio.Event()

        async def request() -> None:
            async with admission.admit():
                await release.wait()

        task = asyncio.create_task(request())
        await asyncio.sleep(0)
        timed_out = await admission.wait_idle(0.01)
        release.set()
        idle = await admission.wait_idle(5.0)
        await task
        return timed_out, idle

    assert asyncio.run(scenario()) == (False, True)
