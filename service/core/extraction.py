"""Feature extraction on a pool of CPU threads sharing one extractor.

``preprocessing.Extractor`` is safe to share between threads (its models run concurrent calls
or sit behind locks), so the pool holds one instance and ``workers`` threads. The threads are
watched: one that dies (an error escapes its loop) fails the job it held and reports itself,
and the instance restarts (:mod:`service.core.health_state`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from service.errors import DeadlineExceededError, FatalServiceError
from service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)


class FeatureBundleLike(Protocol):
    """What the service reads from ``preprocessing.FeatureBundle``."""

    profile: str
    length: int
    features: Mapping[str, Any]
    masks: Mapping[str, Any]
    summary: Any
    timings_ms: Mapping[str, float]


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the service needs of ``preprocessing.Extractor``."""

    def warmup(self) -> object: ...

    def extract(self, path: Path, transcript: str | None = None) -> Any: ...


@runtime_checkable
class TextFeatureExtractor(Protocol):
    """An extractor that also scores a transcript alone (``preprocessing.Extractor`` does)."""

    def text_features(self, transcript: str) -> tuple[Any, Any]: ...


def release_frames(exc: BaseException) -> None:
    """Clear the local variables of the finished frames in ``exc``'s tracebacks (and those of
    its causes), so that decoders and resamplers they refer to are freed now, not when the
    garbage collector breaks the exception's reference cycles."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


class ExtractionJobResult:
    """A finished extraction: the bundle and how long the job waited for a free thread."""

    def __init__(self, bundle: FeatureBundleLike, wait_ms: float) -> None:
        self.bundle = bundle
        self.wait_ms = wait_ms


class TextJobResult:
    """A transcript's text features (``(L, F)`` and mask ``(L,)``) and the job's timings."""

    def __init__(self, features: Any, mask: Any, text_ms: float, wait_ms: float) -> None:
        self.features = features
        self.mask = mask
        self.text_ms = text_ms
        self.wait_ms = wait_ms


T = TypeVar("T")


@dataclass
class _Job:
    future: Future[Any]
    run: Callable[[], Any]
    discard: Callable[[], None] | None
    """Undo what the job owns (its file) when it is failed without running (a job cancelled
    while queued is the canceller's to undo)."""


class WatchedThreads:
    """``workers`` threads running jobs from one FIFO queue, like a ``ThreadPoolExecutor``
    whose threads can die: an error that is not an ``Exception`` (it escapes the job) ends its
    thread, fails the job with :class:`FatalServiceError` and calls ``on_death``.

    Args:
        workers: threads.
        name: thread name prefix.
        on_death: called on the dying thread with what ended it.
        initializer: called first on each thread (e.g. to lower its priority).
    """

    def __init__(
        self,
        workers: int,
        name: str,
        on_death: Callable[[BaseException], None] | None = None,
        *,
        initializer: Callable[[], None] | None = None,
    ) -> None:
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._initializer = initializer
        self._on_death = on_death
        self._closed = False
        self._failed: FatalServiceError | None = None
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def alive(self) -> bool:
        """Whether every thread still runs (until :meth:`shutdown`)."""
        return self._closed or all(t.is_alive() for t in self._threads)

    def submit(self, run: Callable[[], T], discard: Callable[[], None] | None = None) -> Future[T]:
        """Queue ``run``; ``discard`` is called instead when the job is failed unstarted."""
        if self._failed is not None:
            raise FatalServiceError(self._failed.message)
        if self._closed:
            raise RuntimeError("the extraction pool is stopped")
        future: Future[T] = Future()
        self._queue.put(_Job(future, run, discard))
        return future

    def fail(self, error: FatalServiceError) -> None:
        """Fail every queued job with ``error`` and refuse new ones with it."""
        self._failed = error
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self._queue.put(None)  # a stop for a thread: keep it, after the others
                return
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
                if job.discard is not None:
                    job.discard()

    def shutdown(self, wait: bool = True) -> None:
        """Run the queued jobs, then stop the threads."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _work(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                result = job.run()
            except Exception as exc:
                job.future.set_exception(exc)
            except BaseException as exc:
                # Reported first, so whoever hears of the failed job finds the instance failed.
                logger.critical("an extraction thread died: %s: %s", type(exc).__name__, exc)
                if self._on_death is not None:
                    self._on_death(exc)
                job.future.set_exception(
                    FatalServiceError("an extraction thread stopped (the instance restarts)")
                )
                return
            else:
                job.future.set_result(result)
            del job


class ExtractionPool:
    """One extractor served by ``workers`` threads.

    Args:
        extractor: a thread-safe extractor.
        workers: extraction threads (clips extracted at the same time).
        niceness: added to the threads' nice value (background work, e.g. jobs; 0: as is).
        metrics: where to record the queue, the busy threads, the wait, the CPU time, the file
            sizes and the clip durations (nothing when None).
        on_death: called with what ended an extraction thread that died.
        before_job: called first in each job (fault injection in tests).
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        workers: int,
        metrics: ServiceMetrics | None = None,
        *,
        niceness: int = 0,
        on_death: Callable[[BaseException], None] | None = None,
        before_job: Callable[[], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("the extraction pool needs at least one worker")
        self.extractor = extractor
        self.workers = workers
        self.metrics = metrics
        if metrics is not None:
            metrics.extraction_workers.set(workers)
        self._before_job = before_job
        self._executor = WatchedThreads(
            workers,
            "cmamba-extract-bg" if niceness else "cmamba-extract",
            on_death,
            initializer=functools.partial(_lower_priority, niceness) if niceness else None,
        )
        # preprocessing.Extractor stops when asked; an extractor without the keyword runs on.
        self._stoppable = "should_stop" in inspect.signature(extractor.extract).parameters

    def warmup(self) -> None:
        """Load the extractor's models and compile its JIT paths (on a pool thread)."""
        started = time.perf_counter()
        self._executor.submit(self.extractor.warmup).result()
        if self.metrics is not None:
            self.metrics.extractor_warmup_seconds.set(time.perf_counter() - started)

    def submit(
        self,
        path: Path,
        transcript: str | None,
        *,
        deadline: float,
        remove_after: bool,
        stop: threading.Event | None = None,
    ) -> Future[ExtractionJobResult]:
        """Queue the extraction of ``path``.

        The job owns the file when ``remove_after`` is set: it deletes it once done, whatever
        happens, also when it starts after ``deadline`` and skips the work. The extraction
        stops early (``ExtractionStoppedError``) once ``deadline`` passes or ``stop`` is set:
        nobody waits for its answer then.
        """
        submitted = time.monotonic()
        metrics = self.metrics
        if metrics is not None:
            with contextlib.suppress(OSError):  # the extraction says what is wrong with it
                metrics.upload_bytes.observe(path.stat().st_size)
            metrics.extraction_queue_depth.inc()

        def should_stop() -> bool:
            return time.monotonic() > deadline or (stop is not None and stop.is_set())

        def job() -> ExtractionJobResult:
            started = time.monotonic()
            cpu_started = time.thread_time()
            if metrics is not None:
                metrics.extraction_queue_depth.dec()
                metrics.extraction_busy_workers.inc()
                metrics.extraction_wait.observe(started - submitted)
            try:
                if self._before_job is not None:
                    self._before_job()
                if should_stop():
                    raise DeadlineExceededError("the request deadline passed before extraction")
                if self._stoppable:
                    stoppable: Any = self.extractor
                    bundle = stoppable.extract(path, transcript=transcript, should_stop=should_stop)
                else:
                    bundle = self.extractor.extract(path, transcript=transcript)
                if metrics is not None:
                    _observe_clip(metrics, bundle)
                return ExtractionJobResult(bundle, (started - submitted) * 1000.0)
            except BaseException as exc:
                release_frames(exc)
                raise
            finally:
                if remove_after:
                    path.unlink(missing_ok=True)
                if metrics is not None:
                    metrics.extraction_busy_workers.dec()
                    cpu = time.thread_time() - cpu_started
                    metrics.stage_cpu.labels(stage="extraction").inc(cpu)

        def discard() -> None:  # it left the queue without running
            if metrics is not None:
                metrics.extraction_queue_depth.dec()
            if remove_after:
                path.unlink(missing_ok=True)

        def left_unstarted(done: Future[ExtractionJobResult]) -> None:
            if done.cancelled():
                discard()

        future = self._executor.submit(job, discard)
        future.add_done_callback(left_unstarted)
        return future

    @property
    def reads_text(self) -> bool:
        """Whether the extractor turns a transcript alone into text features."""
        return isinstance(self.extractor, TextFeatureExtractor)

    def submit_text(self, transcript: str, *, deadline: float) -> Future[TextJobResult]:
        """Queue the text features of ``transcript`` (see :attr:`reads_text`); a job that
        starts after ``deadline`` skips the work."""
        submitted = time.monotonic()
        extractor: Any = self.extractor

        def job() -> TextJobResult:
            started = time.monotonic()
            if self._before_job is not None:
                self._before_job()
            if started > deadline:
                raise DeadlineExceededError("the request deadline passed before extraction")
            begun = time.perf_counter()
            features, mask = extractor.text_features(transcript)
            text_ms = (time.perf_counter() - begun) * 1000.0
            return TextJobResult(features, mask, text_ms, (started - submitted) * 1000.0)

        return self._executor.submit(job)

    @property
    def alive(self) -> bool:
        """Whether every extraction thread still runs."""
        return self._executor.alive

    def fail(self, error: FatalServiceError) -> None:
        """Fail the queued jobs with ``error`` (their files removed) and refuse new ones."""
        self._executor.fail(error)

    def shutdown(self, wait: bool = True) -> None:
        """Finish queued jobs and stop the threads (``wait``: until they have stopped)."""
        self._executor.shutdown(wait=wait)


def _lower_priority(niceness: int) -> None:
    """Raise the calling thread's nice value (Linux: per thread, inherited by the threads it
    starts), so the scheduler prefers the other threads when the CPUs are busy."""
    with contextlib.suppress(AttributeError, OSError):
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + niceness))


def _observe_clip(metrics: ServiceMetrics, bundle: FeatureBundleLike) -> None:
    """Record the duration of the extracted clip (``summary.duration_s``, when it has one)."""
    duration = getattr(bundle.summary, "duration_s", None)
    if isinstance(duration, int | float) and duration > 0:
        metrics.clip_seconds.observe(float(duration))
