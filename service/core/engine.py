"""The inference core: admission, feature extraction pool, micro-batcher and model worker.

It knows nothing of HTTP: it takes plain data (numpy features, a media file path), raises the
domain errors of :mod:`service.errors`, and answers with :class:`Prediction`. The HTTP layer and
the local ``cmamba predict`` both drive it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.core.batcher import MicroBatcher
from service.core.extraction import (
    ExtractionPool,
    FeatureBundleLike,
    FeatureExtractor,
)
from service.core.types import (
    CLASS_NAMES,
    MEDIA_STAGES,
    ClipFeatures,
    ClipOutcome,
    MemorySnapshot,
    ModelIdentity,
    Prediction,
)
from service.errors import (
    DeadlineExceededError,
    DrainingError,
    FeatureMismatchError,
    InvalidInputError,
    MediaDisabledError,
    NotReadyError,
    OverCapacityError,
    ServiceError,
    StartupError,
    UndecodableMediaError,
    echo,
    echo_names,
    from_preprocessing_error,
)
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

if TYPE_CHECKING:
    from model import CheckpointInfo, CoupledMambaConfig, CoupledMambaForSentiment
    from service.core.runner import ForwardHook, ModelRunner

logger = logging.getLogger(__name__)


class CoreState(enum.StrEnum):
    """Lifecycle of the core: starting -> ready -> draining -> stopped (or failed)."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


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


