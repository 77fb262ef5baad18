"""Fixtures of the service tests: tiny real checkpoints, apps, real servers, shared media."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from model import CoupledMambaConfig, CoupledMambaForSentiment, save_checkpoint
from preprocessing import PROFILES
from service.main import create_app
from service.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[2]
PROFILE = "default-v1"
DIMS: dict[str, int] = dict(PROFILES[PROFILE].dims)
MODEL_NAME = "tiny"


def _tiny_checkpoint(
    folder: Path,
    modalities: tuple[str, ...] = ("text", "audio", "visual"),
    emotion_classes: tuple[str, ...] = (),
) -> Path:
    torch.manual_seed(0)
    config = CoupledMambaConfig(
        modalities=modalities,
        feature_dims={m: DIMS[m] for m in modalities},
        feature_profile=PROFILE,
        d_model=16,
        d_state=8,
        n_layers=2,
        dropout=0.0,
        emotion_classes=emotion_classes,
    )
    return save_checkpoint(CoupledMambaForSentiment(config), folder, name=MODEL_NAME, version="7")


@pytest.fixture(scope="session")
def make_checkpoint() -> Callable[..., Path]:
    """``make_checkpoint(folder, modalities, emotion_classes)``: a small real model with random
    weights."""
    return _tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint (text, audio, visual; default-v1) most tests serve."""
    return _tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def real_extractor() -> Any:
    """One warmed real extractor for the whole session (it is thread-safe and shareable)."""
    from preprocessing import Extractor

    extractor = Extractor(modalities=("text", "audio", "visual"))
    extractor.warmup()
    return extractor


def _features_payload(
    length: int, seed: int, modalities: tuple[str, ...] = ("text", "audio", "visual")
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "profile": PROFILE,
        "features": {
            m: rng.standard_normal((length, DIMS[m])).round(4).tolist() for m in modalities
        },
    }


@pytest.fixture(scope="session")
def payload() -> Callable[..., dict[str, Any]]:
    """``payload(length, seed, modalities=...)``: a random /v1/predict/features body."""
    return _features_payload


@pytest.fixture(scope="session")
def dims() -> dict[str, int]:
    """The default-v1 feature sizes."""
    return dict(DIMS)


def _make_settings(checkpoint: Path, **overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = {
        "model_path": checkpoint,
        "enable_media": False,
        "max_batch_delay_ms": 2.0,
        "torch_threads": 1,
    }
    values.update(overrides)
    return ServiceSettings(**values)


@pytest.fixture(scope="session")
def make_settings(checkpoint: Path) -> Callable[..., ServiceSettings]:
    """``make_settings(**overrides)``: features-only settings on the tiny checkpoint."""
    return lambda **overrides: _make_settings(checkpoint, **overrides)


@pytest.fixture
def start_client() -> Iterator[Callable[..., TestClient]]:
    """Start an app in a test client and wait until its startup has finished."""
    clients: list[TestClient] = []

    def start(app: FastAPI, wait: bool = True, **kwargs: Any) -> TestClient:
        client = TestClient(app, **kwargs)
        client.__enter__()
        clients.append(client)
        if wait:
            assert app.state.core.wait_started(120), "startup did not finish"
        return client

    yield start
    for client in reversed(clients):
        client.__exit__(None, None, None)


@pytest.fixture
def features_app(
    checkpoint: Path, start_client: Callable[..., TestClient]
) -> Callable[..., TestClient]:
    """Build and start a features-only app on the tiny checkpoint with some settings."""

    def build(**overrides: Any) -> TestClient:
        hook = overrides.pop("before_forward", None)
        app = create_app(_make_settings(checkpoint, **overrides), before_forward=hook)
        return start_client(app)

    return build


# -- real servers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def unused_port() -> int:
    """A free loopback port."""
    return free_port()


class ServerProcess:
    """``cmamba serve`` in a subprocess on a free port."""

    def __init__(self, env: dict[str, str], args: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
        # A file, not a pipe: a pipe nobody reads would block a chatty server once full.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port),
             "--log-level", "warning", *(args or [])],
            cwd=REPO,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.output()
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{out[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture
def spawn_server() -> Iterator[Callable[..., ServerProcess]]:
    """``spawn_server(env, args)``: start ``cmamba serve`` processes, stopped at teardown."""
    servers: list[ServerProcess] = []

    def spawn(env: dict[str, str], args: list[str] | None = None) -> ServerProcess:
        server = ServerProcess(env, args)
        servers.append(server)
        return server

    yield spawn
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def media_server(checkpoint: Path, shared_media: Path) -> Iterator[ServerProcess]:
    """A real server with the real extractor and a small queue (shared by the HTTP tests)."""
    server = ServerProcess(
        {
            "CMAMBA_MODEL_PATH": str(checkpoint),
            "CMAMBA_MAX_QUEUE_SIZE": "8",
            "CMAMBA_MAX_INFLIGHT": "24",
            "CMAMBA_MAX_BATCH_SIZE": "4",
            "CMAMBA_MAX_BATCH_DELAY_MS": "5",
            "CMAMBA_MAX_UPLOAD_BYTES": str(4 * 2**20),
        }
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def features_server(checkpoint: Path) -> Iterator[ServerProcess]:
    """A real features-only server on the tiny checkpoint (shared by the hostile-input tests)."""
    server = ServerProcess(
        {
            "CMAMBA_MODEL_PATH": str(checkpoint),
            "CMAMBA_ENABLE_MEDIA": "false",
            "CMAMBA_MAX_BATCH_SIZE": "8",
            "CMAMBA_MAX_UPLOAD_BYTES": str(64 * 2**20),
        }
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _metric(text: str, sample_name: str, /, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


@pytest.fixture(scope="session")
def metric() -> Callable[..., float]:
    """``metric(exposition_text, sample_name, **labels)``: sum of the matching samples."""
    return _metric
