"""The service on Ray Serve: two CPU replicas, spread, same answers, a replica killed mid-load."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.ray_serve import REPLICA_HEADER
from service.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[2]

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.timeout(120)

CLIENT_TIMEOUT_S = 20.0


def _post(client: httpx.Client, base: str, body: dict[str, Any]) -> httpx.Response:
    return client.post(f"{base}/v1/predict/features", json=body, timeout=CLIENT_TIMEOUT_S)


def _concurrent(base: str, bodies: list[dict[str, Any]], workers: int = 8) -> list[httpx.Response]:
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client, ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda body: _post(client, base, body), bodies))


def test_requests_spread_over_both_replicas(
    ray_service: str, features_payload: Callable[..., dict[str, Any]]
) -> None:
    answers = _concurrent(ray_service, [features_payload(16, seed) for seed in range(40)])
    assert [r.status_code for r in answers] == [200] * 40
    replicas = Counter(r.headers[REPLICA_HEADER] for r in answers)
    assert len(replicas) == 2, replicas
    assert min(replicas.values()) >= 2, replicas


def test_answers_equal_the_single_process_service(
    ray_service: str,
    service_settings: dict[str, Any],
    features_payload: Callable[..., dict[str, Any]],
) -> None:
    bodies = [features_payload(length, seed) for seed, length in enumerate((8, 16, 40, 100))]
    app = create_app(ServiceSettings(**service_settings))
    with TestClient(app) as local:
        assert app.state.core.wait_started(timeout=CLIENT_TIMEOUT_S)
        replies = [local.post("/v1/predict/features", json=body) for body in bodies]
    assert [r.status_code for r in replies] == [200] * len(bodies)
    expected = [r.json() for r in replies]
    seen: set[str] = set()
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        for _ in range(5):  # the same inputs on both replicas
            for body, want in zip(bodies, expected, strict=True):
                answer = _post(client, ray_service, body)
                assert answer.status_code == 200, answer.text
                seen.add(answer.headers[REPLICA_HEADER])
                got = answer.json()
                assert got["sentiment"]["score"] == pytest.approx(
                    want["sentiment"]["score"], abs=1e-5
                )
                assert got["sentiment"]["label"] == want["sentiment"]["label"]
                assert got["model"] == want["model"]
    assert len(seen) == 2


def test_metrics_carry_the_replica_label(ray_service: str) -> None:
    replicas: set[str] = set()
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        for _ in range(20):
            page = client.get(f"{ray_service}/metrics")
            assert page.status_code == 200
            replica = page.headers[REPLICA_HEADER]
            replicas.add(replica)
            samples = [
                line
                for line in page.text.splitlines()
                if line.startswith("cmamba_") and not line.startswith("#")
            ]
            assert samples
            assert all(f'replica="{replica}"' in line for line in samples)
            assert re.search(r"^cmamba_ready\{replica=\"[^\"]+\"\} 1\.0$", page.text, re.M)
            if len(replicas) == 2:
                break
    assert len(replicas) == 2


def test_a_replica_killed_mid_load_leaves_no_request_unanswered(
    ray_service: str, features_payload: Callable[..., dict[str, Any]]
) -> None:
    """Every request gets an answer in time; the survivor serves; Serve replaces the dead one.

    Ray's proxy answers 500 for the requests that were inside the killed replica (it does not
    retry them, and maps a dead actor to 500); those are at most the client's concurrency.
    Every request sent after the kill is answered by the survivor.
    """
    workers = 8
    bodies = [features_payload(64, seed) for seed in range(120)]
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client, ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_post, client, ray_service, body) for body in bodies]
        victim = futures[0].result(timeout=CLIENT_TIMEOUT_S).headers[REPLICA_HEADER]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        answers = [f.result(timeout=2 * CLIENT_TIMEOUT_S) for f in futures]
        after = [_post(client, ray_service, body) for body in bodies[:20]]
    statuses = Counter(r.status_code for r in answers)
    assert set(statuses) <= {200, 500, 503}, statuses
    assert statuses[500] <= workers, statuses
    assert all("retry-after" in r.headers for r in answers if r.status_code == 503)
    assert statuses[200] >= len(bodies) - workers, statuses
    assert [r.status_code for r in after] == [200] * len(after)
    assert victim not in {r.headers[REPLICA_HEADER] for r in after}

    # The controller starts a replacement: two replicas answer again.
    replicas: set[str] = set()
    deadline = time.monotonic() + 60.0
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        while len(replicas) < 2 and time.monotonic() < deadline:
            batch = _concurrent(ray_service, [features_payload(16, s) for s in range(8)])
            replicas |= {r.headers[REPLICA_HEADER] for r in batch if r.status_code == 200}
            client.get(f"{ray_service}/v2/health/live")
    assert len(replicas) == 2 and victim not in replicas, replicas


def test_config_file_builds_the_documented_deployment() -> None:
    import yaml

    from service.ray_serve import app_builder

    config = yaml.safe_load((REPO / "deploy" / "ray" / "serve_config.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "service.ray_serve:app_builder"
    args = dict(application["args"])
    bound = app_builder(args)._bound_deployment
    assert bound.num_replicas == args["num_replicas"]
    assert bound.ray_actor_options["num_gpus"] == args["num_gpus"]
    assert bound.max_ongoing_requests == args["settings"]["max_inflight"]

    scaled = app_builder({**args, "num_gpus": 0.5, "min_replicas": 1, "max_replicas": 4})
    deployment = scaled._bound_deployment
    assert deployment.ray_actor_options["num_gpus"] == 0.5
    autoscaling = deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)
