"""The Grafana dashboard and provisioning files: structure, coverage and wiring."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}


def non_row_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exprs_of(panel: dict[str, Any]) -> list[str]:
    return [target["expr"] for target in panel["targets"]]


def test_dashboard_identity_and_variables(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "cmamba-service" and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "replica", "endpoint"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    # All must also match series without the label: a single-host service has no replica.
    assert re.fullmatch(variables["replica"]["allValue"], "")


def test_every_service_selector_honours_instance_and_replica(
    dashboard: dict[str, Any], metric_names: Callable[[str], set[str]]
) -> None:
    """Each cmamba_* selector filters by the instance and replica variables."""
    selector = re.compile(r"\b(cmamba_\w+)(\{[^}]*\})?")
    for panel in non_row_panels(dashboard):
        for expr in exprs_of(panel):
            for name, labels in selector.findall(expr):
                assert 'instance=~"$instance"' in labels, f"{panel['title']}: {name}{labels}"
                assert 'replica=~"$replica"' in labels, f"{panel['title']}: {name}{labels}"


def test_every_panel_is_well_formed(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
    for panel in non_row_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip()


def test_every_variable_used_is_defined(dashboard: dict[str, Any]) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]} | GRAFANA_BUILTINS
    for panel in non_row_panels(dashboard):
        for expr in exprs_of(panel):
            used = set(re.findall(r"\$\{?(\w+)", expr))
            assert used <= defined, f"{panel['title']}: undefined {used - defined}"


def test_process_panels_select_the_service_job(dashboard: dict[str, Any]) -> None:
    """process_* and python_gc_* come from Prometheus itself too: panels keep to the service."""
    for panel in non_row_panels(dashboard):
        for expr in exprs_of(panel):
            for labels in re.findall(r"\b(?:process|python_gc)_\w+(\{[^}]*\})?", expr):
                assert 'job="cmamba"' in labels, f"{panel['title']}: {expr}"
                assert 'instance=~"$instance"' in labels and 'replica=~"$replica"' in labels


def test_dashboard_shows_what_operators_need(
    dashboard: dict[str, Any], metric_names: Callable[[str], set[str]]
) -> None:
    panels = non_row_panels(dashboard)

    def panels_with(predicate: Callable[[str], bool]) -> list[str]:
        return [p["title"] for p in panels if any(predicate(e) for e in exprs_of(p))]

    def uses(metric: str) -> Callable[[str], bool]:
        return lambda expr: metric in metric_names(expr)

    duration = "cmamba_request_duration_seconds_bucket"
    needs = {
        "request rate": lambda e: "rate(cmamba_requests_total" in e and "status=~" not in e,
        "error ratio": lambda e: 'status=~"5..' in e and "/" in e,
        "p50": lambda e: e.startswith("histogram_quantile(0.5,") and duration in e,
        "p95": lambda e: e.startswith("histogram_quantile(0.95,") and duration in e,
        "p99": lambda e: e.startswith("histogram_quantile(0.99,") and duration in e,
        "per-stage latency": lambda e: "cmamba_stage_duration_seconds" in e and "stage" in e,
        "queue depth": uses("cmamba_queue_depth"),
        "batch size": uses("cmamba_batch_size_bucket"),
        "torch GPU memory": uses("cmamba_gpu_memory_reserved_bytes"),
        "DCGM GPU memory": uses("DCGM_FI_DEV_FB_USED"),
        "model info": uses("cmamba_model_info"),
        "requests per replica": lambda e: "by (replica)" in e and "cmamba_requests_total" in e,
        "Ray Serve requests": uses("ray_serve_num_http_requests_total"),
        "Ray Serve latency": uses("ray_serve_http_request_latency_ms_bucket"),
        "Ray Serve healthy replicas": uses("ray_serve_deployment_replica_healthy"),
        "failover replays": uses("haproxy_backend_retry_warnings_total"),
        "extraction threads": uses("cmamba_extraction_workers"),
        "busy extraction threads": uses("cmamba_extraction_busy_workers"),
        "extraction queue": uses("cmamba_extraction_queue_depth"),
        "extraction wait": uses("cmamba_extraction_wait_seconds_bucket"),
        "CPU per stage": lambda e: "cmamba_stage_cpu_seconds_total" in e and "stage" in e,
        "process CPU": uses("process_cpu_seconds_total"),
        "process memory": uses("process_resident_memory_bytes"),
        "garbage collections": uses("python_gc_collections_total"),
        "build info": uses("cmamba_build_info"),
        "model load time": uses("cmamba_model_load_seconds"),
        "model warm-up time": uses("cmamba_model_warmup_seconds"),
        "upload sizes": uses("cmamba_upload_bytes_bucket"),
        "clip durations": uses("cmamba_clip_seconds_bucket"),
        "GPU peak memory per batch": uses("cmamba_gpu_batch_peak_memory_bytes_bucket"),
        "live streams": uses("cmamba_stream_active"),
        "live stream updates": uses("cmamba_stream_updates_total"),
        "live stream lag": uses("cmamba_stream_lag_seconds_bucket"),
        "live stream dropped frames": uses("cmamba_stream_dropped_frames_total"),
    }
    missing = [need for need, predicate in needs.items() if not panels_with(predicate)]
    assert not missing, f"no panel shows: {missing}"


def test_provisioning_points_at_the_dashboard_and_datasource(dashboard: dict[str, Any]) -> None:
    provisioning = REPO / "docker/grafana/provisioning"
    datasources = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["uid"] == variable["current"]["value"]
    providers = yaml.safe_load((provisioning / "dashboards/cmamba.yml").read_text())
    assert providers["apiVersion"] == 1
    assert providers["providers"][0]["type"] == "file"
