"""Feature extraction on a pool of CPU threads sharing one extractor.

``preprocessing.Extractor`` is safe to share between threads (its models run concurrent calls
or sit behind locks), so the pool holds one instance and ``workers`` threads.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from service.errors import DeadlineExceededError
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


class ExtractionPool:
    """One extractor served by ``workers`` threads.

    Args:
        extractor: a thread-safe extractor.
        workers: extraction threads (clips extracted at the same time).
        niceness: added to the threads' nice value (background work, e.g. jobs; 0: as is).
        metrics: where to record the queue, the busy threads, the wait, the CPU time, the file
            sizes and the clip durations (nothing when None).
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        workers: int,
        metrics: ServiceMetrics | None = None,
        *,
        niceness: int = 0,
    ) -> None:
        if workers < 1:
            raise ValueError("the extraction pool needs at least one worker")
        self.extractor = extractor
        self.workers = workers
        self.metrics = metrics
        if metrics is not None:
            metrics.extraction_workers.set(workers)
        self._executor = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="cmamba-extract-bg" if niceness else "cmamba-extract",
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

        future = self._executor.submit(job)
        if metrics is not None:

            def left_unstarted(done: Future[ExtractionJobResult]) -> None:
                if done.cancelled():  # it left the queue without running
                    metrics.extraction_queue_depth.dec()

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
            if started > deadline:
                raise DeadlineExceededError("the request deadline passed before extraction")
            begun = time.perf_counter()
            features, mask = extractor.text_features(transcript)
            text_ms = (time.perf_counter() - begun) * 1000.0
            return TextJobResult(features, mask, text_ms, (started - submitted) * 1000.0)

        return self._executor.submit(job)

    def shutdown(self) -> None:
        """Finish queued jobs and stop the threads."""
        self._executor.shutdown(wait=True)


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
