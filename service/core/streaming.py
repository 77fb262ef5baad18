"""Live streams: incremental features, one batched model step per tick, a running answer.

A :class:`StreamSession` is one live stream: the media its client has sent and not yet
processed, its live feature source (``preprocessing.live.LiveExtractor``, one per stream), its
model state (conv and coupled-scan state and running pooling statistics: ``model.streaming``,
a fixed size whatever the stream's length) and its running answer.

The :class:`StreamHub` runs every stream. Each tick it starts the feature work of the streams
whose next update is due (on its own threads, at most one job per stream at a time), and runs
ONE batched model step, on the model worker through ``ModelRunner.step_streams``, for every
stream whose new rows are ready. Each stream then gets an update on its ``outbox``; a stream
that stops gets a final answer in the shape of ``/v1/predict``'s. When a stream falls behind
real time its video frames are dropped (never its audio). The transport (``WS /v1/stream``,
:mod:`service.api.stream`) only translates messages to these calls and events to messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from service.core import assembly
from service.core.types import (
    ClipFeatures,
    ClipOutcome,
    ClipResult,
    MemorySnapshot,
    ModelIdentity,
    Prediction,
    StreamRows,
    StreamStep,
    StreamStepOutcome,
)
from service.errors import (
    DrainingError,
    ServiceError,
    StreamProtocolError,
    TooManyStreamsError,
)
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

if TYPE_CHECKING:
    from service.core.batcher import MicroBatcher
    from service.core.runner import ModelRunner

logger = logging.getLogger(__name__)

END_REASONS = ("stop", "max_duration", "idle", "draining")
"""Why a stream that ends with a final answer ended (docs/STREAMING.md)."""

MAX_FRAME_SIDE = 1920
MAX_FRAME_OTHER_SIDE = 1080


# -- what the hub needs of the live feature source (preprocessing.live) ---------------------------


class LiveRowsLike(Protocol):
    """What the hub reads of ``preprocessing.live.LiveRows``."""

    @property
    def start(self) -> int: ...

    @property
    def features(self) -> Mapping[str, np.ndarray]: ...

    @property
    def masks(self) -> Mapping[str, np.ndarray]: ...

    @property
    def words(self) -> Sequence[Any]: ...

    @property
    def dropped_frames(self) -> int: ...

    @property
    def provisional(self) -> LiveRowsLike | None:
        """The steps after these up to the audio received, not final (``ready`` only)."""
        ...


class LiveSource(Protocol):
    """What the hub needs of ``preprocessing.live.LiveExtractor`` (one per stream)."""

    def push_audio(self, samples: np.ndarray) -> None: ...

    def push_frame(self, rgb: np.ndarray, time_s: float) -> None: ...

    def ready(self) -> LiveRowsLike: ...

    def finish(self) -> LiveRowsLike: ...

    def close(self) -> None:
        """Release what the stream holds (its recognition thread); may wait for work under way,
        so the hub calls it on a hub thread. Harmless after ``finish``."""
        ...

    @property
    def words(self) -> Sequence[Any]: ...


@dataclass(frozen=True)
class StreamOptions:
    """A stream's start message, validated (docs/STREAMING.md)."""

    sample_rate: int
    audio_format: str = "f32le"
    video: bool = False
    update_interval_s: float = 1.0
    transcript_hint: str | None = None


LiveSourceFactory = Callable[[StreamOptions], LiveSource]
"""Builds a stream's live feature source; may be slow (called on a hub thread)."""


def live_extractor_factory(extractor: Any) -> LiveSourceFactory:
    """The real source: ``preprocessing.live.LiveExtractor`` over the server's extractor."""
    from preprocessing.live import LiveExtractor

    def build(options: StreamOptions) -> LiveSource:
        source: LiveSource = LiveExtractor(
            extractor, sample_rate=options.sample_rate, transcript_hint=options.transcript_hint
        )
        return source

    return build


# -- events a session hands to its transport -------------------------------------------------------


