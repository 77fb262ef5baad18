"""Fixtures of the service tests: tiny real checkpoints, apps, real servers, shared media."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers import ServerProcess, features_payload, profile_dims, tiny_checkpoint

from service.main import create_app
from service.settings import ServiceSettings

DIMS: dict[str, int] = profile_dims()


@pytest.fixture(scope="session")
def make_checkpoint() -> Callable[..., Path]:
    """``make_checkpoint(folder, modalities, emotion_classes)``: a small real model with random
    weights."""
    return tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint (text, audio, visual; default-v1) most tests serve."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def real_extractor() -> Any:
    """One warmed real extractor for the whole session (it is thread-safe and shareable)."""
    from preprocessing import Extractor

    extractor = Extractor(modalities=("text", "audio", "visual"))
    extractor.warmup()
    return extractor


@pytest.fixture(scope="session")
def payload() -> Callable[..., dict[str, Any]]:
    """``payload(length, seed, modalities=...)``: a random /v1/predict/features body."""
    return features_payload


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
