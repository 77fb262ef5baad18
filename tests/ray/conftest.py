"""A local Ray instance on CPU serving a tiny random checkpoint with two replicas.

Clients reach the replicas as in production: through HAProxy (deploy/ray/haproxy.cfg, the
real binary) in front of Ray Serve's proxy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import free_port, tiny_checkpoint, wait_until

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

REPO = Path(__file__).resolve().parents[2]
APP_NAME = "cmamba-test"
# HAProxy's wait for an answer before replaying: above the replicas' request_timeout_s.
FRONT_TIMEOUT_S = 8.0


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def service_settings(checkpoint: Path) -> dict[str, Any]:
    return {
        "model_path": str(checkpoint),
        "enable_media": False,
        "max_batch_delay_ms": 2.0,
        "torch_threads": 1,
        "drain_timeout_s": 2.0,
        "request_timeout_s": 5.0,  # HAProxy replays what Ray's proxy loses after FRONT_TIMEOUT_S
    }


@dataclass(frozen=True)
class RayStack:
    url: str  # HAProxy, where clients go
    ray_proxy_url: str  # Ray Serve's own proxy, behind HAProxy
    haproxy_metrics_url: str
    haproxy_log: Path
    metrics_sd_dir: Path  # where replicas list their own /metrics endpoints


@pytest.fixture(scope="module")
def ray_service(
    service_settings: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RayStack]:
    """Two replicas behind Ray's proxy behind HAProxy. Ray and HAProxy are stopped after."""
    from service.ray_front import HAProxyFront
    from service.ray_serve import build_deployment

    work = tmp_path_factory.mktemp("ray-stack")
    proxy_port, front_port, metrics_port = free_port(), free_port(), free_port()
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}},
    )
    log = (work / "haproxy.log").open("wb")
    front = HAProxyFront(
        bind=f"127.0.0.1:{front_port}",
        ray_proxy=f"127.0.0.1:{proxy_port}",
        metrics_bind=f"127.0.0.1:{metrics_port}",
        timeout_server_s=FRONT_TIMEOUT_S,
        output=log,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
        app = build_deployment(
            service_settings,
            num_replicas=2,
            num_cpus=0.5,
            health_check_period_s=1.0,
            metrics_sd_dir=str(work / "metrics-sd"),
        )
        front.start()
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        stack = RayStack(
            url=f"http://127.0.0.1:{front_port}",
            ray_proxy_url=f"http://127.0.0.1:{proxy_port}",
            haproxy_metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            haproxy_log=work / "haproxy.log",
            metrics_sd_dir=work / "metrics-sd",
        )
        _wait_ready(stack.url, timeout_s=90.0)
        yield stack
    finally:
        try:
            front.stop()
            serve.shutdown()
        finally:
            ray.shutdown()
            log.close()


def _wait_ready(base: str, timeout_s: float) -> None:
    def ready() -> bool:
        status = serve.status().applications.get(APP_NAME)
        if status is None or status.status != "RUNNING":
            return False
        return httpx.get(f"{base}/v2/health/ready", timeout=5.0).status_code == 200

    wait_until(ready, "the Ray Serve app to be ready", timeout_s, interval=0.2)
