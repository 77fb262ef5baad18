"""A replica's own metrics endpoint and its entry for Prometheus's file-based discovery.

No Ray here: the endpoint serves a real registry on a real port and writes real files; the
Ray tests (test_ray_serve.py, tests/deploy/test_ray_monitoring.py) check it inside replicas.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from service.ray_serve import ReplicaMetricsEndpoint, replica_labelled_registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("cmamba_requests", "requests", ["endpoint"], registry=registry).labels("/x").inc(3)
    return registry


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_endpoint_serves_the_labelled_registry_and_lists_itself(tmp_path: Path) -> None:
    hostname = socket.gethostname()
    stale = tmp_path / f"{hostname}_{_dead_pid()}_gone.json"  # a replica killed earlier
    stale.write_text("[]")
    live = tmp_path / f"{hostname}_1_init.json"  # pid 1 runs: not ours to remove
    live.write_text("[]")
    elsewhere = tmp_path / f"{hostname}-2_{_dead_pid()}_r.json"  # another node, similar name
    elsewhere.write_text("[]")

    endpoint = ReplicaMetricsEndpoint(
        replica_labelled_registry(_registry(), "abc123"),
        "SERVE_REPLICA::app#Dep#abc123",
        sd_dir=tmp_path,
        advertise="127.0.0.1",
    )
    endpoint.start()
    try:
        assert not stale.exists() and live.exists() and elsewhere.exists()
        assert endpoint.sd_file is not None and endpoint.sd_file.parent == tmp_path
        assert endpoint.sd_file.name.startswith(f"{hostname}_")
        (group,) = json.loads(endpoint.sd_file.read_text())
        assert group["targets"] == [f"127.0.0.1:{endpoint.port}"]
        assert not list(tmp_path.glob("*.tmp"))

        page = httpx.get(f"http://{group['targets'][0]}/metrics", timeout=10)
        samples = [
            sample
            for family in text_string_to_metric_families(page.text)
            for sample in family.samples
            if sample.name == "cmamba_requests_total"
        ]
        assert [(s.labels, s.value) for s in samples] == [
            ({"endpoint": "/x", "replica": "abc123"}, 3.0)
        ]
    finally:
        endpoint.stop()
    assert not endpoint.sd_file.exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=5)
    endpoint.stop()  # twice is fine (lifespan, then the deployment's __del__)


def test_endpoint_without_a_discovery_folder_only_serves(tmp_path: Path) -> None:
    endpoint = ReplicaMetricsEndpoint(_registry(), "r", sd_dir=None, advertise="127.0.0.1")
    endpoint.start()
    try:
        assert endpoint.sd_file is None
        page = httpx.get(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=10)
        assert "cmamba_requests_total" in page.text
    finally:
        endpoint.stop()
