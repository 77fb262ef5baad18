"""The process, build, start-up and extraction-pool metrics, read from a live ``/metrics``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from helpers import ServerProcess, features_payload, wait_until
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import service
from service.core.extraction import ExtractionPool
from service.metrics import GPU_GAUGES, ServiceMetrics

GPU_ONLY = (
    "cmamba_gpu_memory_allocated_bytes",
    "cmamba_gpu_memory_reserved_bytes",
    "cmamba_gpu_memory_peak_bytes",
    "cmamba_gpu_batch_peak_memory_bytes",
)


def labels_of(text: str, sample_name: str) -> list[dict[str, str]]:
    return [
        sample.labels
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == sample_name
    ]


@pytest.mark.timeout(240)
def test_a_features_server_exports_process_build_and_startup_metrics(
    checkpoint: Path, spawn_server: Callable[..., ServerProcess], metric: Callable[..., float]
) -> None:
    import torch

    server = spawn_server(
        {
            "CMAMBA_MODEL_PATH": str(checkpoint),
            "CMAMBA_ENABLE_MEDIA": "false",
            "CMAMBA_DEVICE": "cpu",
            "CMAMBA_GIT_SHA": "0123abc",
            "CMAMBA_MAX_QUEUE_SIZE": "37",
        }
    )
    server.wait_ready()
    for seed in range(3):
        response = httpx.post(
            f"{server.url}/v1/predict/features", json=features_payload(40, seed), timeout=30
        )
        assert response.status_code == 200, response.text
    text = httpx.get(f"{server.url}/metrics").text

    assert metric(text, "process_cpu_seconds_total") > 0
    assert metric(text, "process_resident_memory_bytes") > 10 * 2**20
    assert metric(text, "process_start_time_seconds") > 1.6e9
    assert labels_of(text, "python_gc_collections_total")
    assert labels_of(text, "python_info")

    (build,) = labels_of(text, "cmamba_build_info")
    assert build["git_sha"] == "0123abc"
    assert build["torch"] == torch.__version__
    assert build["cuda"] == (torch.version.cuda or "none")
    assert build["scan_backend"] == labels_of(text, "cmamba_model_info")[0]["scan_backend"]
    assert build["version"] == service.__version__
    assert metric(text, "cmamba_build_info") == 1.0

    assert 0 < metric(text, "cmamba_model_load_seconds") < 60
    assert 0 < metric(text, "cmamba_model_warmup_seconds") < 60
    assert metric(text, "cmamba_stage_cpu_seconds_total", stage="model") > 0
    assert metric(text, "cmamba_extraction_workers") == 0  # features only: no pool
    assert metric(text, "cmamba_queue_capacity") == 37  # the configured queue size
    samples = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    for name in GPU_ONLY:  # a CPU host exports no GPU figures rather than zeros
        assert name not in samples


@pytest.mark.slow
def test_a_media_request_moves_the_pool_metrics(
    media_server: Any, shared_media: Path, metric: Callable[..., float]
) -> None:
    clip = shared_media / "jfk.flac"
    url = media_server.url
    before = httpx.get(f"{url}/metrics").text
    response = httpx.post(
        f"{url}/v1/predict",
        files={"file": (clip.name, clip.read_bytes(), "audio/flac")},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    after = httpx.get(f"{url}/metrics").text

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert metric(after, "cmamba_extraction_workers") == 1
    assert metric(after, "cmamba_extractor_warmup_seconds") > 0
    assert moved("cmamba_upload_bytes_count") == 1
    assert moved("cmamba_upload_bytes_sum") == clip.stat().st_size
    assert moved("cmamba_clip_seconds_count") == 1
    seconds = response.json()["modalities"]["audio_seconds"]
    assert moved("cmamba_clip_seconds_sum") == pytest.approx(seconds, abs=0.5)
    assert moved("cmamba_extraction_wait_seconds_count") == 1
    assert moved("cmamba_stage_cpu_seconds_total", stage="extraction") > 0.01
    assert metric(after, "cmamba_extraction_busy_workers") == 0
    assert metric(after, "cmamba_extraction_queue_depth") == 0


class GatedExtractor:
    """Holds each extraction until released; counts what it was given."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def warmup(self) -> None:
        pass

    def extract(self, path: Path, transcript: str | None = None) -> Any:
        assert self.release.wait(30)
        time.sleep(0.01)
        return SimpleNamespace(summary=SimpleNamespace(duration_s=2.5))