class InferenceCore:
    """Owns the model, the model worker, the extraction pool and the admission limits.

    Args:
        settings: the service settings.
        metrics: where to record queue depth, batch sizes, GPU memory and readiness.
        model: an already built model to serve instead of loading ``settings.model_path``.
        extractor: a thread-safe feature extractor to use instead of
            ``preprocessing.Extractor`` for the checkpoint's modalities.
        before_forward: hook handed to the model runner (called before each model call).
    """

    def __init__(
        self,
        settings: ServiceSettings,
        metrics: ServiceMetrics,
        *,
        model: CoupledMambaForSentiment | None = None,
        extractor: FeatureExtractor | None = None,
        before_forward: ForwardHook | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._model = model
        self._info: CheckpointInfo | None = None
        self._extractor = extractor
        self._before_forward = before_forward
        self.state = CoreState.STARTING
        self.startup_error: str | None = None
        self._started = threading.Event()
        self._runner: ModelRunner | None = None
        self._batcher: MicroBatcher | None = None
        self._pool: ExtractionPool | None = None
        self._identity: ModelIdentity | None = None
        self._metadata: dict[str, Any] = {}
        self._media_unavailable = (
            "this server takes precomputed features only (POST /v1/predict/features)"
        )
        self._inflight = 0
        self._idle: asyncio.Event | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def check(self) -> None:
        """Fast checks before the slow start; raise :class:`StartupError` with a clear message."""
        if self._model is not None:
            return
        path = self.settings.model_path
        if not (path / "config.json").is_file():
            raise StartupError(
                f"no checkpoint at {path} (config.json not found): set CMAMBA_MODEL_PATH (or "
                "--model-path) to a checkpoint folder written by `cmamba train`, or build the "
                "embedded default with `make default-model`"
            )

    def start(self) -> None:
        """Load the model, start the worker, warm up, build the extractors; then go ready.

        Blocking (seconds to minutes): call it off the event loop.
        """
        try:
            self._start()
        except Exception as exc:
            self.state = CoreState.FAILED
            self.startup_error = f"{type(exc).__name__}: {exc}"
            self.metrics.ready.set(0)
            logger.exception("startup failed")
            raise
        finally:
            self._started.set()

    def _start(self) -> None:
        import torch

        from service.core.runner import ModelRunner, resolve_device

        s = self.settings
        threads = s.torch_threads
        torch.set_num_threads(threads)
        device = resolve_device(s.device)
        model = self._model
        if model is None:
            self.check()
            from model import load_checkpoint_with_info
            from model.checkpoints import pinned_hashes

            model, self._info = load_checkpoint_with_info(
                s.model_path,
                device=device,
                scan_backend=s.scan_backend,
                **pinned_hashes(s.model_path),
            )
        else:
            model = model.to(device).eval()
            model.set_scan_backend(s.scan_backend)  # "auto" is decided for the new device
        self._model = model
        runner = ModelRunner(
            model, before_forward=self._before_forward, on_oom=self.metrics.gpu_oom.inc
        )
        self._runner = runner
        batcher = MicroBatcher(
            runner.run_batch,
            max_batch_size=s.max_batch_size,
            max_batch_delay_s=s.max_batch_delay_ms / 1000.0,
            max_queue_size=s.max_queue_size,
            length_buckets=s.length_buckets,
            on_batch=self.metrics.batch_size.observe,
            on_queue_depth=self.metrics.queue_depth.set,
            thread_init=lambda: torch.set_num_threads(threads),
            upstream=self._upstream if s.adaptive_batch_delay else None,
        )
        batcher.start()
        self._batcher = batcher
        description = batcher.call(model.describe).result()
        if s.warmup:
            first = batcher.bucket_length(1)
            sizes = sorted({1, s.max_batch_size})
            batcher.call(lambda: runner.warmup(sizes, [first])).result()
            self._publish_memory(runner.memory_snapshot())

        info = self._info
        name = s.model_name or (info.name if info else "coupled-mamba")
        version = info.version if info else "0"
        self._identity = ModelIdentity(
            name=name,
            version=version,
            device=str(runner.device),
            scan_backend=runner.scan_backend,
        )
        self._metadata = self._build_metadata(model.config, description)

        if s.enable_media:
            self._pool = self._build_pool(model.config)

        device_name = str(runner.device)
        self.metrics.model_info.labels(
            name=name, version=version, device=device_name, scan_backend=runner.scan_backend
        ).set(1)
        if self.state is CoreState.STARTING:
            self.state = CoreState.READY
            self.metrics.ready.set(1)
        logger.info(
            "ready: model %s v%s on %s, scan backend %s", name, version, runner.device,
            runner.scan_backend,
        )  # fmt: skip

    def _build_pool(self, config: CoupledMambaConfig) -> ExtractionPool | None:
        modalities = tuple(config.modalities)
        source = self._extractor
        if source is None:
            from preprocessing import PROFILES

            profile = PROFILES.get(config.feature_profile)
            if profile is None or not profile.has_extractor:
                logger.warning(
                    "feature profile %r has no media extractor: serving precomputed features only",
                    config.feature_profile,
                )
                self._media_unavailable = (
                    f"the loaded model takes features of profile {config.feature_profile!r}, "
                    "which no media extractor here produces; POST /v1/predict/features instead"
                )
                return None
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
            info = self._info
            source = default_extractor(
                self.settings,
                modalities,
                info.text_encoder if info else None,
                info.face_encoder if info else None,
            )
        pool = ExtractionPool(source, self.settings.extract_workers)
        pool.warmup()
        return pool

    def _build_metadata(
        self, config: CoupledMambaConfig, description: Mapping[str, Any]
    ) -> dict[str, Any]:
        assert self._identity is not None and self._model is not None
        info = self._info
        outputs = [
            {"name": "score", "datatype": "FP32", "shape": [1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [len(CLASS_NAMES)]},
        ]
        if config.emotion_classes:
            outputs.append(
                {"name": "emotions", "datatype": "FP32", "shape": [len(config.emotion_classes)]}
            )
        return {
            "name": self._identity.name,
            "versions": [self._identity.version],
            "platform": "pytorch",
            "device": self._identity.device,
            "scan_backend": self._identity.scan_backend,
            "feature_profile": config.feature_profile,
            "modalities": list(config.modalities),
            "inputs": [
                {"name": m, "datatype": "FP32", "shape": [-1, dim]}
                for m, dim in config.feature_dims.items()
            ],
            "outputs": outputs,
            "emotion_classes": list(config.emotion_classes),
            "label_scale": list(config.label_scale),
            "classes": list(CLASS_NAMES),
            "architecture": dict(description),
            "checkpoint": {
                # The folder's name only: where it lies on the server is nobody's business.
                "name": Path(info.path).name if info else None,
                "sha256": info.sha256 if info else None,
                "training": info.training if info else {},
                "metrics": info.metrics if info else {},
                "text_encoder": _without_path(info.text_encoder if info else None),
                "face_encoder": _without_path(info.face_encoder if info else None),
            },
            "model_card": info.model_card if info else None,
        }

    def wait_started(self, timeout: float | None = None) -> bool:
        """Block until startup has finished (ready or failed); False on timeout."""
        return self._started.wait(timeout)

    @property
    def ready(self) -> bool:
        return self.state is CoreState.READY and self.worker_alive

    @property
    def worker_alive(self) -> bool:
        return self._batcher is None or self._batcher.alive

    @property
    def inflight(self) -> int:
        return self._inflight

    def _upstream(self) -> int:
        # Admitted requests not yet queued for the model (reading, parsing, extracting). Read
        # from the worker thread: a plain int, only ever written on the event loop.
        batcher = self._batcher
        return self._inflight - (batcher.depth if batcher is not None else 0)

    @property
    def identity(self) -> ModelIdentity:
        if self._identity is None:
            raise NotReadyError("the model is still loading")
        return self._identity

    @property
    def config(self) -> CoupledMambaConfig:
        if self._model is None or self.state is CoreState.STARTING:
            raise NotReadyError("the model is still loading")
        return self._model.config

    @property
    def media_enabled(self) -> bool:
        return self._pool is not None

    def require_media(self) -> None:
        """Raise :class:`MediaDisabledError` when this server takes precomputed features only."""
        if self._pool is None:
            raise MediaDisabledError(self._media_unavailable)

    def metadata(self) -> dict[str, Any]:
        """Model metadata and card for ``/v2/models/{name}``."""
        if self._identity is None:
            raise NotReadyError("the model is still loading")
        return self._metadata

    def begin_drain(self) -> None:
        """Stop admitting work; readiness turns false. In-flight requests go on."""
        if self.state in (CoreState.READY, CoreState.STARTING):
            self.state = CoreState.DRAINING
            logger.info("draining: %d requests in flight", self._inflight)
        self.metrics.ready.set(0)
        if self._inflight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` passed first."""
        if self._inflight == 0:
            return True
        if self._idle is None:
            self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return self._inflight == 0
        return True

    def stop(self) -> None:
        """Finish queued work and stop the worker and the pool (blocking)."""
        if self.state is not CoreState.FAILED:
            self.state = CoreState.STOPPED
        self.metrics.ready.set(0)
        if self._batcher is not None:
            self._batcher.stop(timeout=self.settings.drain_timeout_s)
        if self._pool is not None:
            self._pool.shutdown()

    # -- admission ----------------------------------------------------------------------------

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold one in-flight slot for the body of the ``async with``.

        Raises:
            NotReadyError: still loading (or startup failed).
            DrainingError: shutting down.
            OverCapacityError: ``max_inflight`` requests are already inside (``inflight_limit``).
        """
        if self.state in (CoreState.DRAINING, CoreState.STOPPED):
            raise DrainingError("the server is shutting down")
        if not self.ready:
            raise NotReadyError(
                "the model is still loading"
                if self.state is CoreState.STARTING
                else f"the model is not available: {self.startup_error or 'worker stopped'}"
            )
        if self._inflight >= self.settings.max_inflight:
            raise OverCapacityError(
                f"{self._inflight} requests in flight (limit {self.settings.max_inflight})",
                reason="inflight_limit",
            )
        self._inflight += 1
        self.metrics.inflight.set(self._inflight)
        if self._idle is not None:
            self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            self.metrics.inflight.set(self._inflight)
            if self._inflight == 0:
                if self._idle is None:
                    self._idle = asyncio.Event()
                self._idle.set()

    # -- requests -----------------------------------------------------------------------------

    def clip_from_features(
        self,
        profile: str,
        features: Mapping[str, np.ndarray | Sequence[Sequence[float]]],
        masks: Mapping[str, np.ndarray | Sequence[bool]] | None = None,
    ) -> ClipFeatures:
        """Validate precomputed features (arrays or nested lists) against the loaded checkpoint.

        Raises:
            FeatureMismatchError: other profile, modality or feature size than the checkpoint.
            InvalidInputError: ragged, empty, too long, non-finite or fully masked input.
        """
        config = self.config
        if profile != config.feature_profile:
            raise FeatureMismatchError(
                f"features are in profile {echo(profile)}, but the loaded model takes "
                f"{config.feature_profile!r}"
            )
        if not features:
            raise InvalidInputError("features must hold at least one modality")
        unknown = sorted(set(features) - set(config.modalities))
        if unknown:
            raise FeatureMismatchError(
                f"modalities {echo_names(unknown)} are not inputs of the loaded model "
                f"(it takes {list(config.modalities)})"
            )
        arrays: dict[str, np.ndarray] = {}
        for modality in config.modalities:
            if modality not in features:
                continue
            try:
                with np.errstate(over="ignore"):  # out-of-range values become inf, refused below
                    array = np.asarray(features[modality], dtype=np.float32)
            except (ValueError, TypeError) as exc:
                raise InvalidInputError(
                    f"features.{modality} must be a rectangular list of steps x {modality} "
                    "feature values"
                ) from exc
            dim = config.feature_dims[modality]
            if array.ndim != 2 or array.shape[0] == 0:
                raise InvalidInputError(
                    f"features.{modality} must be a non-empty list of steps, each a list of "
                    f"{dim} numbers"
                )
            if array.shape[1] != dim:
                raise FeatureMismatchError(
                    f"features.{modality} has {array.shape[1]} values per step; profile "
                    f"{config.feature_profile!r} has {dim}"
                )
            if not np.isfinite(array).all():
                raise InvalidInputError(f"features.{modality} holds values out of float32 range")
            arrays[modality] = array
        lengths = {m: a.shape[0] for m, a in arrays.items()}
        length = next(iter(lengths.values()))
        if any(n != length for n in lengths.values()):
            raise InvalidInputError(f"all modalities must share one time grid, got {lengths}")
        if length > self.settings.max_sequence_length:
            raise InvalidInputError(
                f"{length} steps is over the limit of {self.settings.max_sequence_length}"
            )
        mask_arrays: dict[str, np.ndarray] = {}
        extra = sorted(set(masks or {}) - set(arrays))
        if extra:
            raise InvalidInputError(
                f"masks given for modalities without features: {echo_names(extra)}"
            )
        for modality in arrays:
            given = (masks or {}).get(modality)
            if given is None:
                mask_arrays[modality] = np.ones(length, dtype=np.bool_)
                continue
            mask = np.asarray(given, dtype=np.bool_)
            if mask.shape != (length,):
                raise InvalidInputError(
                    f"masks.{modality} must have one flag per step ({length}), got {mask.shape}"
                )
            mask_arrays[modality] = mask
        if not any(m.any() for m in mask_arrays.values()):
            raise InvalidInputError("every step of every modality is masked out")
        return ClipFeatures(features=arrays, masks=mask_arrays, length=length)

    async def predict_features(
        self,
        clip: ClipFeatures,
        *,
        started: float,
        deadline: float,
        transcript: str | None = None,
        attribution: bool = False,
    ) -> Prediction:
        """Score precomputed features.

        Args:
            clip: validated features (see :meth:`clip_from_features`).
            started: ``time.perf_counter()`` at the start of the request.
            deadline: ``time.monotonic()`` limit of the request.
            transcript: echoed in ``modalities`` when the client sent one.
            attribution: also compute the per-modality attribution (``extra["attribution"]``).
        """
        outcome, attributed = await self._run_attributed(clip, deadline, attribution)
        summary: dict[str, Any] = {
            "transcript": transcript,
            "audio_seconds": None,
            "frames": None,
            "frames_with_face": None,
        }
        prediction = self._prediction(clip, outcome, summary, {}, started=started)
        prediction.extra["attribution"] = attributed
        return prediction

    async def predict_media(
        self,
        path: Path,
        transcript: str | None,
        *,
        started: float,
        deadline: float,
        remove_after: bool,
        upload_ms: float = 0.0,
        attribution: bool = False,
    ) -> Prediction:
        """Extract features from a media file on the pool, then score them.

        Args:
            path: the media file.
            transcript: the spoken text, when the client knows it (skips ASR).
            started: ``time.perf_counter()`` at the start of the request.
            deadline: ``time.monotonic()`` limit of the request.
            remove_after: delete ``path`` once extraction is over (it owns the file).
            upload_ms: time spent receiving the file, reported in the timings.
            attribution: also compute the per-modality attribution (``extra["attribution"]``).
        """
        bundle, wait_ms = await self.extract_bundle(
            path, transcript, deadline=deadline, remove_after=remove_after
        )
        clip = self._clip_from_bundle(bundle)
        outcome, attributed = await self._run_attributed(clip, deadline, attribution)
        summary = _summary_dict(bundle.summary)
        extra = {stage: float(ms) for stage, ms in bundle.timings_ms.items()}
        extra["upload"] = upload_ms
        extra["extract_wait"] = wait_ms
        prediction = self._prediction(clip, outcome, summary, extra, started=started)
        prediction.extra["attribution"] = attributed
        return prediction

    async def extract_bundle(
        self, path: Path, transcript: str | None, *, deadline: float, remove_after: bool
    ) -> tuple[FeatureBundleLike, float]:
        """Extract a media file's features on the pool, without scoring them.

        Returns the bundle and the milliseconds the job waited for a pool thread. Raises the
        same domain errors as :meth:`predict_media`.
        """
        if self._pool is None:
            if remove_after:
                path.unlink(missing_ok=True)
            raise MediaDisabledError(self._media_unavailable)
        stop = threading.Event()
        job = self._pool.submit(
            path, transcript, deadline=deadline, remove_after=remove_after, stop=stop
        )
        waited = asyncio.wrap_future(job)
        # Whoever gives up on the job (deadline, cancelled request), its outcome is read here,
        # so an error it ends with later is not reported as never retrieved.
        waited.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            # shield: a job that has not started must still run, to delete its file; a job
            # that has started is asked to stop (it polls ``stop`` and its deadline).
            done = await asyncio.wait_for(asyncio.shield(waited), self._remaining(deadline))
        except TimeoutError as exc:
            stop.set()
            raise DeadlineExceededError("the request deadline passed during extraction") from exc
        except asyncio.CancelledError:
            stop.set()  # the request was cancelled (its client went away)
            raise
        except ServiceError:
            raise
        except Exception as exc:
            if _is_preprocessing_error(exc):
                raise from_preprocessing_error(exc) from exc
            raise
        return done.bundle, done.wait_ms

    async def _run_attributed(
        self, clip: ClipFeatures, deadline: float, attribution: bool
    ) -> tuple[ClipOutcome, dict[str, float | None] | None]:
        """The clip's outcome and, when asked, its attribution (the ablated copies are queued
        together with the clip, see :mod:`service.core.timeline`)."""
        if not attribution:
            return await self._run_model(clip, deadline), None
        from service.core.timeline import attribution as attribution_of
        from service.core.timeline import attribution_plan

        plan = attribution_plan(clip, self.config.modalities)
        outcomes = await self.run_clips(plan.clips, deadline)
        results = [o.result for o in outcomes if o.result is not None]
        return outcomes[0], attribution_of(plan, results)

    async def run_clips(self, clips: Sequence[ClipFeatures], deadline: float) -> list[ClipOutcome]:
        """Score many clips of one request through the micro-batcher, in order.

        Clips are queued ``max_batch_size`` at a time (so one request never fills the queue on
        its own); each group is batched together like concurrent requests are.
        """
        if self._batcher is None:
            raise NotReadyError("the model is still loading")
        outcomes: list[ClipOutcome] = []
        step = max(1, min(self.settings.max_batch_size, self.settings.max_queue_size))
        for first in range(0, len(clips), step):
            # Queued back to back, before any await, so the worker finds them together.
            futures = [self._batcher.submit(c, deadline) for c in clips[first : first + step]]
            try:
                done = await asyncio.wait_for(
                    asyncio.gather(*(asyncio.wrap_future(f) for f in futures)),
                    self._remaining(deadline),
                )
            except TimeoutError as exc:
                raise DeadlineExceededError("the deadline passed waiting for the model") from exc
            for outcome in done:
                if outcome.error is not None:
                    raise outcome.error
            outcomes.extend(done)
        return outcomes

    def _clip_from_bundle(self, bundle: FeatureBundleLike) -> ClipFeatures:
        config = self.config
        if bundle.profile != config.feature_profile:
            raise RuntimeError(
                f"extractor profile {bundle.profile!r} differs from the model's "
                f"{config.feature_profile!r}"
            )
        length = int(bundle.length)
        if length <= 0:
            raise UndecodableMediaError("the media holds no usable content")
        if length > self.settings.max_sequence_length:
            raise InvalidInputError(
                f"the media spans {length} steps, over the limit of "
                f"{self.settings.max_sequence_length}"
            )
        features = {
            m: np.asarray(bundle.features[m], dtype=np.float32)
            for m in config.modalities
            if m in bundle.features
        }
        masks = {m: np.asarray(bundle.masks[m], dtype=np.bool_) for m in features}
        if not any(mask.any() for mask in masks.values()):
            wanted = {"text": "speech", "audio": "audio", "visual": "a face"}
            missing = " or ".join(wanted[m] for m in config.modalities)
            raise UndecodableMediaError(
                f"the model uses {', '.join(config.modalities)}, and the media holds no {missing}"
            )
        return ClipFeatures(features=features, masks=masks, length=length)

    async def _run_model(self, clip: ClipFeatures, deadline: float) -> ClipOutcome:
        if self._batcher is None:
            raise NotReadyError("the model is still loading")
        future = self._batcher.submit(clip, deadline)
        try:
            outcome = await asyncio.wait_for(asyncio.wrap_future(future), self._remaining(deadline))
        except TimeoutError as exc:
            raise DeadlineExceededError("the deadline passed waiting for the model") from exc
        if outcome.error is not None:
            raise outcome.error
        return outcome

    @staticmethod
    def _remaining(deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    def _prediction(
        self,
        clip: ClipFeatures,
        outcome: ClipOutcome,
        summary: dict[str, Any],
        stage_ms: Mapping[str, float],
        *,
        started: float,
    ) -> Prediction:
        assert outcome.result is not None
        probabilities = outcome.result.probabilities
        best = int(np.argmax(probabilities))
        timings = dict.fromkeys(MEDIA_STAGES, 0.0)
        timings.update(stage_ms)
        timings["queue"] = outcome.queue_ms
        timings["model"] = outcome.model_ms
        timings["total"] = (time.perf_counter() - started) * 1000.0
        modalities = {
            "used": [m for m, mask in clip.masks.items() if bool(mask.any())],
            "steps": clip.length,
            **summary,
        }
        memory = outcome.memory
        self._publish_memory(memory)
        self.metrics.observe_stages(timings)
        return Prediction(
            score=outcome.result.score,
            label=CLASS_NAMES[best],
            probabilities=dict(zip(CLASS_NAMES, probabilities, strict=True)),
            modalities=modalities,
            timings_ms=timings,
            gpu_memory=memory,
            model=self.identity,
            batch_size=outcome.batch_size,
            padded_length=outcome.padded_length,
            emotions=dict(outcome.result.emotions) if outcome.result.emotions else None,
        )

    def _publish_memory(self, memory: MemorySnapshot) -> None:
        if memory.allocated_bytes is not None:
            self.metrics.gpu_allocated.set(memory.allocated_bytes)
            self.metrics.gpu_reserved.set(memory.reserved_bytes or 0)
            self.metrics.gpu_peak.set(memory.peak_allocated_bytes or 0)


def _without_path(section: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A checkpoint's encoder section as clients see it: without the file's server path."""
    return {k: v for k, v in section.items() if k != "path"} if section else None


def _summary_dict(summary: Any) -> dict[str, Any]:
    as_dict = getattr(summary, "as_dict", None)
    out = dict(as_dict() if as_dict is not None else summary)
    out.pop("present", None)  # the answer's "used" says it
    return out


def _is_preprocessing_error(exc: BaseException) -> bool:
    try:
        from preprocessing.errors import PreprocessingError
    except ImportError:
        return False
    return isinstance(exc, PreprocessingError)
