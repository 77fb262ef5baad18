"""``cmamba serve --engine ray``: the one command starts Ray Serve behind HAProxy and stops both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import LoggedProcess, free_port, http_ready, listening, wait_until

from service.ray_serve import REPLICA_HEADER

pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


def test_serve_engine_ray_answers_and_stops_on_sigterm(
    checkpoint: Path, features_payload: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    port, haproxy_metrics = free_port(), free_port()
    command = [
        *(sys.executable, "-m", "service.cli", "serve", "--engine", "ray"),
        *("--replicas", "1", "--num-cpus", "0.5", "--features-only"),
        *("--model-path", str(checkpoint), "--port", str(port), "--torch-threads", "1"),
        *("--haproxy-metrics-port", str(haproxy_metrics), "--metrics-sd-dir", str(tmp_path)),
    ]
    log = (tmp_path / "serve.log").open("wb")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        watched = LoggedProcess("cmamba serve --engine ray", process, tmp_path / "serve.log")
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ready(url, timeout=5.0), "the replicas", 90.0, process=watched)
        answer = httpx.post(
            f"{url}/v1/predict/features", json=features_payload(16, 3), timeout=20.0
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers[REPLICA_HEADER].startswith("SERVE_REPLICA::")
        assert answer.json()["model"]["name"] == "tiny"
        # HAProxy is the front: its exporter counts the answer it passed on.
        front = httpx.get(f"http://127.0.0.1:{haproxy_metrics}/metrics", timeout=5.0).text
        assert 'haproxy_backend_http_responses_total{proxy="ray_serve",code="2xx"}' in front
        assert len(list(tmp_path.glob("*.json"))) == 1  # the replica's metrics endpoint
        process.send_signal(signal.SIGTERM)  # docker stop, systemd
        assert process.wait(timeout=45) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert not listening(port) and not listening(haproxy_metrics)
        assert list(tmp_path.glob("*.json")) == []
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()