@dataclass(frozen=True)
class StreamWord:
    text: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class StreamUpdate:
    """The running answer after an update interval."""

    seq: int
    stream_time_s: float
    received_s: float
    result: ClipResult
    words: list[StreamWord]
    words_total: int
    active: tuple[str, ...]
    latency_ms: float
    lag_s: float
    dropped_frames: int
    committed_time_s: float = 0.0
    """stream time of the final rows (the committed model state); ``stream_time_s`` adds the
    provisional tail"""

    @property
    def provisional_s(self) -> float:
        """Seconds of the answer's stream time scored from provisional rows."""
        return max(0.0, self.stream_time_s - self.committed_time_s)

    @property
    def committed_lag_s(self) -> float:
        """The lag of the committed answer alone (``received_s - committed_time_s``)."""
        return max(0.0, self.received_s - self.committed_time_s)


@dataclass(frozen=True)
class StreamFinal:
    """The last message of a stream that ended normally; ``prediction`` is None when no grid
    row was ever scored."""

    reason: str
    stream_time_s: float
    words_total: int
    dropped_frames: int
    prediction: Prediction | None


@dataclass(frozen=True)
class StreamFailed:
    """The stream ends on an error (no final answer)."""

    error: ServiceError


StreamEvent = StreamUpdate | StreamFinal | StreamFailed


# -- one stream ------------------------------------------------------------------------------------


@dataclass
class _Extracted:
    rows: StreamRows
    provisional: StreamRows | None  # the steps after ``rows`` up to the audio received
    words: list[StreamWord]
    dropped_frames: int
    started: float  # perf_counter when the feature job started
    extract_ms: float
    final: bool  # the source's finish(): the stream's last rows


@dataclass
class _Pending:
    audio: list[np.ndarray] = field(default_factory=list)
    frames: list[tuple[bytes, float]] = field(default_factory=list)


