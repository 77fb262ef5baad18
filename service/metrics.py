"""Prometheus metrics of the service (names are a contract: docs/DEPLOY.md, Monitoring), on the
app's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    """Every metric the service exports, created on one :class:`CollectorRegistry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
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
        self.gpu_allocated = Gauge(
            "cmamba_gpu_memory_allocated_bytes", "torch allocated GPU memory", registry=r
        )
        self.gpu_reserved = Gauge(
            "cmamba_gpu_memory_reserved_bytes", "torch reserved GPU memory", registry=r
        )
        self.gpu_peak = Gauge(
            "cmamba_gpu_memory_peak_bytes", "Peak GPU memory of the last batch", registry=r
        )
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

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        """Record each stage that ran (a positive time) in ``stage_duration_seconds``."""
        for stage, ms in timings_ms.items():
            if stage != "total" and ms > 0.0:
                self.stage_duration.labels(stage=stage).observe(ms / 1000.0)
