"""The inference core: the use cases (predict, attribution, timeline) over the model worker.

It knows nothing of HTTP: it takes plain data (numpy features, a media file path), raises the
domain errors of :mod:`service.errors`, and answers with :class:`Prediction` or
:class:`TimelinePrediction`. The HTTP layer and the local ``cmamba predict`` both drive it.
Its parts live beside it: :mod:`~service.core.lifecycle` (start, states),
:mod:`~service.core.admission` (in-flight limit), :mod:`~service.core.validation` (inputs),
:mod:`~service.core.assembly` (timings, metrics, answers).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.core import assembly
from service.core.admission import Admission
from service.core.attribution import attribution as attribution_of
from service.core.attribution import attribution_plan
from service.core.extraction import ExtractionPool, FeatureBundleLike, FeatureExtractor
from service.core.faults import parse_fault
from service.core.health_state import FatalFailure, HealthState
from service.core.lifecycle import (
    CoreState,
    Serving,
    check_checkpoint,
    fatal_reporter,
    start_serving,
)
from service.core.streaming import (
    LiveSourceFactory,
    StreamHub,
    StreamOptions,
    StreamSession,
    live_extractor_factory,
)
from service.core.timeline import Timeline, TimelinePrediction, assemble, plan_timeline
from service.core.trace_context import BatchTracer
from service.core.types import Attribution, ClipFeatures, ClipOutcome, ModelIdentity, Prediction
from service.core.validation import clip_from_bundle, clip_from_features
from service.errors import (
    DeadlineExceededError,
    DrainingError,
    FatalServiceError,
    InvalidInputError,
    MediaDisabledError,
    NotReadyError,
    OverCapacityError,
    ServiceError,
    from_preprocessing_error,
)
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

if TYPE_CHECKING:
    from model import CoupledMambaConfig, CoupledMambaForSentiment
    from service.core.runner import ForwardHook

logger = logging.getLogger(__name__)


class InferenceCore:
    """Owns the model, the model worker, the extraction pool and the admission limits.

    Args:
        settings: the service settings.
        metrics: where to record queue depth, batch sizes, GPU memory and readiness.
        model: an already built model to serve instead of loading ``settings.model_path``.
        extractor: a thread-safe feature extractor to use instead of
            ``preprocessing.Extractor`` for the checkpoint's modalities.
        before_forward: hook handed to the model runner (called before each model call).
        tracer: opens a span per model call, linked to the traced requests (tracing on).
        live_source_factory: builds each live stream's feature source instead of
            ``preprocessing.live.LiveExtractor`` over the server's extractor.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        metrics: ServiceMetrics,
        *,
        model: CoupledMambaForSentiment | None = None,
        extractor: FeatureExtractor | None = None,
        before_forward: ForwardHook | None = None,
        tracer: BatchTracer | None = None,
        live_source_factory: LiveSourceFactory | None = None,
    ) -> None:
        self.settings = settings
        self._tracer = tracer
        self.metrics = metrics
        self._model = model
        self._extractor = extractor
        self._before_forward = before_forward
        self.state = CoreState.STARTING
        self.startup_error: str | None = None
        self._started = threading.Event()
        self._serving: Serving | None = None
        self._admission = Admission(settings.max_inflight, metrics, self._refusal)
        self.health = HealthState(metrics.fatal_errors, settings.ready_saturation_s)
        self.health.on_fatal(self._on_fatal)
        self._fault = parse_fault(settings.fault_injection)
        self._background_pool: ExtractionPool | None = None  # job work (extract_bundle)
        self._background_lock = threading.Lock()
        self._live_source_factory = live_source_factory
        self._streams: StreamHub | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def check(self) -> None:
        """Fast checks before the slow start; raise :class:`StartupError` with a clear message."""
        if self._model is None:
            check_checkpoint(self.settings.model_path)

    def start(self) -> None:
        """Load the model, start the worker, warm up, build the extractors; then go ready.

        Blocking (seconds to minutes): call it off the event loop.
        """
        try:
            self._serving = start_serving(
                self.settings,
                self.metrics,
                model=self._model,
                extractor=self._extractor,
                before_forward=self._before_forward,
                inflight=lambda: self._admission.inflight,
                health=self.health,
                fault=self._fault,
                tracer=self._tracer,
            )
            if self.state is CoreState.STARTING:
                self.state = CoreState.READY
                self.metrics.ready.set(1)
                if self._fault is not None:
                    self._fault.arm()
                    logger.warning("fault injection armed: %s", self.settings.fault_injection)
        except Exception as exc:
            self.state = CoreState.FAILED
            self.startup_error = f"{type(exc).__name__}: {exc}"
            self.metrics.ready.set(0)
            logger.exception("startup failed")
            raise
        finally:
            self._started.set()

    def wait_started(self, timeout: float | None = None) -> bool:
        """Block until startup has finished (ready or failed); False on timeout."""
        return self._started.wait(timeout)

    def begin_drain(self) -> None:
        """Stop admitting work; readiness turns false. In-flight requests go on."""
        if self.state in (CoreState.READY, CoreState.STARTING):
            self.state = CoreState.DRAINING
            logger.info("draining: %d requests in flight", self.inflight)
        self.metrics.ready.set(0)
        self._admission.wake_idle_waiters()
        if self._streams is not None:
            self._streams.begin_drain()  # every live stream ends with a final answer

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight and no live stream is open; False if
        ``timeout`` passed first."""
        started = time.monotonic()
        idle = await self._admission.wait_idle(timeout)
        if self._streams is not None:
            left = max(0.0, timeout - (time.monotonic() - started))
            idle = await self._streams.wait_closed(left) and idle
        return idle

    def stop(self) -> None:
        """Finish queued work and stop the worker and the pool (blocking; after a fatal
        failure, without waiting for the broken parts)."""
        if self.state is not CoreState.FAILED:
            self.state = CoreState.STOPPED
        self.metrics.ready.set(0)
        if self._streams is not None:
            self._streams.shutdown()
        if self._serving is not None:
            broken = self.health.fatal is not None
            self._serving.stop(timeout=self.settings.drain_timeout_s, broken=broken)
        if self._background_pool is not None:
            self._background_pool.shutdown(wait=self.health.fatal is None)

    # -- health -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Takes work: started, not draining, its workers sound."""
        return self.state is CoreState.READY and self.worker_alive and self.health.fatal is None

    def watch(self) -> None:
        """Report a worker thread found dead (called periodically by the server; the threads
        also report their own death)."""
        serving = self._serving
        if serving is None or self.health.fatal is not None:
            return
        if self.state in (CoreState.READY, CoreState.DRAINING):
            if not serving.batcher.alive:
                self.health.trip("model_worker", "the model worker thread is not running")
            elif serving.pool is not None and not serving.pool.alive:
                self.health.trip("extraction_worker", "an extraction thread is not running")
            elif self._background_pool is not None and not self._background_pool.alive:
                self.health.trip("extraction_worker", "a job extraction thread is not running")

    async def check_health(self, timeout_s: float) -> None:
        """Raise when this instance should be replaced (Ray's replica health check): after a
        fatal failure, a failed start or a dead worker, or when a tiny operation on the model's
        device, run on the model worker, fails or takes over ``timeout_s``. Nothing while the
        model is still loading."""
        self.watch()
        error = self.liveness_error()
        if error is not None:
            raise error
        serving = self._serving
        if serving is None:
            return
        probe = serving.batcher.call(serving.runner.probe_device)
        try:
            await asyncio.wait_for(asyncio.wrap_future(probe), timeout_s)
        except TimeoutError as exc:
            raise FatalServiceError(
                f"the model worker did not answer a device probe within {timeout_s:g} s"
            ) from exc
        error = self.liveness_error()
        if error is not None:
            raise error

    def liveness_error(self) -> ServiceError | None:
        """Why the process should be restarted (None: it is live)."""
        fatal = self.health.fatal
        if fatal is not None:
            return FatalServiceError(
                f"fatal {fatal.kind} failure ({fatal.reason}): the instance restarts; retry on "
                "another instance"
            )
        if self.state is CoreState.FAILED:
            return NotReadyError(f"startup failed: {self.startup_error}")
        if not self.worker_alive:
            return NotReadyError("the model worker stopped")
        return None

    def readiness_error(self) -> ServiceError | None:
        """Why the instance should get no traffic now (None: it is ready)."""
        if self.ready:
            if self.health.overloaded:
                return OverCapacityError(
                    f"the model queue has been full for {self.health.saturated_for():.0f} s",
                    reason="saturated",
                )
            return None
        if self.health.fatal is not None:
            return self.liveness_error()
        if self.state in (CoreState.DRAINING, CoreState.STOPPED):
            return DrainingError("the server is shutting down")
        if self.state is CoreState.FAILED:
            return NotReadyError(f"startup failed: {self.startup_error}")
        if self.state is CoreState.READY:
            return NotReadyError("the model worker stopped")
        return NotReadyError("the model is loading")

    def _on_fatal(self, failure: FatalFailure) -> None:
        """Fail what is queued (model and extraction) and take no more work."""
        self.metrics.ready.set(0)
        error = FatalServiceError(
            f"the instance failed ({failure.kind}) and restarts; retry on another instance"
        )
        serving = self._serving
        if serving is not None:
            serving.batcher.fail(error)
            if serving.pool is not None:
                serving.pool.fail(error)
        if self._streams is not None:
            self._streams.fail_all(error)  # each live stream ends with close code 4503

    @property
    def worker_alive(self) -> bool:
        return self._serving is None or self._serving.batcher.alive

    @property
    def inflight(self) -> int:
        return self._admission.inflight

    @property
    def stream_rate_hz(self) -> float:
        """The live feature grid's rate (steps per second)."""
        return self._stream_hub().rate_hz

    @property
    def active_streams(self) -> int:
        """Live streams open now."""
        return self._streams.active if self._streams is not None else 0

    @property
    def queue_depth(self) -> int:
        """Clips waiting for the model worker."""
        return self._serving.batcher.depth if self._serving is not None else 0

    @property
    def identity(self) -> ModelIdentity:
        return self._ready_parts().identity

    @property
    def config(self) -> CoupledMambaConfig:
        return self._ready_parts().model.config

    def metadata(self) -> dict[str, Any]:
        """Model metadata and card for ``/v2/models/{name}``."""
        return self._ready_parts().metadata

    def require_media(self) -> None:
        """Raise :class:`MediaDisabledError` when this server takes precomputed features only."""
        serving = self._ready_parts()
        if serving.pool is None:
            raise MediaDisabledError(serving.media_unavailable)

    def _ready_parts(self) -> Serving:
        if self._serving is None:
            raise NotReadyError("the model is still loading")
        return self._serving

    # -- admission ----------------------------------------------------------------------------

    def admit(self) -> AbstractAsyncContextManager[None]:
        """Hold one in-flight slot for the body of an ``async with`` (:class:`Admission`).

        Raises:
            NotReadyError: still loading (or startup failed).
            DrainingError: shutting down.
            OverCapacityError: ``max_inflight`` requests are already inside (``inflight_limit``).
        """
        return self._admission.admit()

    def _refusal(self) -> ServiceError | None:
        if self.health.fatal is not None:
            return self.liveness_error()
        if self.state in (CoreState.DRAINING, CoreState.STOPPED):
            return DrainingError("the server is shutting down")
        if not self.ready:
            return NotReadyError(
                "the model is still loading"
                if self.state is CoreState.STARTING
                else f"the model is not available: {self.startup_error or 'worker stopped'}"
            )
        return None

    # -- live streams -------------------------------------------------------------------------

    async def open_stream(self, options: StreamOptions) -> StreamSession:
        """Start a live stream (:mod:`service.core.streaming`); call from the event loop.

        Raises:
            NotReadyError, DrainingError: the server takes no new stream now.
            MediaDisabledError: this server makes no live features.
            TooManyStreamsError: ``stream_max_streams`` streams are open.
            StreamProtocolError: the live feature source refuses the options.
        """
        refusal = self._refusal()
        if refusal is not None:
            raise refusal
        return await self._stream_hub().open(options)

    def _stream_hub(self) -> StreamHub:
        if self._streams is not None:
            return self._streams
        serving = self._ready_parts()
        factory = self._live_source_factory
        rate_hz = 10.0
        if factory is None:
            if serving.pool is None:
                raise MediaDisabledError(serving.media_unavailable)
            extractor = serving.pool.extractor
            try:
                factory = live_extractor_factory(extractor)
            except ImportError as exc:
                raise MediaDisabledError("this build makes no live features") from exc
            rate_hz = float(getattr(getattr(extractor, "settings", None), "rate_hz", rate_hz))
        self._streams = StreamHub(
            self.settings,
            self.metrics,
            batcher=serving.batcher,
            runner=serving.runner,
            identity=serving.identity,
            source_factory=factory,
            modalities=serving.model.config.modalities,
            rate_hz=rate_hz,
        )
        return self._streams

    # -- use cases ----------------------------------------------------------------------------

    def clip_from_features(
        self,
        profile: str,
        features: Mapping[str, np.ndarray | Sequence[Sequence[float]]],
        masks: Mapping[str, np.ndarray | Sequence[bool]] | None = None,
    ) -> ClipFeatures:
        """Validate precomputed features against the loaded checkpoint
        (:func:`service.core.validation.clip_from_features`)."""
        return clip_from_features(
            self.config, self.settings.max_sequence_length, profile, features, masks
        )

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
            attribution: also compute the per-modality attribution.
        """
        outcome, attributed = await self._run_attributed(clip, deadline, attribution)
        timings = assembly.request_timings(
            started=started, queue_ms=outcome.queue_ms, model_ms=outcome.model_ms
        )
        assembly.record(self.metrics, timings, outcome.memory)
        summary = assembly.features_summary(transcript)
        return assembly.prediction(clip, outcome, summary, timings, self.identity, attributed)

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
            attribution: also compute the per-modality attribution.
        """
        bundle, wait_ms = await self.extract_bundle(
            path, transcript, deadline=deadline, remove_after=remove_after
        )
        clip = clip_from_bundle(bundle, self.config, self.settings.max_sequence_length)
        outcome, attributed = await self._run_attributed(clip, deadline, attribution)
        timings = assembly.request_timings(
            started=started,
            queue_ms=outcome.queue_ms,
            model_ms=outcome.model_ms,
            extraction=assembly.extraction_timings(bundle, upload_ms=upload_ms, wait_ms=wait_ms),
        )
        assembly.record(self.metrics, timings, outcome.memory)
        summary = assembly.media_summary(bundle.summary)
        return assembly.prediction(clip, outcome, summary, timings, self.identity, attributed)

    async def predict_text(
        self,
        transcript: str,
        *,
        started: float,
        deadline: float,
        upload_ms: float = 0.0,
        attribution: bool = False,
    ) -> Prediction:
        """Score a transcript alone, with no media: its text features (on the pool, as a
        transcript sent with a clip is placed) are the clip's only modality.

        Args:
            transcript: what is said (not blank).
            started: ``time.perf_counter()`` at the start of the request.
            deadline: ``time.monotonic()`` limit of the request.
            upload_ms: time spent receiving the form, reported in the timings.
            attribution: also compute the per-modality attribution.

        Raises:
            InvalidInputError: the loaded model reads no text, or the transcript has no words.
            MediaDisabledError: this server has no extractor that makes text features.
        """
        serving = self._ready_parts()
        if "text" not in self.config.modalities:
            raise InvalidInputError(
                f"the loaded model reads {list(self.config.modalities)}, not text: send a "
                "`file` to score"
            )
        if serving.pool is None:
            raise MediaDisabledError(serving.media_unavailable)
        if not serving.pool.reads_text:
            raise MediaDisabledError("this server cannot score a transcript alone: send a `file`")
        done = await _await_extraction(
            serving.pool.submit_text(transcript, deadline=deadline), deadline
        )
        if not bool(np.asarray(done.mask).any()):
            raise InvalidInputError("the transcript has no words to score")
        clip = clip_from_features(
            self.config,
            self.settings.max_sequence_length,
            self.config.feature_profile,
            {"text": done.features},
            {"text": done.mask},
        )
        outcome, attributed = await self._run_attributed(clip, deadline, attribution)
        timings = assembly.request_timings(
            started=started,
            queue_ms=outcome.queue_ms,
            model_ms=outcome.model_ms,
            extraction={"text": done.text_ms, "upload": upload_ms, "extract_wait": done.wait_ms},
        )
        assembly.record(self.metrics, timings, outcome.memory)
        summary = {**assembly.features_summary(transcript), "transcript_source": "client"}
        return assembly.prediction(clip, outcome, summary, timings, self.identity, attributed)

    async def predict_timeline(
        self,
        path: Path,
        transcript: str | None,
        *,
        started: float,
        deadline: float,
        remove_after: bool,
        upload_ms: float = 0.0,
        window_s: float = 5.0,
    ) -> TimelinePrediction:
        """Sentiment over time of a media file: segment it (utterances, and windows of
        ``window_s`` where nobody speaks), and score every segment, and the whole clip when it
        fits one model call, with its attribution, all through the micro-batcher.

        The other arguments are those of :meth:`predict_media`.
        """
        bundle, wait_ms = await self.extract_bundle(
            path, transcript, deadline=deadline, remove_after=remove_after
        )
        timeline, outcomes = await self.score_timeline(bundle, deadline, window_s=window_s)
        timings = assembly.request_timings(
            started=started,
            queue_ms=max((o.queue_ms for o in outcomes), default=0.0),
            model_ms=sum(o.model_ms / max(1, o.batch_size) for o in outcomes),
            extraction=assembly.extraction_timings(bundle, upload_ms=upload_ms, wait_ms=wait_ms),
        )
        assembly.record(self.metrics, timings, outcomes[-1].memory)
        return TimelinePrediction(
            timeline=timeline,
            modalities=assembly.media_summary(bundle.summary),
            timings_ms=timings,
            model=self.identity,
            largest_batch=max((o.batch_size for o in outcomes), default=0),
        )

    async def score_timeline(
        self,
        bundle: FeatureBundleLike,
        deadline: float,
        *,
        window_s: float = 5.0,
        whole_clip: bool = True,
        background: bool = False,
    ) -> tuple[Timeline, list[ClipOutcome]]:
        """Segment an extracted clip and score its segments (and, with ``whole_clip``, the
        whole clip when it fits one model call) through the micro-batcher.

        The one segment path of the synchronous timeline and of the job runner, which scores a
        long recording part by part with ``whole_clip=False`` and ``background=True`` (its clips
        wait behind online requests, see :meth:`MicroBatcher.submit`).
        """
        config = self.config
        clip = clip_from_bundle(bundle, config, max_steps=None)  # longer clips are cut
        plan = plan_timeline(
            clip,
            float(getattr(bundle, "rate_hz", 10.0)),
            list(getattr(bundle, "segments", []) or []),
            config.modalities,
            self.settings.max_sequence_length,
            media_duration_s=getattr(bundle.summary, "duration_s", None),
            window_s=window_s,
            whole_clip=whole_clip,
        )
        outcomes = await self.run_clips(plan.clips, deadline, background=background)
        timeline = assemble(plan, [o.result for o in outcomes if o.result is not None])
        return timeline, outcomes

    async def extract_bundle(
        self,
        path: Path,
        transcript: str | None,
        *,
        deadline: float,
        remove_after: bool,
        background: bool = False,
    ) -> tuple[FeatureBundleLike, float]:
        """Extract a media file's features on the pool, without scoring them.

        ``background`` (job work) extracts on a pool of its own (one thread per job worker,
        the same extractor), so online requests never queue behind a long recording's parts.
        Returns the bundle and the milliseconds the job waited for a pool thread. Raises the
        same domain errors as :meth:`predict_media`.
        """
        serving = self._serving
        if serving is None or serving.pool is None:
            if remove_after:
                path.unlink(missing_ok=True)
            if serving is None:
                raise NotReadyError("the model is still loading")
            raise MediaDisabledError(serving.media_unavailable)
        pool = self._job_pool(serving.pool) if background else serving.pool
        stop = threading.Event()
        job = pool.submit(path, transcript, deadline=deadline, remove_after=remove_after, stop=stop)
        try:
            done = await _await_extraction(job, deadline, stop)
        except ServiceError:
            raise
        except Exception as exc:
            if _is_preprocessing_error(exc):
                raise from_preprocessing_error(exc) from exc
            raise
        return done.bundle, done.wait_ms

    def _job_pool(self, online: ExtractionPool) -> ExtractionPool:
        with self._background_lock:
            if self._background_pool is None:
                workers = max(1, self.settings.jobs_workers)
                self._background_pool = ExtractionPool(
                    online.extractor,
                    workers,
                    niceness=self.settings.jobs_niceness,
                    on_death=fatal_reporter(self.health, "extraction_worker"),
                )
            return self._background_pool

    async def run_clips(
        self, clips: Sequence[ClipFeatures], deadline: float, *, background: bool = False
    ) -> list[ClipOutcome]:
        """Score many clips of one request through the micro-batcher, in order.

        Clips are queued ``max_batch_size`` at a time (so one request never fills the queue on
        its own); each group is batched together like concurrent requests are. ``background``
        clips (job work) wait while online clips are queued.
        """
        batcher = self._ready_parts().batcher
        outcomes: list[ClipOutcome] = []
        step = max(1, min(self.settings.max_batch_size, self.settings.max_queue_size))
        for first in range(0, len(clips), step):
            # Queued back to back, before any await, so the worker finds them together.
            futures = [
                batcher.submit(c, deadline, background=background)
                for c in clips[first : first + step]
            ]
            try:
                done = await asyncio.wait_for(
                    asyncio.gather(*(asyncio.wrap_future(f) for f in futures)),
                    _remaining(deadline),
                )
            except TimeoutError as exc:
                raise DeadlineExceededError("the deadline passed waiting for the model") from exc
            for outcome in done:
                if outcome.error is not None:
                    raise outcome.error
            outcomes.extend(done)
        return outcomes

    async def _run_attributed(
        self, clip: ClipFeatures, deadline: float, with_attribution: bool
    ) -> tuple[ClipOutcome, Attribution | None]:
        """The clip's outcome and, when asked, its attribution (the ablated copies are queued
        together with the clip, see :mod:`service.core.attribution`)."""
        if not with_attribution:
            return await self._run_model(clip, deadline), None
        plan = attribution_plan(clip, self.config.modalities)
        outcomes = await self.run_clips(plan.clips, deadline)
        results = [o.result for o in outcomes if o.result is not None]
        return outcomes[0], attribution_of(plan, results)

    async def _run_model(self, clip: ClipFeatures, deadline: float) -> ClipOutcome:
        future = self._ready_parts().batcher.submit(clip, deadline)
        try:
            outcome = await asyncio.wait_for(asyncio.wrap_future(future), _remaining(deadline))
        except TimeoutError as exc:
            raise DeadlineExceededError("the deadline passed waiting for the model") from exc
        if outcome.error is not None:
            raise outcome.error
        return outcome


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


async def _await_extraction(
    job: Future[Any], deadline: float, stop: threading.Event | None = None
) -> Any:
    """The result of an extraction pool job, waited for until ``deadline``.

    Whoever gives up on the job (deadline, cancelled request), its outcome is read by a
    callback, so an error it ends with later is not reported as never retrieved. The wait is
    shielded: a job that has not started must still run (to delete its file); one that has
    started is asked to stop through ``stop`` (it polls it and its deadline).
    """
    waited = asyncio.wrap_future(job)
    waited.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        return await asyncio.wait_for(asyncio.shield(waited), _remaining(deadline))
    except TimeoutError as exc:
        if stop is not None:
            stop.set()
        raise DeadlineExceededError("the request deadline passed during extraction") from exc
    except asyncio.CancelledError:
        if stop is not None:
            stop.set()  # the request was cancelled (its client went away)
        raise


def _is_preprocessing_error(exc: BaseException) -> bool:
    try:
        from preprocessing.errors import PreprocessingError
    except ImportError:
        return False
    return isinstance(exc, PreprocessingError)