class StreamSession:
    """One live stream. The transport calls ``push_*`` and ``request_stop`` from the event loop
    and reads :attr:`outbox`; the hub does the rest."""

    def __init__(
        self,
        hub: StreamHub,
        options: StreamOptions,
        source: LiveSource,
        state: Any,
        modalities: Sequence[str],
    ) -> None:
        self.id = uuid.uuid4().hex
        self.options = options
        self.outbox: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._hub = hub
        self._source = source
        self._state = state  # model.streaming.StreamState, read only on the model worker
        self._modalities = tuple(modalities)
        self._lock = threading.Lock()  # guards _pending between the loop and a hub thread
        self._pending = _Pending()
        self.received_samples = 0
        self.rows_scored = 0
        self.frames_received = 0
        self.dropped_total = 0
        self._dropped_since_update = 0
        self.words_total = 0
        self.seq = 0
        self.stop_reason: str | None = None
        self.ended = False
        self._busy = False  # a feature job or a model step is under way
        self._extract_from_s = 0.0  # received_s when the last feature job started
        self._last_frame_s = float("-inf")
        self.extracted: _Extracted | None = None
        self.failure: ServiceError | None = None
        self.result: ClipResult | None = None
        self.used: tuple[str, ...] = ()
        self.extract_ms_total = 0.0
        self.model_ms_total = 0.0
        self.started = time.perf_counter()

    # -- clock --------------------------------------------------------------------------------

    @property
    def received_s(self) -> float:
        """Seconds of audio received (the stream's clock)."""
        return self.received_samples / self.options.sample_rate

    @property
    def stream_time_s(self) -> float:
        """Stream time the running answer covers."""
        return self.rows_scored / self._hub.rate_hz

    @property
    def lag_s(self) -> float:
        """Audio received but not yet scored by the committed state, in seconds (includes the
        live features' own delay: rows wait for speech recognition). An update's ``lag_s``
        also counts its provisional rows as scored (:meth:`apply`)."""
        return max(0.0, self.received_s - self.stream_time_s)

    @property
    def queued_s(self) -> float:
        """Audio received and not yet handed to the live features, in seconds: how far the
        server is behind the stream (what decides dropping video frames)."""
        return max(0.0, self.received_s - self._extract_from_s)

    # -- input (event loop) -------------------------------------------------------------------

    def push_audio(self, samples: np.ndarray) -> None:
        """Queue mono float32 samples; past ``stream_max_duration_s`` the stream stops."""
        if self.stop_reason is not None or self.ended:
            return
        limit = int(self._hub.settings.stream_max_duration_s * self.options.sample_rate)
        room = limit - self.received_samples
        if room <= 0:
            self.request_stop("max_duration")
            return
        samples = samples[:room]
        with self._lock:
            self._pending.audio.append(samples)
        self.received_samples += len(samples)
        if self.received_samples >= limit:
            self.request_stop("max_duration")
        self._hub.wake()

    def push_frame(self, jpeg: bytes, time_s: float) -> None:
        """Queue a JPEG frame (decoded on a hub thread), or drop it when the stream is behind.

        Raises:
            StreamProtocolError: video was not announced, or the frame goes back in time.
        """
        if not self.options.video:
            raise StreamProtocolError("a video frame on a stream that announced no video")
        if time_s < self._last_frame_s:
            raise StreamProtocolError(
                f"video frames must come in time order ({time_s:.3f} s after "
                f"{self._last_frame_s:.3f} s)"
            )
        self._last_frame_s = time_s
        if self.stop_reason is not None or self.ended:
            return
        self.frames_received += 1
        if self.queued_s > self._hub.settings.stream_drop_video_lag_s:
            self._count_dropped(1)
            return
        with self._lock:
            self._pending.frames.append((jpeg, time_s))

    def request_stop(self, reason: str) -> None:
        """End the stream with a final answer once everything received is scored."""
        if reason not in END_REASONS:
            raise ValueError(f"unknown end reason {reason!r}")
        if self.stop_reason is None and not self.ended:
            self.stop_reason = reason
            self._hub.wake()

    def abort(self) -> None:
        """The client went away: end now, without a final answer."""
        self._hub.forget(self)

    def _count_dropped(self, n: int) -> None:
        if n > 0:
            self.dropped_total += n
            self._dropped_since_update += n
            self._hub.metrics.stream_dropped_frames.inc(n)

    # -- hub side -----------------------------------------------------------------------------

    def due(self) -> bool:
        """Time to start a feature job: an update interval of new audio, or stopping."""
        if self._busy or self.ended or self.extracted is not None or self.failure is not None:
            return False
        if self.stop_reason is not None:
            return True
        return self.received_s - self._extract_from_s >= self.options.update_interval_s

    def extract(self) -> _Extracted:
        """Hand the queued media to the source and take the rows now final (a hub thread)."""
        started = time.perf_counter()
        final = self.stop_reason is not None
        with self._lock:
            pending, self._pending = self._pending, _Pending()
        try:
            for samples in pending.audio:
                self._source.push_audio(samples)
            for jpeg, time_s in pending.frames:
                self._source.push_frame(decode_jpeg(jpeg), time_s)
            rows = self._source.finish() if final else self._source.ready()
        except ServiceError:
            raise
        except Exception as exc:
            if _is_preprocessing_error(exc):
                raise StreamProtocolError(str(exc)) from exc
            raise
        committed = _stream_rows(rows)
        features, masks, length = committed.features, committed.masks, committed.length
        if rows.start != self.rows_scored:
            raise RuntimeError(f"live rows start at {rows.start}, expected {self.rows_scored}")
        words = [StreamWord(str(w.text), float(w.start_s), float(w.end_s)) for w in rows.words]
        preview = None if final else rows.provisional
        provisional = None
        if preview is not None and preview.start == rows.start + length:
            provisional = _stream_rows(preview)
            if not provisional.length:
                provisional = None
        return _Extracted(
            rows=StreamRows(features=features, masks=masks, length=length),
            provisional=provisional,
            words=words,
            dropped_frames=int(rows.dropped_frames),
            started=started,
            extract_ms=(time.perf_counter() - started) * 1000.0,
            final=final,
        )

    def close_source(self) -> None:
        """Release the live source (a hub thread; never raises)."""
        try:
            self._source.close()
        except Exception:
            logger.exception("closing live stream %s failed", self.id)

    def start_job(self) -> None:
        self._busy = True
        self._extract_from_s = self.received_s

    def job_done(self) -> None:
        self._busy = False

    @property
    def busy(self) -> bool:
        return self._busy

    def step_input(self) -> StreamStep:
        assert self.extracted is not None
        return StreamStep(state=self._state, rows=self.extracted.rows)

    def provisional_input(self, committed: StreamStepOutcome | None) -> StreamStep | None:
        """The provisional step after the committed one (the model worker): the provisional
        rows from the committed state (``committed``'s new state, else the current one). The
        step is functional, so that state is left as it is; None: nothing to preview."""
        extracted = self.extracted
        if extracted is None or extracted.provisional is None:
            return None
        if committed is None:
            return StreamStep(state=self._state, rows=extracted.provisional)
        if committed.error is not None or committed.result is None:
            return None
        return StreamStep(state=committed.state, rows=extracted.provisional)

    def apply(
        self, outcome: StreamStepOutcome | None, preview: StreamStepOutcome | None = None
    ) -> StreamEvent | None:
        """Take the model step's outcome (None: no rows to score) and the provisional step's
        (None: none; its state is discarded) and make the event to send: an update, the final
        answer, or nothing (no new rows)."""
        extracted = self.extracted
        assert extracted is not None
        self.extracted = None
        self._count_dropped(extracted.dropped_frames)
        self.extract_ms_total += extracted.extract_ms
        if outcome is not None:
            self.model_ms_total += outcome.model_ms
            if outcome.error is not None or outcome.result is None:
                error = outcome.error
                raise error if isinstance(error, ServiceError) else RuntimeError(str(error))
            self._state = outcome.state
            self.result = outcome.result
            self.used = outcome.used
            self.rows_scored += extracted.rows.length
        self.words_total += len(extracted.words)
        if extracted.final:
            return self._final()
        result, used, covered_s = self.result, self.used, self.stream_time_s
        if (
            preview is not None
            and preview.error is None
            and preview.result is not None
            and extracted.provisional is not None
        ):
            result, used = preview.result, preview.used
            covered_s += extracted.provisional.length / self._hub.rate_hz
        elif outcome is None:
            return None
        if result is None:
            return None
        self.seq += 1
        dropped, self._dropped_since_update = self._dropped_since_update, 0
        received_s = self.received_s
        return StreamUpdate(
            seq=self.seq,
            stream_time_s=covered_s,
            received_s=received_s,
            result=result,
            words=extracted.words,
            words_total=self.words_total,
            active=used,
            latency_ms=(time.perf_counter() - extracted.started) * 1000.0,
            lag_s=max(0.0, received_s - covered_s),
            dropped_frames=dropped,
            committed_time_s=self.stream_time_s,
        )

    def _final(self) -> StreamFinal:
        assert self.stop_reason is not None
        prediction = None
        if self.result is not None:
            words = self._source.words
            transcript = " ".join(str(w.text) for w in words) if words else None
            summary = {
                "transcript": transcript,
                "audio_seconds": round(self.received_s, 3),
                "frames": self.frames_received,
                "frames_with_face": None,
            }
            timings = dict.fromkeys(assembly.MEDIA_STAGES, 0.0)
            timings["live_features"] = self.extract_ms_total
            timings["queue"] = 0.0
            timings["model"] = self.model_ms_total
            timings["total"] = (time.perf_counter() - self.started) * 1000.0
            # The clip is summarised by which modalities were valid anywhere: that and the
            # number of steps are all an answer reads of it.
            used = {m: np.array([m in self.used]) for m in self._modalities}
            outcome = ClipOutcome(
                result=self.result,
                error=None,
                model_ms=self.model_ms_total,
                batch_size=1,
                padded_length=self.rows_scored,
                memory=self._hub.memory_snapshot(),
            )
            prediction = assembly.prediction(
                ClipFeatures(features={}, masks=used, length=self.rows_scored),
                outcome,
                summary,
                timings,
                self._hub.identity,
            )
        return StreamFinal(
            reason=self.stop_reason,
            stream_time_s=self.stream_time_s,
            words_total=self.words_total,
            dropped_frames=self.dropped_total,
            prediction=prediction,
        )


