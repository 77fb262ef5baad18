"""A local Ray instance on CPU serving a tiny random checkpoint with two replicas.

Clients reach the replicas as in production: through HAProxy (deploy/ray/haproxy.cfg, the
real binary) in front of Ray Serve's proxy.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from model import CoupledMambaConfig, CoupledMambaForSentiment, save_checkpoint
from preprocessing import PROFILES

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

REPO = Path(__file__).resolve().parents[2]
PROFILE = "default-v1"
DIMS: dict[str, int] = dict(PROFILES[PROFILE].dims)
APP_NAME = "cmamba-test"
# HAProxy's wait for an answer before replaying: above the replicas' request_timeout_s.
FRONT_TIMEOUT_S = 8.0


def _features_payload(length: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "profile": PROFILE,
        "features": {
            m: rng.standard_normal((length, DIMS[m])).round(4).tolist()
            for m in ("text", "audio", "visual")
        },
    }


@pytest.fixture(scope="session")
def features_payload() -> Callable[..., dict[str, Any]]:
    """``features_payload(length, seed)``: a random /v1/predict/features body (default-v1)."""
    return _features_payload


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = CoupledMambaConfig(
        modalities=("text", "audio", "visual"),
        feature_dims=dict(DIMS),
        feature_profile=PROFILE,
        d_model=16,
        d_state=8,
        n_layers=2,
        dropout=0.0,
    )
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    return save_checkpoint(CoupledMambaForSentiment(config), folder, name="tiny", version="7")


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    proxy_port, front_port, metrics_port = _free_port(), _free_port(), _free_port()
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
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            status = serve.status().applications.get(APP_NAME)
            if status is not None and status.status == "RUNNING":
                try:
                    if client.get(f"{base}/v2/health/ready").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
    raise TimeoutError(f"the Ray Serve app did not become ready in {timeout_s} s")
