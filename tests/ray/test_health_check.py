"""The Ray replica's ``check_health``: it passes on a sound replica (the device probe runs on
the model worker) and raises, so that Ray replaces the replica, once its core is in the fatal
state or its model worker is gone. The deployment's own class is used, on a real started app
(no Ray cluster is needed to call the method)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.ray_serve import build_deployment
from service.settings import ServiceSettings

pytest.importorskip("ray.serve")

# The deployment class is made without Ray's __init__; Ray's ingress wrapper then warns when
# the instance is collected.
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .*__del__' was never awaited")


@pytest.fixture
def replica(service_settings: dict[str, Any]) -> Iterator[Any]:
    """The deployment class, holding a started app as a replica does."""
    application = build_deployment(service_settings, metrics_port=None, metrics_sd_dir=None)
    cls = application._bound_deployment.func_or_class
    app = create_app(ServiceSettings(**service_settings))
    with TestClient(app):
        assert app.state.core.wait_started(120)
        instance = cls.__new__(cls)  # __init__ needs a replica context, set by Ray
        instance.service_app = app
        yield instance


def test_a_sound_replica_passes_its_health_check(replica: Any) -> None:
    asyncio.run(replica.check_health())
    asyncio.run(replica.check_health())  # again: the probe leaves the worker as it was


def test_a_replica_in_the_fatal_state_fails_its_health_check(replica: Any) -> None:
    core = replica.service_app.state.core
    core.health.trip("cuda", "RuntimeError: CUDA error: an illegal memory access")
    with pytest.raises(RuntimeError, match="replica unhealthy: fatal cuda failure"):
        asyncio.run(replica.check_health())


def test_a_replica_whose_model_worker_stopped_fails_its_health_check(replica: Any) -> None:
    core = replica.service_app.state.core
    core._serving.batcher.stop(timeout=10)  # the worker thread ends
    with pytest.raises(RuntimeError, match="replica unhealthy"):
        asyncio.run(replica.check_health())
    assert core.health.fatal is not None and core.health.fatal.kind == "model_worker"
