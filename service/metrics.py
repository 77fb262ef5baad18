"""Prometheus metrics of the service (names are a contract: docs/DEPLOY.md, Monitoring), on the
app's registry, with the process's own (``process_*``, ``python_gc_*``, ``python_info``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from service.jobs.store import FINISHED_STATES, JobState

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
UPLOAD_BUCKETS = tuple(float(2**p) for p in range(10, 31, 2))  # 1 KiB ... 1 GiB, x4
CLIP_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0)
MEMORY_BUCKETS = tuple(float(2**p) for p in range(20, 38))  # 1 MiB ... 128 GiB, x2
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)

GPU_GAUGES = {
    "cmamba_gpu_memory_allocated_bytes": "torch allocated GPU memory",
    "cmamba_gpu_memory_reserved_bytes": "torch reserved GPU memory",
    "cmamba_gpu_memory_peak_bytes": "Peak GPU memory of the last batch",
}
"""The contract's GPU memory gauges (name: help)."""


class ServiceMetrics:
    """Every metric the service exports, created on one :class:`CollectorRegistry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # The process: CPU seconds, resident memory, open files, start time; the collector
        # generations and collections; the Python version. Not on the default registry (a
        # registry can hold one copy of each): every app has its own.
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "cmamba_requests_total", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "cmamba_request_duration_seconds",
            "Time from request start to the end of the answer",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "cmamba_stage_duration_seconds",
            "Time per pipeline stage (decode, asr, text, audio, visual, queue, model...)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "cmamba_batch_size", "Clips per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "cmamba_queue_depth", "Clips waiting for the model worker", registry=r
        )
        self.inflight = Gauge(
            "cmamba_inflight_requests", "Prediction requests inside the service", registry=r
        )
        self.rejected = Counter(
            "cmamba_rejected_requests_total",
            "Requests refused or failed by a limit",
            ["reason"],
            registry=r,
        )
        # GPU figures: registered by enable_gpu() when the model runs on CUDA, so a CPU host
        # exports no sample rather than zeros that read as "no memory used". Until then the
        # contract's three gauges are declared without a sample (their HELP and TYPE lines),
        # so the names stay in /metrics and every query of them finds no series.
        self.gpu_allocated, self.gpu_reserved, self.gpu_peak = (
            Gauge(name, text, registry=None) for name, text in GPU_GAUGES.items()
        )
        self.gpu_batch_peak = Histogram(
            "cmamba_gpu_batch_peak_memory_bytes",
            "Peak torch allocated GPU memory of each model call",
            buckets=MEMORY_BUCKETS,
            registry=None,
        )
        self._gpu_enabled = False
        r.register(_DeclaredOnly(GPU_GAUGES, lambda: self._gpu_enabled))
        self.model_info = Gauge(
            "cmamba_model_info",
            "The served model (value 1)",
            ["name", "version", "device", "scan_backend"],
            registry=r,
        )
        self.ready = Gauge("cmamba_ready", "1 when ready to serve, else 0", registry=r)
        self.gpu_oom = Counter(
            "cmamba_gpu_oom_total", "Model calls that ran out of GPU memory", registry=r
        )

        # Build and start-up.
        self.build_info = Gauge(
            "cmamba_build_info",
            "The running build (value 1)",
            ["version", "git_sha", "torch", "cuda", "scan_backend"],
            registry=r,
        )
        self.model_load_seconds = Gauge(
            "cmamba_model_load_seconds", "Time to load the model onto its device", registry=r
        )
        self.model_warmup_seconds = Gauge(
            "cmamba_model_warmup_seconds", "Time of the model's warm-up batches", registry=r
        )
        self.extractor_warmup_seconds = Gauge(
            "cmamba_extractor_warmup_seconds",
            "Time to load and warm up the media feature extractors",
            registry=r,
        )

        # The extraction pool (media requests), and what it is given.
        self.extraction_workers = Gauge(
            "cmamba_extraction_workers", "Extraction threads (0: features only)", registry=r
        )
        self.extraction_queue_depth = Gauge(
            "cmamba_extraction_queue_depth",
            "Media files waiting for an extraction thread",
            registry=r,
        )
        self.extraction_busy_workers = Gauge(
            "cmamba_extraction_busy_workers", "Extraction threads at work", registry=r
        )
        self.extraction_wait = Histogram(
            "cmamba_extraction_wait_seconds",
            "Time a media file waited for an extraction thread",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_cpu = Counter(
            "cmamba_stage_cpu_seconds_total",
            "CPU time of the thread running each stage (extraction, model); work a library "
            "hands to threads of its own counts only in process_cpu_seconds_total",
            ["stage"],
            registry=r,
        )
        self.upload_bytes = Histogram(
            "cmamba_upload_bytes",
            "Size of each uploaded media file",
            buckets=UPLOAD_BUCKETS,
            registry=r,
        )
        self.clip_seconds = Histogram(
            "cmamba_clip_seconds",
            "Duration of each extracted media clip",
            buckets=CLIP_BUCKETS,
            registry=r,
        )
        # Jobs: long recordings (/v1/jobs) ----------------------------------------------------
        self.jobs = Gauge(
            "cmamba_jobs",
            "Jobs in the job store by state (read from the store every few seconds)",
            ["state"],
            registry=r,
        )
        self.job_duration = Histogram(
            "cmamba_job_duration_seconds",
            "Time from a job's start to its end, by final state",
            ["state"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.job_queue_wait = Histogram(
            "cmamba_job_queue_wait_seconds",
            "Time from a job's submission to its first start",
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.job_media_seconds = Counter(
            "cmamba_job_media_seconds_total",
            "Media seconds processed by jobs (each part counted once, when stored)",
            registry=r,
        )
        for state in JobState:  # every series from the start (zeros), jobs or not
            self.jobs.labels(state=str(state))
            if state in FINISHED_STATES:
                self.job_duration.labels(state=str(state))

        # Failures that heal: counted once, just before the process exits to be restarted.
        self.fatal_errors = Counter(
            "cmamba_fatal_errors_total",
            "Fatal failures (kind: cuda, model_worker, extraction_worker) after which the "
            "process exits to be restarted",
            ["kind"],
            registry=r,
        )

        # The configured model queue size (CMAMBA_MAX_QUEUE_SIZE), so the queue alert follows it.
        self.queue_capacity = Gauge(
            "cmamba_queue_capacity", "Most clips the model queue holds", registry=r
        )

        # Live streams (WS /v1/stream).
        self.stream_active = Gauge("cmamba_stream_active", "Live streams open now", registry=r)
        self.stream_updates = Counter(
            "cmamba_stream_updates_total", "Updates sent to live streams", registry=r
        )
        self.stream_lag = Histogram(
            "cmamba_stream_lag_seconds",
            "How far each update's answer is behind the audio received (seconds of stream)",
            buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.stream_update_latency = Histogram(
            "cmamba_stream_update_latency_seconds",
            "Compute time of each update (live features and the model step)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stream_dropped_frames = Counter(
            "cmamba_stream_dropped_frames_total",
            "Video frames of live streams dropped because the server was behind",
            registry=r,
        )
        self.stream_ended = Counter(
            "cmamba_stream_ended_total", "Live streams ended, by reason", ["reason"], registry=r
        )

    def enable_gpu(self) -> None:
        """Export the GPU memory figures (the model runs on CUDA). Idempotent."""
        if not self._gpu_enabled:
            self._gpu_enabled = True
            for collector in (
                self.gpu_allocated, self.gpu_reserved, self.gpu_peak, self.gpu_batch_peak,
            ):  # fmt: skip
                self.registry.register(collector)

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        """Record each stage that ran (a positive time) in ``stage_duration_seconds``."""
        for stage, ms in timings_ms.items():
            if stage != "total" and ms > 0.0:
                self.stage_duration.labels(stage=stage).observe(ms / 1000.0)


class _DeclaredOnly:
    """A collector that yields gauge families without samples (``{name: help}``) until
    ``registered()`` says the real gauges are registered, then nothing."""

    def __init__(self, gauges: dict[str, str], registered: Callable[[], bool]) -> None:
        self._gauges = gauges
        self._registered = registered

    def describe(self) -> list[Any]:
        return []  # no names claimed: the real gauges register under them later

    def collect(self) -> Iterator[Any]:
        if self._registered():
            return
        for name, text in self._gauges.items():
            yield GaugeMetricFamily(name, text)
