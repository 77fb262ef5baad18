"""The service on Ray Serve: two CPU replicas, spread, same answers, a replica killed mid-load.

Every request goes through HAProxy in front of Ray's proxy, as deployed (conftest.py).
"""

from __future__ import annotations

import json
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
from prometheus_client.parser import text_string_to_metric_families

from service.main import create_app
from service.ray_serve import REPLICA_HEADER
from service.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[2]

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CLIENT_TIMEOUT_S = 20.0


def _post(client: httpx.Client, base: str, body: dict[str, Any]) -> httpx.Response:
    return client.post(f"{base}/v1/predict/features", json=body, timeout=CLIENT_TIMEOUT_S)


def _concurrent(base: str, bodies: list[dict[str, Any]], workers: int = 8) -> list[httpx.Response]:
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client, ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda body: _post(client, base, body), bodies))


def test_requests_spread_over_both_replicas(
    ray_service: Any, features_payload: Callable[..., dict[str, Any]]
) -> None:
    answers = _concurrent(ray_service.url, [features_payload(16, seed) for seed in range(40)])
    assert [r.status_code for r in answers] == [200] * 40
    replicas = Counter(r.headers[REPLICA_HEADER] for r in answers)
    assert len(replicas) == 2, replicas
    assert min(replicas.values()) >= 2, replicas


def test_answers_equal_the_single_process_service(
    ray_service: Any,
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
    # Concurrent, so both replicas answer: Ray routes sequential requests by its cached
    # queue lengths, and a stale entry can send a whole sequence to one replica.
    answers = _concurrent(ray_service.url, bodies * 6)
    for answer, want in zip(answers, expected * 6, strict=True):
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["sentiment"]["score"] == pytest.approx(want["sentiment"]["score"], abs=1e-5)
        assert got["sentiment"]["label"] == want["sentiment"]["label"]
        assert got["model"] == want["model"]
    assert len({answer.headers[REPLICA_HEADER] for answer in answers}) == 2


def test_metrics_carry_the_replica_label(ray_service: Any) -> None:
    replicas: set[str] = set()
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client, ThreadPoolExecutor(8) as pool:
        for _ in range(5):  # concurrent scrapes through the proxy reach both replicas
            pages = list(pool.map(lambda _: client.get(f"{ray_service.url}/metrics"), range(16)))
            for page in pages:
                assert page.status_code == 200
                replica = page.headers[REPLICA_HEADER]
                replicas.add(replica)
                label = _label_of(replica)
                samples = [
                    line
                    for line in page.text.splitlines()
                    if line.startswith("cmamba_") and not line.startswith("#")
                ]
                assert samples
                assert all(f'replica="{label}"' in line for line in samples)
                assert re.search(r"^cmamba_ready\{replica=\"[^\"]+\"\} 1\.0$", page.text, re.M)
            if len(replicas) == 2:
                break
    assert len(replicas) == 2


def test_every_replica_lists_its_own_metrics_endpoint(ray_service: Any) -> None:
    """Each replica serves its own registry on its own port, listed for Prometheus."""
    replicas = _listed_replicas(ray_service)
    assert len(replicas) == 2 and len(set(replicas)) == 2, replicas
    answered = {r.headers[REPLICA_HEADER] for r in _concurrent(ray_service.url, [{}] * 16)}
    assert {_label_of(replica) for replica in answered} <= set(replicas)


def _label_of(replica: str) -> str:
    """The ``replica`` label value of a replica: its short Ray id, as Ray's own metrics use."""
    return replica.rsplit("#", 1)[-1]


def _haproxy_sample(stack: Any, name: str, proxy: str = "ray_serve") -> float:
    """A counter of HAProxy's Prometheus exporter, summed over the samples of ``proxy``."""
    page = httpx.get(stack.haproxy_metrics_url, timeout=CLIENT_TIMEOUT_S)
    assert page.status_code == 200
    return sum(
        sample.value
        for family in text_string_to_metric_families(page.text)
        for sample in family.samples
        if sample.name == name and sample.labels.get("proxy") == proxy
    )


def test_a_replica_killed_mid_load_leaves_no_request_unanswered(
    ray_service: Any, features_payload: Callable[..., dict[str, Any]]
) -> None:
    """Every request gets an answer in time; none is a 500; Serve replaces the dead replica.

    Ray's proxy answers 500 for the requests that were inside the killed replica; HAProxy
    replays them (Ray routes the replay to the survivor) or, failing that, answers 503 with
    Retry-After. Every request sent after the kill is answered by the survivor.

    A kill does not always catch a request at the HTTP level (the victim may finish what it
    holds before it dies, and Ray re-routes what it had not yet sent): the round is repeated,
    up to three times, until one does, so that the replay path is known to have run.
    """
    caught = 0
    for round_number in range(3):
        caught += _kill_round(ray_service, features_payload, seed_base=1000 * round_number)
        if caught:
            break
    assert caught >= 1, "no kill caught a request in flight in three rounds"


def _kill_round(
    ray_service: Any, features_payload: Callable[..., dict[str, Any]], seed_base: int
) -> int:
    """Kill one replica under load; check every answer; wait for the replacement.

    Returns how many requests the kill caught (replayed by HAProxy or refused with 503).
    """
    workers = 8
    bodies = [features_payload(64, seed_base + seed) for seed in range(120)]
    replays_before = _haproxy_sample(ray_service, "haproxy_backend_retry_warnings_total")
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client, ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_post, client, ray_service.url, body) for body in bodies]
        victim = futures[0].result(timeout=CLIENT_TIMEOUT_S).headers[REPLICA_HEADER]
        # Kill it while it holds requests (its own metrics endpoint says how many).
        _wait_for_inflight(_metrics_endpoints(ray_service)[_label_of(victim)], at_least=2)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        answers = [f.result(timeout=2 * CLIENT_TIMEOUT_S) for f in futures]
        after = [_post(client, ray_service.url, body) for body in bodies[:20]]
    replays = _haproxy_sample(ray_service, "haproxy_backend_retry_warnings_total") - replays_before
    statuses = Counter(r.status_code for r in answers)
    log = ray_service.haproxy_log.read_text(errors="replace")[-3000:]
    assert set(statuses) <= {200, 503}, f"{statuses}\n{log}"
    for refused in (r for r in answers if r.status_code == 503):
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"]
    assert statuses[200] >= len(bodies) - workers, statuses
    assert [r.status_code for r in after] == [200] * len(after)
    assert victim not in {r.headers[REPLICA_HEADER] for r in after}

    # The controller starts a replacement: two replicas answer again.
    replicas: set[str] = set()
    deadline = time.monotonic() + 60.0
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        while len(replicas) < 2 and time.monotonic() < deadline:
            batch = _concurrent(ray_service.url, [features_payload(16, s) for s in range(8)])
            replicas |= {r.headers[REPLICA_HEADER] for r in batch if r.status_code == 200}
            client.get(f"{ray_service.url}/v2/health/live")
    assert len(replicas) == 2 and victim not in replicas, replicas

    # Prometheus discovery lists the two live replicas only: the replacement removed the
    # entry the killed replica could not remove itself.
    assert sorted(_listed_replicas(ray_service)) == sorted(map(_label_of, replicas))
    return int(replays) + statuses[503]