def sample_value(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    """The sum of the samples ``name{labels}`` the registry exports now."""
    text = generate_latest(metrics.registry).decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_the_pool_reports_its_queue_busy_threads_and_waits(tmp_path: Path) -> None:
    metrics = ServiceMetrics()
    extractor = GatedExtractor()
    pool = ExtractionPool(extractor, workers=2, metrics=metrics)

    def value(name: str, **labels: str) -> float:
        return sample_value(metrics, name, **labels)

    files = []
    for i in range(5):
        path = tmp_path / f"clip{i}.wav"
        path.write_bytes(b"x" * (1000 * (i + 1)))
        files.append(path)
    deadline = time.monotonic() + 60
    jobs = [pool.submit(p, None, deadline=deadline, remove_after=True) for p in files]
    wait_until(lambda: value("cmamba_extraction_busy_workers") == 2, "two busy threads")
    assert value("cmamba_extraction_queue_depth") == 3
    assert value("cmamba_extraction_workers") == 2
    assert value("cmamba_upload_bytes_count") == 5
    assert value("cmamba_upload_bytes_sum") == 15_000
    extractor.release.set()
    for job in jobs:
        job.result(30)
    pool.shutdown()
    assert value("cmamba_extraction_busy_workers") == 0
    assert value("cmamba_extraction_queue_depth") == 0
    assert value("cmamba_extraction_wait_seconds_count") == 5
    assert value("cmamba_extraction_wait_seconds_sum") > 0  # three of them waited
    assert value("cmamba_stage_cpu_seconds_total", stage="extraction") >= 0
    assert value("cmamba_clip_seconds_count") == 5
    assert value("cmamba_clip_seconds_sum") == pytest.approx(12.5)
    assert not any(p.exists() for p in files)  # the jobs own their files


def test_a_job_cancelled_before_it_starts_leaves_the_queue(tmp_path: Path) -> None:
    metrics = ServiceMetrics()
    extractor = GatedExtractor()
    pool = ExtractionPool(extractor, workers=1, metrics=metrics)
    path = tmp_path / "a.wav"
    path.write_bytes(b"x")
    deadline = time.monotonic() + 60
    running = pool.submit(path, None, deadline=deadline, remove_after=False)
    queued = pool.submit(path, None, deadline=deadline, remove_after=False)
    wait_until(lambda: sample_value(metrics, "cmamba_extraction_busy_workers") == 1, "a start")
    assert sample_value(metrics, "cmamba_extraction_queue_depth") == 1
    assert queued.cancel()
    assert sample_value(metrics, "cmamba_extraction_queue_depth") == 0
    extractor.release.set()
    running.result(30)
    pool.shutdown()
    assert sample_value(metrics, "cmamba_extraction_queue_depth") == 0
    assert sample_value(metrics, "cmamba_extraction_busy_workers") == 0


def test_gpu_figures_are_registered_only_when_asked() -> None:
    metrics = ServiceMetrics()
    text = generate_latest(metrics.registry).decode()
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert not any(line.startswith(name) for line in samples for name in GPU_ONLY)
    # The contract's gauges are declared (HELP, TYPE) without a sample until then.
    assert all(f"# TYPE {name} gauge" in text for name in GPU_GAUGES)
    metrics.enable_gpu()
    metrics.enable_gpu()  # idempotent
    text = generate_latest(metrics.registry).decode()
    assert all(f"# TYPE {name}" in text for name in GPU_ONLY)
    assert all(text.count(f"# TYPE {name} ") == 1 for name in GPU_GAUGES)  # declared once