# -- all streams -----------------------------------------------------------------------------------


class StreamHub:
    """Every live stream of the server, and the tick loop that serves them.

    Args:
        settings: the service settings (``stream_*``).
        metrics: where to record active streams, updates, lag, latency and dropped frames.
        batcher: the model worker (steps run there, like every other model call).
        runner: the model runner (its ``step_streams`` runs on the worker).
        identity: the model's identity, for final answers.
        source_factory: builds each stream's live feature source.
        modalities: the checkpoint's modalities.
        rate_hz: the feature grid's rate.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        metrics: ServiceMetrics,
        *,
        batcher: MicroBatcher,
        runner: ModelRunner,
        identity: ModelIdentity,
        source_factory: LiveSourceFactory,
        modalities: Sequence[str],
        rate_hz: float = 10.0,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.identity = identity
        self.rate_hz = rate_hz
        self._batcher = batcher
        self._runner = runner
        self._factory = source_factory
        self._modalities = tuple(modalities)
        self._sessions: dict[str, StreamSession] = {}
        self._opening = 0
        self._draining = False
        self._executor = ThreadPoolExecutor(
            max_workers=settings.stream_extract_workers, thread_name_prefix="cmamba-live"
        )
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed: ServiceError | None = None

    # -- streams ------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self._sessions)

    async def open(self, options: StreamOptions) -> StreamSession:
        """Start a stream.

        Raises:
            DrainingError: the server is shutting down.
            TooManyStreamsError: ``stream_max_streams`` streams are open.
            StreamProtocolError: the source refuses the options.
        """
        if self._failed is not None:
            raise self._failed
        if self._draining:
            raise DrainingError("the server is shutting down")
        limit = self.settings.stream_max_streams
        if self.active + self._opening >= limit:
            self.metrics.rejected.labels(reason="streams").inc()
            raise TooManyStreamsError(f"{limit} live streams are open; try again later")
        self._opening += 1
        loop = self._loop = asyncio.get_running_loop()
        try:
            source = await loop.run_in_executor(self._executor, self._build_source, options)
            state = await asyncio.wrap_future(self._batcher.call(self._runner.new_stream_state))
        finally:
            self._opening -= 1
        if self._draining:
            raise DrainingError("the server is shutting down")
        session = StreamSession(self, options, source, state, self._modalities)
        self._sessions[session.id] = session
        self._idle.clear()
        self.metrics.stream_active.set(self.active)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cmamba-stream-hub")
        return session

    def _build_source(self, options: StreamOptions) -> LiveSource:
        try:
            return self._factory(options)
        except Exception as exc:
            if _is_preprocessing_error(exc):
                raise StreamProtocolError(str(exc)) from exc
            raise

    def forget(self, session: StreamSession, reason: str = "aborted") -> None:
        """Remove a stream (ended, failed or abandoned)."""
        if self._sessions.pop(session.id, None) is not None:
            session.ended = True
            self.metrics.stream_ended.labels(reason=reason).inc()
            self.metrics.stream_active.set(self.active)
            self._close_source(session)
        if not self._sessions:
            self._idle.set()

    def _close_source(self, session: StreamSession) -> None:
        """Close an ended stream's source on a hub thread: it may wait for a recognition pass
        under way, which the event loop must not."""
        try:
            self._executor.submit(session.close_source)
        except RuntimeError:  # the pool is shut down (the server stops): close here
            session.close_source()

    def wake(self) -> None:
        self._wake.set()

    def memory_snapshot(self) -> MemorySnapshot:
        return self._runner.memory_snapshot()

    # -- drain --------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Take no new stream; end every open stream with a final answer."""
        self._draining = True
        for session in list(self._sessions.values()):
            session.request_stop("draining")

    async def wait_closed(self, timeout: float) -> bool:
        """Wait until no stream is open; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def fail_all(self, error: ServiceError) -> None:
        """End every open stream with ``error`` and open no new one (the instance is broken and
        restarts). Thread-safe: called on whichever thread reported the failure."""
        self._failed = error
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing is open

            def fail_every() -> None:
                for session in list(self._sessions.values()):
                    self._fail(session, error)

            loop.call_soon_threadsafe(fail_every)

    def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the tick loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.stream_tick_s)
            self._wake.clear()
            try:
                for session in list(self._sessions.values()):
                    if session.due():
                        session.start_job()
                        job = loop.run_in_executor(self._executor, session.extract)
                        job.add_done_callback(functools.partial(self._extracted, session))
                ready = [s for s in self._sessions.values() if s.extracted is not None]
                if ready:
                    await self._step(ready)
            except Exception:  # never let one bad tick stop every stream
                logger.exception("stream hub tick failed")

    def _extracted(self, session: StreamSession, job: asyncio.Future[_Extracted]) -> None:
        if job.cancelled():
            return
        error = job.exception()
        if error is None:
            session.extracted = job.result()
        else:
            self._fail(session, error)
        self.wake()

    async def _step(self, sessions: list[StreamSession]) -> None:
        """ONE batched model step for every stream with new rows, then ONE batched provisional
        step for every stream with provisional rows (one trip to the model worker), then their
        events."""
        with_rows = [s for s in sessions if s.extracted is not None and s.extracted.rows.length]
        previews = [
            s for s in sessions if s.extracted is not None and s.extracted.provisional is not None
        ]
        outcomes: dict[str, StreamStepOutcome] = {}
        provisional: dict[str, StreamStepOutcome] = {}
        if with_rows or previews:
            try:
                outcomes, provisional = await asyncio.wrap_future(
                    self._batcher.call(functools.partial(self._model_steps, with_rows, previews))
                )
            except Exception as exc:
                for session in {s.id: s for s in with_rows + previews}.values():
                    self._fail(session, exc)
                return
        for session in sessions:
            if session.ended:
                continue
            try:
                event = session.apply(outcomes.get(session.id), provisional.get(session.id))
            except Exception as exc:
                self._fail(session, exc)
                continue
            session.job_done()
            if event is None:
                continue
            session.outbox.put_nowait(event)
            if isinstance(event, StreamUpdate):
                self.metrics.stream_updates.inc()
                self.metrics.stream_lag.observe(event.lag_s)
                self.metrics.stream_update_latency.observe(event.latency_ms / 1000.0)
            elif isinstance(event, StreamFinal):
                self.forget(session, event.reason)

    def _model_steps(
        self, with_rows: list[StreamSession], previews: list[StreamSession]
    ) -> tuple[dict[str, StreamStepOutcome], dict[str, StreamStepOutcome]]:
        """On the model worker: the committed step, then the provisional step from its states
        (a failed provisional step only leaves that update without its preview)."""
        done = self._runner.step_streams([s.step_input() for s in with_rows])
        outcomes = {s.id: o for s, o in zip(with_rows, done, strict=True)}
        owners: list[StreamSession] = []
        steps: list[StreamStep] = []
        for session in previews:
            step = session.provisional_input(outcomes.get(session.id))
            if step is not None:
                owners.append(session)
                steps.append(step)
        tails = self._runner.step_streams(steps) if steps else []
        return outcomes, {s.id: o for s, o in zip(owners, tails, strict=True)}

    def _fail(self, session: StreamSession, error: BaseException) -> None:
        if session.ended:
            return
        if not isinstance(error, ServiceError):
            logger.error("live stream %s failed", session.id, exc_info=error)
            error = ServiceError("internal error in the live stream")
        session.outbox.put_nowait(StreamFailed(error))
        self.forget(session, "error")


def _stream_rows(rows: LiveRowsLike) -> StreamRows:
    features = {m: np.asarray(rows.features[m], dtype=np.float32) for m in rows.features}
    masks = {m: np.asarray(rows.masks[m], dtype=np.bool_) for m in rows.masks}
    return StreamRows(
        features=features, masks=masks, length=next((len(k) for k in masks.values()), 0)
    )


def decode_jpeg(data: bytes) -> np.ndarray:
    """A JPEG frame as (h, w, 3) uint8 RGB; its size is read from its header before decoding.

    Raises:
        StreamProtocolError: not a JPEG, larger than 1920x1080 (either orientation), or
            undecodable.
    """
    width, height = jpeg_size(data)
    if max(width, height) > MAX_FRAME_SIDE or min(width, height) > MAX_FRAME_OTHER_SIDE:
        raise StreamProtocolError(
            f"a {width}x{height} video frame is larger than {MAX_FRAME_SIDE}x{MAX_FRAME_OTHER_SIDE}"
        )
    import cv2

    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        raise StreamProtocolError("a video frame is not a decodable JPEG image")
    return np.ascontiguousarray(image[:, :, ::-1])  # BGR -> RGB


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header, reading markers only (bounded by the data).

    Raises:
        StreamProtocolError: no JPEG start marker or no frame header.
    """
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise StreamProtocolError("a video frame is not a JPEG image (no SOI marker)")
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            break
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            at += 2
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _SOF_MARKERS:
            if at + 9 > len(data) or length < 7:
                break
            height = int.from_bytes(data[at + 5 : at + 7], "big")
            width = int.from_bytes(data[at + 7 : at + 9], "big")
            if width == 0 or height == 0:
                break
            return width, height
        if marker == 0xDA or length < 2:  # scan data before any frame header
            break
        at += 2 + length
    raise StreamProtocolError("a video frame is not a JPEG image (no frame header)")


def _is_preprocessing_error(exc: BaseException) -> bool:
    try:
        from preprocessing.errors import PreprocessingError
    except ImportError:
        return False
    return isinstance(exc, PreprocessingError)
