"""The job runner: background workers that turn queued recordings into timelines, part by part.

Each worker (``jobs_workers`` per process, tasks on the app's event loop) claims a job from the
store, cuts its recording into parts of about ``jobs_part_s`` seconds
(:mod:`preprocessing.parts`), and for each part not stored yet: copies it to a small file,
extracts it on the extraction pool, scores its segments through the micro-batcher as background
work (:meth:`InferenceCore.score_timeline`, the synchronous timeline's own segment code), and
stores the part's scored segments (``add_segment``) and the progress. A process killed mid-job
loses at most the part it was on: once the job's lease runs out another start (or replica)
claims it and skips the parts already stored. Memory stays that of one part.

While a job runs its lease is renewed every third of ``jobs_lease_s``; a renewal or a store
write refused (the job was cancelled or deleted, or the lease was lost) stops the job after the
current step. Draining (SIGTERM) stops claiming and lets the current part finish and be stored;
the job is then released (``QUEUED`` again, its parts kept), so the next start, here or in
another replica, resumes it at once.

Each worker holds its leases under an owner name of its own (the process's name and the
worker's number): when a lease lapses and another worker of the same process claims the job,
the first one's writes are refused like those of any other stale runner. A job claimed more
than ``jobs_max_attempts`` times (its parts keep killing the process) fails instead of running
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from service.core import assembly
from service.core.engine import InferenceCore
from service.core.timeline import segment_record, shifted
from service.errors import (
    DeadlineExceededError,
    MediaTooLongForJobError,
    ServiceError,
    UndecodableMediaError,
    from_preprocessing_error,
)
from service.jobs.store import JobRecord, JobState, JobStore, utc_now
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

FinishedHook = Callable[[JobRecord], Awaitable[None]]
"""Called with a job's record once it has ended (the callback sender)."""


def process_owner() -> str:
    """A name unique to this process: host, pid and a random tag (the prefix of its workers'
    lease owner names, :func:`worker_owner`)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def worker_owner(process: str, worker: int) -> str:
    """The lease owner name of worker ``worker`` of the process named ``process``."""
    return f"{process}/w{worker}"


class _LeaseLost(Exception):
    """The job is no longer this runner's (cancelled, deleted, or its lease was taken)."""


class _Drained(Exception):
    """The process drains: the job is released for the next start."""


