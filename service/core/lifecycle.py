"""Lifecycle: the core's states, and the slow start that loads and warms the model, starts the
model worker and builds the extraction pool."""

from __future__ import annotations

import enum
import logging
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.core.assembly import model_metadata, publish_memory
from service.core.batcher import MicroBatcher
from service.core.extraction import ExtractionPool, FeatureExtractor
from service.core.faults import FaultPlan
from service.core.health_state import FatalKind, HealthState
from service.core.trace_context import BatchTracer
from service.core.types import ModelIdentity
from service.errors import StartupError
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

if TYPE_CHECKING:
    from model import CheckpointInfo, CoupledMambaConfig, CoupledMambaForSentiment
    from service.core.runner import ForwardHook, ModelRunner
    from service.core.types import ClipFeatures, ClipOutcome

logger = logging.getLogger(__name__)

FEATURES_ONLY = "this server takes precomputed features only (POST /v1/predict/features)"


class CoreState(enum.StrEnum):
    """Lifecycle of the core: starting -> ready -> draining -> stopped (or failed)."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


def check_checkpoint(path: Path) -> None:
    """Fast check before the slow start; raise :class:`StartupError` with a clear message."""
    if not (path / "config.json").is_file():
        raise StartupError(
            f"no checkpoint at {path} (config.json not found): set CMAMBA_MODEL_PATH (or "
            "--model-path) to a checkpoint folder written by `cmamba train`, or build the "
            "embedded default with `make default-model`"
        )


def default_extractor(
    settings: ServiceSettings,
    modalities: Sequence[str],
    text_encoder: Mapping[str, Any] | None = None,
    face_encoder: Mapping[str, Any] | None = None,
) -> FeatureExtractor:
    """The real feature extractor, limited to ``modalities`` (nothing else is loaded).

    ``text_encoder`` and ``face_encoder`` are a checkpoint's sections (``CheckpointInfo``): the
    fine-tuned text layers are applied over the bundled text model, and with a face encoder the
    extractor makes ``multimodal-v1`` features (Whisper encoder states for the audio, the face
    encoder's embedding of the face crop for the visual modality); both files hash checked.
    """
    from preprocessing import Extractor, ExtractorSettings

    options: dict[str, Any] = {
        "max_duration_s": settings.max_media_seconds,
        "max_file_bytes": settings.max_upload_bytes,
        "max_audio_rate_channels": settings.max_audio_rate_channels,
    }
    options.update(settings.extractor_options)
    if text_encoder is not None:
        options["text_tuning_path"] = Path(text_encoder["path"])
        options["text_tuning_sha256"] = text_encoder["sha256"]
    if face_encoder is not None:
        options["face_encoder_path"] = Path(face_encoder["path"])
        options["face_encoder_sha256"] = face_encoder["sha256"]
        options["audio_features"] = "whisper"
    extractor: FeatureExtractor = Extractor(
        ExtractorSettings(**options), modalities=tuple(modalities)
    )
    return extractor


@dataclass
class Serving:
    """What a started core serves with."""

    model: CoupledMambaForSentiment
    info: CheckpointInfo | None
    runner: ModelRunner
    batcher: MicroBatcher
    pool: ExtractionPool | None
    identity: ModelIdentity
    metadata: dict[str, Any]
    media_unavailable: str
    """Why media requests are refused when ``pool`` is None."""

    def stop(self, timeout: float, *, broken: bool = False) -> None:
        """Finish queued work and stop the worker and the pool (blocking); ``broken``: after a
        fatal failure, wait for neither (a broken worker may never return)."""
        self.batcher.stop(timeout=0.0 if broken else timeout)
        if self.pool is not None:
            self.pool.shutdown(wait=not broken)


def start_serving(
    settings: ServiceSettings,
    metrics: ServiceMetrics,
    *,
    model: CoupledMambaForSentiment | None,
    extractor: FeatureExtractor | None,
    before_forward: ForwardHook | None,
    inflight: Callable[[], int],
    health: HealthState,
    fault: FaultPlan | None = None,
    tracer: BatchTracer | None = None,
) -> Serving:
    """Load the model (``settings.model_path`` unless ``model`` is given), start the model
    worker, warm up, and build the extraction pool. Blocking (seconds to minutes).

    ``inflight`` counts the admitted requests (the adaptive batch delay reads it). A CUDA
    error, a dead model worker or a dead extraction thread is reported to ``health``, which
    also follows the queue's saturation; ``fault`` injects one (tests). ``tracer`` (tracing on)
    opens a span per model call. A failure stops what was started and raises.
    """
    import torch

    from service.core.runner import ModelRunner, resolve_device

    s = settings
    threads = s.torch_threads
    torch.set_num_threads(threads)
    device = resolve_device(s.device)
    info: CheckpointInfo | None = None
    load_started = time.perf_counter()
    if model is None:
        check_checkpoint(s.model_path)
        from model import load_checkpoint_with_info
        from model.checkpoints import pinned_hashes

        model, info = load_checkpoint_with_info(
            s.model_path,
            device=device,
            scan_backend=s.scan_backend,
            **pinned_hashes(s.model_path),
        )
    else:
        model = model.to(device).eval()
        model.set_scan_backend(s.scan_backend)  # "auto" is decided for the new device
    metrics.model_load_seconds.set(time.perf_counter() - load_started)
    runner = ModelRunner(
        model,
        before_forward=_with_fault(before_forward, fault),
        on_oom=metrics.gpu_oom.inc,
        on_fatal=fatal_reporter(health, "cuda"),
    )
    if runner.device.type == "cuda":
        metrics.enable_gpu()
    batcher: MicroBatcher | None = None

    def upstream() -> int:
        # Admitted requests not yet queued for the model (reading, parsing, extracting). Read
        # from the worker thread.
        return inflight() - (batcher.depth if batcher is not None else 0)

    batcher = MicroBatcher(
        measured_batches(runner, metrics),
        max_batch_size=s.max_batch_size,
        max_batch_delay_s=s.max_batch_delay_ms / 1000.0,
        max_queue_size=s.max_queue_size,
        length_buckets=s.length_buckets,
        on_batch=metrics.batch_size.observe,
        on_queue_depth=lambda depth: _follow_queue(metrics, health, depth, s.max_queue_size),
        thread_init=lambda: torch.set_num_threads(threads),
        upstream=upstream if s.adaptive_batch_delay else None,
        on_death=fatal_reporter(health, "model_worker"),
        tracer=tracer,
    )
    metrics.queue_capacity.set(s.max_queue_size)
    batcher.start()
    try:
        description = batcher.call(model.describe).result()
        if s.warmup:
            first = batcher.bucket_length(1)
            sizes = sorted({1, s.max_batch_size})
            warmup_started = time.perf_counter()
            batcher.call(lambda: runner.warmup(sizes, [first])).result()
            metrics.model_warmup_seconds.set(time.perf_counter() - warmup_started)
            publish_memory(metrics, runner.memory_snapshot())

        identity = ModelIdentity(
            name=s.model_name or (info.name if info else "coupled-mamba"),
            version=info.version if info else "0",
            device=str(runner.device),
            scan_backend=runner.scan_backend,
        )
        metadata = model_metadata(identity, model.config, description, info)
        pool, media_unavailable = None, FEATURES_ONLY
        if s.enable_media:
            pool, media_unavailable = _build_pool(
                s, model.config, info, extractor, metrics, health, fault
            )
    except BaseException:
        batcher.stop(timeout=s.drain_timeout_s)
        raise

    metrics.model_info.labels(
        name=identity.name,
        version=identity.version,
        device=identity.device,
        scan_backend=identity.scan_backend,
    ).set(1)
    metrics.build_info.labels(**build_labels(s, runner.scan_backend)).set(1)
    logger.info(
        "ready: model %s v%s on %s, scan backend %s", identity.name, identity.version,
        identity.device, identity.scan_backend,
    )  # fmt: skip
    return Serving(
        model=model,
        info=info,
        runner=runner,
        batcher=batcher,
        pool=pool,
        identity=identity,
        metadata=metadata,
        media_unavailable=media_unavailable,
    )


def _with_fault(hook: ForwardHook | None, fault: FaultPlan | None) -> ForwardHook | None:
    """``hook`` followed by the injected fault's (tests)."""
    if fault is None:
        return hook

    def both(features: Any, masks: Any) -> None:
        if hook is not None:
            hook(features, masks)
        fault.before_forward(features, masks)

    return both


def fatal_reporter(health: HealthState, kind: FatalKind) -> Callable[[BaseException], None]:
    """A callback that reports an exception as a fatal failure of ``kind``."""

    def report(exc: BaseException) -> None:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        health.trip(kind, f"{type(exc).__name__}: {first_line}")

    return report


def _follow_queue(metrics: ServiceMetrics, health: HealthState, depth: int, size: int) -> None:
    metrics.queue_depth.set(depth)
    health.observe_queue(depth, size)


def measured_batches(
    runner: ModelRunner, metrics: ServiceMetrics
) -> Callable[[Sequence[ClipFeatures], int], list[ClipOutcome]]:
    """``runner.run_batch`` that records the model worker's CPU seconds and, on CUDA, the
    batch's peak memory (the runner resets the peak when each model call starts)."""
    cpu_seconds = metrics.stage_cpu.labels(stage="model")

    def run_batch(clips: Sequence[ClipFeatures], padded_length: int) -> list[ClipOutcome]:
        cpu_started = time.thread_time()
        try:
            outcomes = runner.run_batch(clips, padded_length)
        finally:
            cpu_seconds.inc(time.thread_time() - cpu_started)
        peaks = [o.memory.peak_allocated_bytes for o in outcomes]
        peak = max((p for p in peaks if p is not None), default=None)
        if peak is not None:
            metrics.gpu_batch_peak.observe(peak)
        return outcomes

    return run_batch


def git_sha(settings: ServiceSettings) -> str:
    """The commit being served: ``CMAMBA_GIT_SHA`` (set in the image), else asked of git when
    the source is a checkout, else "unknown"."""
    if settings.git_sha:
        return settings.git_sha
    source = Path(__file__).resolve().parents[2]
    if not (source / ".git").exists():
        return "unknown"
    try:
        done = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def build_labels(settings: ServiceSettings, scan_backend: str) -> dict[str, str]:
    """The labels of ``cmamba_build_info``: the service's version, commit, torch, CUDA (torch's
    build; "none" for a CPU build) and the scan backend chosen at load."""
    import torch

    from service import __version__

    return {
        "version": __version__,
        "git_sha": git_sha(settings),
        "torch": str(torch.__version__),
        "cuda": str(torch.version.cuda or "none"),
        "scan_backend": scan_backend,
    }


def _build_pool(
    settings: ServiceSettings,
    config: CoupledMambaConfig,
    info: CheckpointInfo | None,
    extractor: FeatureExtractor | None,
    metrics: ServiceMetrics,
    health: HealthState,
    fault: FaultPlan | None,
) -> tuple[ExtractionPool | None, str]:
    """The extraction pool (None when no extractor makes the checkpoint's features) and the
    reason media requests are refused without one."""
    modalities = tuple(config.modalities)
    if extractor is None:
        from preprocessing import PROFILES

        profile = PROFILES.get(config.feature_profile)
        if profile is None or not profile.has_extractor:
            logger.warning(
                "feature profile %r has no media extractor: serving precomputed features only",
                config.feature_profile,
            )
            return None, (
                f"the loaded model takes features of profile {config.feature_profile!r}, "
                "which no media extractor here produces; POST /v1/predict/features instead"
            )
        wrong = {
            m: (config.feature_dims[m], profile.dims.get(m))
            for m in modalities
            if config.feature_dims[m] != profile.dims.get(m)
        }
        if wrong:
            raise StartupError(
                f"the checkpoint's feature sizes differ from profile {profile.name!r} "
                f"(checkpoint, profile): {wrong}"
            )
        extractor = default_extractor(
            settings,
            modalities,
            info.text_encoder if info else None,
            info.face_encoder if info else None,
        )
    pool = ExtractionPool(
        extractor,
        settings.extract_workers,
        metrics,
        on_death=fatal_reporter(health, "extraction_worker"),
        before_job=fault.before_extraction if fault is not None else None,
    )
    pool.warmup()
    return pool, FEATURES_ONLY
