"""Feature extraction on a pool of CPU threads, one extractor instance per thread.

An extractor holds models (ASR, text encoder, face mesh) that are not safe to share between
threads, so each pool thread borrows its own instance for the length of one job.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from service.errors import DeadlineExceededError

logger = logging.getLogger(__name__)


class FeatureBundleLike(Protocol):
    """What the service reads from ``preprocessing.FeatureBundle``."""

    profile: str
    length: int
    features: Mapping[str, Any]
    masks: Mapping[str, Any]
    summary: Mapping[str, Any]
    timings_ms: Mapping[str, float]


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the service needs of ``preprocessing.Extractor``."""

    def warmup(self) -> None: ...

    def extract(self, path: str | os.PathLike[str], transcript: str | None = None) -> Any: ...


ExtractorFactory = Callable[[Sequence[str]], FeatureExtractor]
"""Builds an extractor for the given modalities."""


class ExtractionJobResult:
    """A finished extraction: the bundle and how long the job waited for a free thread."""

    def __init__(self, bundle: FeatureBundleLike, wait_ms: float) -> None:
        self.bundle = bundle
        self.wait_ms = wait_ms


class ExtractionPool:
    """A fixed set of extractors served by as many threads.

    Args:
        extractors: ready-made extractor instances; one thread per instance.
    """

    def __init__(self, extractors: Sequence[FeatureExtractor]) -> None:
        if not extractors:
            raise ValueError("the extraction pool needs at least one extractor")
        self._free: queue.SimpleQueue[FeatureExtractor] = queue.SimpleQueue()
        for extractor in extractors:
            self._free.put(extractor)
        self._extractors = list(extractors)
        self._executor = ThreadPoolExecutor(
            max_workers=len(extractors), thread_name_prefix="cmamba-extract"
        )

    @property
    def size(self) -> int:
        return len(self._extractors)

    def warmup(self) -> None:
        """Warm every extractor (model loading, JIT), in parallel on the pool's threads."""
        jobs = [self._executor.submit(extractor.warmup) for extractor in self._extractors]
        for job in jobs:
            job.result()

    def submit(
        self,
        path: Path,
        transcript: str | None,
        *,
        deadline: float,
        remove_after: bool,
    ) -> Future[ExtractionJobResult]:
        """Queue the extraction of ``path``.

        The job owns the file when ``remove_after`` is set: it deletes it once done, whatever
        happens, also when it starts after ``deadline`` and skips the work.
        """
        submitted = time.monotonic()

        def job() -> ExtractionJobResult:
            try:
                started = time.monotonic()
                if started > deadline:
                    raise DeadlineExceededError("the request deadline passed before extraction")
                extractor = self._free.get()
                try:
                    bundle = extractor.extract(path, transcript=transcript)
                finally:
                    self._free.put(extractor)
                return ExtractionJobResult(bundle, (started - submitted) * 1000.0)
            finally:
                if remove_after:
                    path.unlink(missing_ok=True)

        return self._executor.submit(job)

    def shutdown(self) -> None:
        """Finish queued jobs and stop the threads."""
        self._executor.shutdown(wait=True)