class JobRunner:
    """The background job workers of one process.

    Args:
        store: the job store.
        core: the inference core (extraction pool and micro-batcher).
        settings: ``jobs_*`` settings.
        metrics: where job durations, queue waits and media seconds go.
        on_finished: awaited with each job's final record (callbacks).
        owner: this process's name, the prefix of its workers' lease owner names.
    """

    def __init__(
        self,
        store: JobStore,
        core: InferenceCore,
        settings: ServiceSettings,
        metrics: ServiceMetrics,
        *,
        on_finished: FinishedHook | None = None,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.core = core
        self.settings = settings
        self.metrics = metrics
        self.owner = owner or process_owner()
        self._on_finished = on_finished
        self._draining = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.running: dict[str, int] = {}  # job id -> part index being worked on

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers (on the running event loop)."""
        for n in range(self.settings.jobs_workers):
            owner = worker_owner(self.owner, n)
            self._tasks.append(
                asyncio.create_task(self._work(owner), name=f"cmamba-job-worker-{n}")
            )

    def wake(self) -> None:
        """A job was queued: an idle worker looks now instead of at its next poll."""
        self._wake.set()

    def begin_drain(self) -> None:
        """Claim no more jobs; the current parts finish and are stored."""
        self._draining.set()
        self._wake.set()

    async def stop(self, timeout: float) -> None:
        """Drain, and wait up to ``timeout`` for the workers to leave their current part."""
        self.begin_drain()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    # -- the worker loop ----------------------------------------------------------------------

    async def _work(self, owner: str) -> None:
        settings = self.settings
        while not self._draining.is_set():
            job = None
            if self.core.ready:
                try:
                    job = await asyncio.to_thread(self.store.claim, owner, settings.jobs_lease_s)
                except Exception:
                    logger.exception("claiming a job failed")
            if job is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), settings.jobs_poll_s)
                continue
            try:
                await self._run(job, owner)
            except Exception:  # a bug or a store outage: the lease lapses, the job is retried
                logger.exception("job %s stopped on an unexpected error", job.id)

    async def _run(self, job: JobRecord, owner: str) -> None:
        logger.info("job %s: started (attempt %d)", job.id, job.attempts)
        if job.attempts == 1 and job.started_at is not None:
            self.metrics.job_queue_wait.observe(_seconds(job.created_at, job.started_at))
        limit = self.settings.jobs_max_attempts
        if job.attempts > limit:
            logger.error("job %s: claimed %d times, over the limit: failed", job.id, job.attempts)
            refused: dict[str, Any] = {
                "type": "too_many_attempts",
                "message": f"the job was started {job.attempts} times without finishing (the "
                f"limit is {limit}): its media may stop the server; it is not run again",
            }
            await self._finish(job, owner, JobState.FAILED, refused)
            return
        lost = asyncio.Event()
        renewer = asyncio.create_task(
            self._renew(job.id, owner, lost), name=f"cmamba-lease-{job.id}"
        )
        try:
            state, error = await self._process(job, owner, lost)
        except _LeaseLost:
            logger.info("job %s: no longer ours (cancelled, deleted or taken over)", job.id)
            await self._ended(job.id)
            return
        except _Drained:
            released = await asyncio.to_thread(self.store.release, job.id, owner)
            logger.info(
                "job %s: %s for the next start (draining)",
                job.id,
                "queued again" if released else "no longer ours, not released",
            )
            return
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            self.running.pop(job.id, None)
        await self._finish(job, owner, state, error)

    async def _finish(
        self, job: JobRecord, owner: str, state: JobState, error: dict[str, Any] | None
    ) -> None:
        finished = await asyncio.to_thread(self.store.finish, job.id, owner, state, error=error)
        if not finished:
            logger.info("job %s: ended as %s, but it is no longer ours", job.id, state)
            await self._ended(job.id)
            return
        logger.info("job %s: %s", job.id, state)
        await self._ended(job.id)

    async def _ended(self, job_id: str) -> None:
        """Record the end of a job, delete its own media, and hand it to ``on_finished``."""
        record = await asyncio.to_thread(self.store.get, job_id)
        if record is None:
            return
        if record.state not in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
            return
        if record.started_at is not None and record.finished_at is not None:
            self.metrics.job_duration.labels(state=str(record.state)).observe(
                _seconds(record.started_at, record.finished_at)
            )
        if record.owns_media:
            Path(record.media_path).unlink(missing_ok=True)
        if self._on_finished is not None:
            await self._on_finished(record)

    async def _renew(self, job_id: str, owner: str, lost: asyncio.Event) -> None:
        every = self.settings.jobs_lease_s / 3.0
        while True:
            await asyncio.sleep(every)
            try:
                ok = await asyncio.to_thread(
                    self.store.renew, job_id, owner, self.settings.jobs_lease_s
                )
            except Exception:
                logger.exception("job %s: renewing the lease failed", job_id)
                continue
            if not ok:
                lost.set()
                return

    # -- one job ------------------------------------------------------------------------------

    async def _process(
        self, job: JobRecord, owner: str, lost: asyncio.Event
    ) -> tuple[JobState, dict[str, Any] | None]:
        """Run the parts of ``job`` not stored yet; its final state and error."""
        from preprocessing.errors import PreprocessingError
        from preprocessing.parts import plan_parts

        settings = self.settings
        media = Path(job.media_path)
        await self._step(job, owner, lost, done_seconds=job.done_seconds, stage="planning")
        try:
            plan = await asyncio.to_thread(plan_parts, media, settings.jobs_part_s)
        except PreprocessingError as exc:
            return JobState.FAILED, _error(from_preprocessing_error(exc))
        except OSError as exc:
            return JobState.FAILED, {"type": "media_missing", "message": f"the media: {exc}"}
        if not (math.isfinite(plan.duration_s) and plan.duration_s > 0):
            return JobState.FAILED, _error(
                UndecodableMediaError(
                    f"the recording's length could not be read ({plan.duration_s!r} s)"
                )
            )
        limit_s = settings.jobs_max_media_hours * 3600.0
        if plan.duration_s > limit_s:
            return JobState.FAILED, _error(
                MediaTooLongForJobError(
                    f"the recording is {plan.duration_s / 3600:.2f} h long; the limit is "
                    f"{settings.jobs_max_media_hours:g} h"
                )
            )
        stored = await asyncio.to_thread(self.store.segments, job.id)
        done = {int(part["index"]) for part in stored}
        done_s = sum(float(p["end_s"]) - float(p["start_s"]) for p in stored)
        count = len(plan.bounds)
        await self._step(
            job, owner, lost, done_seconds=done_s, stage=f"part {len(done)}/{count}",
            media_seconds=plan.duration_s,
        )  # fmt: skip
        for index, (start_s, end_s) in enumerate(plan.bounds):
            if index in done:
                continue
            if self._draining.is_set():
                raise _Drained
            if lost.is_set():
                raise _LeaseLost
            self.running[job.id] = index
            try:
                part = await self._part(job, index, start_s, end_s)
            except ServiceError as exc:
                if self._draining.is_set() and not self.core.ready:
                    raise _Drained from exc
                return JobState.FAILED, _error(exc, part=index, start_s=start_s)
            if not await asyncio.to_thread(self.store.add_segment, job.id, owner, index, part):
                raise _LeaseLost
            self.metrics.job_media_seconds.inc(end_s - start_s)
            done.add(index)
            done_s += end_s - start_s
            await self._step(
                job, owner, lost, done_seconds=done_s, stage=f"part {len(done)}/{count}"
            )
        return JobState.SUCCEEDED, None

    async def _step(
        self,
        job: JobRecord,
        owner: str,
        lost: asyncio.Event,
        *,
        done_seconds: float,
        stage: str,
        media_seconds: float | None = None,
    ) -> None:
        ok = await asyncio.to_thread(
            self.store.progress,
            job.id,
            owner,
            done_seconds=done_seconds,
            stage=stage,
            media_seconds=media_seconds,
        )
        if not ok:
            lost.set()
            raise _LeaseLost

    async def _part(
        self, job: JobRecord, index: int, start_s: float, end_s: float
    ) -> dict[str, Any]:
        """Extract and score one part; its JSON record (segments on the recording's clock)."""
        from preprocessing.errors import PreprocessingError
        from preprocessing.parts import write_part

        settings = self.settings
        folder = settings.jobs_dir / "parts"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{job.id}-{index}-{uuid.uuid4().hex[:6]}.mkv"
        started = time.perf_counter()
        deadline = time.monotonic() + settings.jobs_part_timeout_s
        try:
            await asyncio.to_thread(write_part, job.media_path, start_s, end_s, path)
        except PreprocessingError as exc:
            path.unlink(missing_ok=True)
            raise from_preprocessing_error(exc) from exc
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise DeadlineExceededError(f"the part could not be written: {exc}") from exc
        bundle, _ = await self.core.extract_bundle(
            path, None, deadline=deadline, remove_after=True, background=True
        )
        timeline, outcomes = await self.core.score_timeline(
            bundle,
            deadline,
            window_s=float(job.options.get("window", 5.0)),
            whole_clip=False,
            background=True,
        )
        return {
            "index": index,
            "start_s": start_s,
            "end_s": end_s,
            "segments": [
                segment_record(shifted(s, start_s, end_s))
                for s in timeline.segments
                if s.segment.start_s + start_s < end_s - 0.05
            ],
            "clips_scored": timeline.clips_scored,
            "largest_batch": max((o.batch_size for o in outcomes), default=0),
            "modalities": assembly.media_summary(bundle.summary),
            "timings_ms": {
                **{k: float(v) for k, v in bundle.timings_ms.items()},
                "part": (time.perf_counter() - started) * 1000.0,
            },
        }


def _error(exc: ServiceError, **where: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"type": exc.error_type, "message": exc.message}
    if where:
        error.update(where)
    return error


def _seconds(first: datetime, last: datetime) -> float:
    return max(0.0, (last - first).total_seconds())


__all__ = ["FinishedHook", "JobRunner", "process_owner", "utc_now", "worker_owner"]
