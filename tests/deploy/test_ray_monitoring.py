"""The monitoring stack on Ray Serve: ``cmamba serve --engine ray`` and a real Prometheus.

Two CPU replicas of a tiny checkpoint run behind HAProxy and Ray's proxy; Debian's Prometheus
runs deploy/ray/prometheus.yml (1 s intervals, this run's paths and ports). It finds every
replica's own registry through the files the replicas write for file-based discovery, Ray's
own metrics through the discovery file Ray's head writes, and HAProxy's exporter. The
dashboard's queries and the alert rules then run against it as they do on one host.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from helpers import features_payload

FEATURES = "/v1/predict/features"
# Series a replica exports only when its model runs on CUDA (these replicas run on the CPU).
GPU_ONLY_PREFIXES = ("cmamba_gpu_memory_", "cmamba_gpu_batch_")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def send_traffic(stack: Any, n_ok: int, seed: int = 0) -> None:
    """``n_ok`` valid feature requests, 8 at a time (so both replicas take some), one too
    large (413) and one in the wrong profile (422)."""
    bodies = [features_payload(3 + i % 5, 1000 * seed + i) for i in range(n_ok)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: stack.process.post_json(FEATURES, body), bodies))
    assert [status for status, _ in answers] == [200] * n_ok, answers
    status, _ = stack.process.post_json(
        FEATURES, {"profile": "x", "features": {"t": [[0.0] * 40000]}}
    )
    assert status == 413
    status, body = stack.process.post_json(FEATURES, {"profile": "mmsa-mosei", "features": {}})
    assert status == 422, body


def value(result: list[dict[str, Any]]) -> float:
    return sum(float(series["value"][1]) for series in result)


def test_prometheus_sees_every_replica_and_rays_own_metrics(
    ray_stack: Any, ray_prometheus: Any
) -> None:
    # Our metrics: both replicas, each through its own discovered target. Ray's router may
    # send a whole burst to one replica when its queue-length probes time out on a loaded
    # host (docs/SCALE.md), so bursts are sent until both replicas have counted some.
    requests = f'cmamba_requests_total{{job="cmamba", endpoint="{FEATURES}"}}'
    both = f"sum by (replica, instance) ({requests})"
    for burst in range(4):
        send_traffic(ray_stack, n_ok=32, seed=burst)
        sent = 32 * (burst + 1)
        counted = ray_prometheus.wait_for(both, lambda r, n=sent: value(r) >= n, "the requests")
        if len(counted) == 2:
            break
    ours = ray_prometheus.wait_for(
        both,
        lambda r: len(r) == 2 and value(r) >= 32,
        "the requests of both replicas to be scraped",
        timeout=60,
    )
    replicas = {series["metric"]["replica"] for series in ours}
    instances = {series["metric"]["instance"] for series in ours}
    assert len(replicas) == 2 and len(instances) == 2, ours
    up = ray_prometheus.query('up{job="cmamba"}')
    assert sorted(float(s["value"][1]) for s in up) == [1.0, 1.0], up

    # Ray's own metrics, from the nodes Ray's head lists.
    ray_counter = f'ray_serve_num_http_requests_total{{job="ray", route="{FEATURES}"}}'
    ray_requests = ray_prometheus.wait_for(
        f"sum by (application) ({ray_counter})",
        lambda r: value(r) >= 32,
        "Ray's own request counter",
        timeout=90,
    )
    assert [s["metric"]["application"] for s in ray_requests] == ["cmamba"]
    # Ray's per-replica series carry the same replica label values as ours.
    ray_replicas = ray_prometheus.wait_for(
        'count by (replica) (ray_serve_replica_processing_queries{job="ray"})',
        lambda r: len(r) == 2,
        "Ray's per-replica metrics",
        timeout=90,
    )
    assert {s["metric"]["replica"] for s in ray_replicas} == replicas

    # HAProxy in front: every answer went through it.
    front = ray_prometheus.wait_for(
        'haproxy_backend_http_responses_total{job="haproxy", proxy="ray_serve", code="2xx"}',
        lambda r: value(r) >= 32,
        "HAProxy's answer counter",
    )
    assert value(front) >= 32


def test_every_dashboard_query_has_data_on_ray(
    ray_stack: Any,
    ray_prometheus: Any,
    dashboard_queries: list[Any],
    as_grafana_sends: Callable[[str, str], str],
) -> None:
    send_traffic(ray_stack, n_ok=16, seed=1)
    ray_prometheus.wait_for(
        'sum(cmamba_rejected_requests_total{reason="too_large"})',
        bool,
        "the rejection to be scraped",
        timeout=60,
    )
    for query in dashboard_queries:
        expr = as_grafana_sends(query.expr, "15s")
        if "DCGM_" in expr or any(prefix in expr for prefix in GPU_ONLY_PREFIXES):
            assert ray_prometheus.query(expr) == []  # runs; no GPU or dcgm-exporter here
            continue
        ray_prometheus.wait_for(
            expr,
            lambda r: len(r) > 0,
            f"data for panel {query.panel!r} {query.ref_id}: {expr}",
            timeout=60,
        )


def test_dashboard_variables_resolve_on_ray(ray_prometheus: Any, dashboard: dict[str, Any]) -> None:
    found = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        found[variable["name"]] = ray_prometheus.variable_values(variable["definition"])
    assert len(found["replica"]) == 2, found
    assert len(found["instance"]) == 2, found
    assert FEATURES in found["endpoint"], found


def test_alert_rules_evaluate_on_ray_and_none_fires(
    ray_prometheus: Any, alert_rules: list[dict[str, Any]]
) -> None:
    ray_prometheus.wait_rules_evaluated({rule["alert"] for rule in alert_rules})
    assert ray_prometheus.api("/api/v1/alerts")["alerts"] == []


def test_ctrl_c_stops_everything_and_unlists_the_replicas(ray_stack: Any) -> None:
    assert list(ray_stack.metrics_sd_dir.glob("*.json"))
    assert ray_stack.interrupt() == 0, ray_stack.process.log_tail()
    assert list(ray_stack.metrics_sd_dir.glob("*.json")) == []