def _metrics_endpoints(stack: Any) -> dict[str, str]:
    """Replica id -> its own metrics URL, from the discovery folder (each one checked)."""
    found: dict[str, str] = {}
    for path in sorted(stack.metrics_sd_dir.glob("*.json")):
        for group in json.loads(path.read_text()):
            for target in group["targets"]:
                url = f"http://{target}/metrics"
                page = httpx.get(url, timeout=CLIENT_TIMEOUT_S)
                assert page.status_code == 200, target
                labels = {
                    sample.labels.get("replica")
                    for family in text_string_to_metric_families(page.text)
                    for sample in family.samples
                    if sample.name.startswith("cmamba_")
                }
                assert len(labels) == 1, labels
                found[labels.pop()] = url
    return found


def _listed_replicas(stack: Any) -> list[str]:
    return list(_metrics_endpoints(stack))


def _wait_for_inflight(url: str, at_least: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        page = httpx.get(url, timeout=CLIENT_TIMEOUT_S)
        for family in text_string_to_metric_families(page.text):
            for sample in family.samples:
                if sample.name == "cmamba_inflight_requests" and sample.value >= at_least:
                    return
    raise AssertionError(f"fewer than {at_least} requests in flight at {url}")


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
    _, metrics = bound.init_args
    assert metrics == {"metrics_port": 0, "metrics_sd_dir": "/tmp/ray/cmamba_metrics"}
    # The file's proxy port is the one haproxy.cfg sends to by default.
    front = (REPO / "deploy" / "ray" / "haproxy.cfg").read_text()
    assert f'"${{CMAMBA_RAY_PROXY-127.0.0.1:{config["http_options"]["port"]}}}"' in front

    scaled = app_builder({**args, "num_gpus": 0.5, "min_replicas": 1, "max_replicas": 4})
    deployment = scaled._bound_deployment
    assert deployment.ray_actor_options["num_gpus"] == 0.5
    autoscaling = deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)
