"""The monitoring stack against a real service: a live ``cmamba serve`` and a real Prometheus.

The service serves a tiny random checkpoint on loopback; Debian's Prometheus scrapes it every
second with the shipped configuration and alert rules (addresses changed to loopback).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import features_payload
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
FEATURES = "/v1/predict/features"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

# Prometheus's own series, and those that dcgm-exporter (not the service) exports.
NOT_FROM_THE_SERVICE = {"up"}
# Series of a Ray Serve deployment only (Ray's metrics agents, HAProxy in front of Ray's
# proxy): they run here and answer nothing; test_ray_monitoring.py checks them on Ray.
RAY_ONLY_PREFIXES = ("ray_serve_", "haproxy_")
# The service exports its GPU figures only when the model runs on CUDA; the live service here
# runs on the CPU, so they must be absent (not zeros).
GPU_ONLY = {
    "cmamba_gpu_memory_allocated_bytes",
    "cmamba_gpu_memory_reserved_bytes",
    "cmamba_gpu_memory_peak_bytes",
    "cmamba_gpu_batch_peak_memory_bytes_bucket",
    "cmamba_gpu_batch_peak_memory_bytes_sum",
    "cmamba_gpu_batch_peak_memory_bytes_count",
}


def dcgm_counters() -> set[str]:
    lines = (REPO / "docker/dcgm/cmamba-counters.csv").read_text().splitlines()
    return {line.split(",")[0].strip() for line in lines if line.startswith("DCGM_")}


def send_traffic(service: Any, n_ok: int, seed: int = 0) -> None:
    """``n_ok`` valid feature requests, one too large (413) and one in the wrong profile (422)."""
    for i in range(n_ok):
        status, body = service.post_json(FEATURES, features_payload(3 + i % 5, 1000 * seed + i))
        assert status == 200, body
    status, _ = service.post_json(FEATURES, {"profile": "x", "features": {"t": [[0.0] * 40000]}})
    assert status == 413
    status, body = service.post_json(FEATURES, {"profile": "mmsa-mosei", "features": {}})
    assert status == 422, body


def exported_samples(service: Any) -> set[str]:
    status, text = service.get("/metrics")
    assert status == 200
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_metric_name_parser(metric_names: Callable[[str], set[str]]) -> None:
    expr = 'histogram_quantile(0.99, sum by (le, endpoint) (rate(a_bucket{x=~"5..", le!="1"}[5m])))'
    assert metric_names(expr) == {"a_bucket"}
    expr = '(sum(rate(b{s=~"5.."}[$__rate_interval])) or vector(0)) / sum(rate(c[1m])) > 1e3'
    assert metric_names(expr) == {"b", "c"}
    assert metric_names('up{job="cmamba"} == 0') == {"up"}
    assert metric_names("avg_over_time(q[5m]) > 48 and on (instance) r offset 5m") == {"q", "r"}
    assert metric_names("DCGM_FI_DEV_FB_USED / (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE)") == {
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_FB_FREE",
    }


def test_every_queried_metric_is_exported_by_the_service(
    live_service: Any,
    dashboard_queries: list[Any],
    alert_rules: list[dict[str, Any]],
    metric_names: Callable[[str], set[str]],
) -> None:
    send_traffic(live_service, n_ok=3)
    exported = exported_samples(live_service)
    dcgm = dcgm_counters()
    queries = [(f"panel {q.panel!r} {q.ref_id}", q.expr) for q in dashboard_queries]
    queries += [(f"alert {r.get('alert') or r.get('record')}", r["expr"]) for r in alert_rules]
    assert len(queries) > 20
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in names - NOT_FROM_THE_SERVICE:
            if name.startswith(RAY_ONLY_PREFIXES):
                continue
            if name.startswith("DCGM_"):
                assert name in dcgm, f"{where}: {name} is not in dcgm-exporter's collectors"
            elif name in GPU_ONLY:
                assert name not in exported, f"{where}: {name} on a CPU host"
            else:
                assert name in exported, f"{where}: {name} is not on the service's /metrics"


def test_prometheus_scrapes_requests_and_latency(prometheus: Any, live_service: Any) -> None:
    send_traffic(live_service, n_ok=12, seed=1)
    ok = f'sum(cmamba_requests_total{{job="cmamba", endpoint="{FEATURES}", status="200"}})'
    result = prometheus.wait_for(
        ok, lambda r: r and float(r[0]["value"][1]) >= 12, "the requests to be scraped"
    )
    assert float(result[0]["value"][1]) >= 12
    p99 = (
        "histogram_quantile(0.99, sum by (le) (rate("
        f'cmamba_request_duration_seconds_bucket{{job="cmamba", endpoint="{FEATURES}"}}[30s])))'
    )
    result = prometheus.wait_for(
        p99, lambda r: r and math.isfinite(float(r[0]["value"][1])), "a finite p99 latency"
    )
    seconds = float(result[0]["value"][1])
    assert 0.0 < seconds < 30.0


def test_every_dashboard_query_runs_and_service_panels_have_data(
    prometheus: Any,
    live_service: Any,
    dashboard_queries: list[Any],
    as_grafana_sends: Callable[[str, str], str],
) -> None:
    send_traffic(live_service, n_ok=4, seed=2)
    prometheus.wait_for(
        'sum(cmamba_rejected_requests_total{reason="too_large"})',
        lambda r: bool(r),
        "the rejection to be scraped",
    )
    for query in dashboard_queries:
        expr = as_grafana_sends(query.expr, "15s")
        gpu_only = any(name in expr for name in GPU_ONLY)
        if gpu_only or "DCGM_" in expr or any(prefix in expr for prefix in RAY_ONLY_PREFIXES):
            assert prometheus.query(expr) == []  # runs; no GPU, dcgm-exporter or Ray here
            continue
        prometheus.wait_for(
            expr, lambda r: len(r) > 0, f"data for panel {query.panel!r} {query.ref_id}: {expr}"
        )


def test_dashboard_variables_resolve(prometheus: Any, dashboard: dict[str, Any]) -> None:
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        values = prometheus.variable_values(variable["definition"])
        if variable["name"] == "replica":
            assert values == []  # one process has no replica label: All (.*) matches that
        else:
            assert values, f"variable {variable['name']} has no values"


def test_alert_rules_evaluate_and_down_alert_catches_a_dead_target(
    prometheus: Any, live_service: Any, alert_rules: list[dict[str, Any]]
) -> None:
    expected = {rule["alert"] for rule in alert_rules}
    rules = prometheus.wait_rules_evaluated(expected)
    assert {rule["name"] for rule in rules} == expected

    # The cmamba job's second target has nothing listening: CmambaDown goes pending for it
    # (it would fire after its `for: 1m`), never for the live service.
    def down_alerts() -> list[dict[str, Any]] | None:
        alerts = prometheus.api("/api/v1/alerts")["alerts"]
        down = [a for a in alerts if a["labels"]["alertname"] == "CmambaDown"]
        return down or None

    down = prometheus.poll(down_alerts, "CmambaDown for the dead target")
    assert [alert["labels"]["instance"] for alert in down] == [prometheus.dead_target]
    assert down[0]["state"] in {"pending", "firing"}
    assert down[0]["labels"]["severity"] == "critical"
    live = live_service.url.split("//")[1]
    others = prometheus.api("/api/v1/alerts")["alerts"]
    assert not [a for a in others if a["labels"].get("instance") == live]
