"""The job use cases: submit, look, fetch the result, list, cancel; and the jobs' upkeep
(callbacks, retention, the state gauge). HTTP-free: :mod:`service.api.jobs` translates.

Every store call is synchronous: here they run on worker threads (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from service.core.engine import InferenceCore
from service.core.lifecycle import CoreState
from service.core.timeline import (
    Timeline,
    TimelinePrediction,
    segment_from_record,
    segment_mean,
)
from service.errors import (
    CallbackNotAllowedError,
    DrainingError,
    ImportPathError,
    JobNotFinishedError,
    JobNotFoundError,
    JobStorageFullError,
    MediaTooLongForJobError,
    StartupError,
    TooManyJobsError,
    from_preprocessing_error,
)
from service.jobs.callbacks import CallbackPolicy, CallbackSender
from service.jobs.retention import purge_expired
from service.jobs.runner import JobRunner
from service.jobs.store import JobRecord, JobState, JobStore, utc_now
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

FINISHED = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobOptions:
    """What a client may ask of a job (besides its media)."""

    window: float = 5.0
    callback_url: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"window": self.window, "callback_url": self.callback_url}


def job_status(record: JobRecord, location: str | None = None) -> dict[str, Any]:
    """A job as ``GET /v1/jobs/{id}`` answers it (and as its callback body carries it)."""
    total = record.media_seconds
    fraction = None
    if total:
        fraction = round(min(1.0, record.done_seconds / total), 4)
    if record.state is JobState.SUCCEEDED:
        fraction = 1.0
    timings: dict[str, float | None] = {
        "queue_wait_s": _between(record.created_at, record.started_at),
        "run_s": _between(record.started_at, record.finished_at),
        "total_s": _between(record.created_at, record.finished_at),
    }
    return {
        "id": record.id,
        "state": str(record.state),
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
        "started_at": record.started_at.isoformat() if record.started_at else None,
        "finished_at": record.finished_at.isoformat() if record.finished_at else None,
        "progress": {
            "done_seconds": round(record.done_seconds, 3),
            "media_seconds": round(total, 3) if total is not None else None,
            "fraction": fraction,
            "stage": record.stage,
        },
        "timings": timings,
        "error": record.error,
        "attempts": record.attempts,
        "filename": record.options.get("filename"),
        "options": {"window": record.options.get("window", 5.0)},
        "callback": {
            "url": record.options.get("callback_url"),
            "state": record.callback_state,
        },
        "result_url": f"{location}/result" if location else None,
    }


def _between(first: datetime | None, last: datetime | None) -> float | None:
    if first is None or last is None:
        return None
    return round(max(0.0, (last - first).total_seconds()), 3)


class JobService:
    """The job use cases over one store, with this process's runner.

    Args:
        store: the job store (its schema migrated).
        core: the inference core (``score_timeline``, the model identity).
        settings: the ``jobs_*`` settings.
        metrics: the job metrics.
    """

    def __init__(
        self,
        store: JobStore,
        core: InferenceCore,
        settings: ServiceSettings,
        metrics: ServiceMetrics,
    ) -> None:
        self.store = store
        self.core = core
        self.settings = settings
        self.metrics = metrics
        self.policy = CallbackPolicy(settings.jobs_callback_allow)
        secret = settings.jobs_callback_secret
        self.callbacks = CallbackSender(
            self.policy,
            secret.get_secret_value().encode() if secret is not None else None,
            attempts=settings.jobs_callback_attempts,
            backoff_s=settings.jobs_callback_backoff_s,
            timeout_s=settings.jobs_callback_timeout_s,
        )
        self.runner = JobRunner(store, core, settings, metrics, on_finished=self._finished)
        self._upkeep: list[asyncio.Task[None]] = []
        self._sending: set[asyncio.Task[None]] = set()

    @property
    def uploads_dir(self) -> Path:
        """Where uploads kept for jobs lie (under the jobs data folder: a restart keeps them)."""
        return self.settings.jobs_dir / "uploads"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the runner and the upkeep tasks (on the running event loop)."""
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.runner.start()
        self._upkeep.append(asyncio.create_task(self._retention_loop(), name="cmamba-retention"))
        self._upkeep.append(asyncio.create_task(self._gauge_loop(), name="cmamba-jobs-gauge"))
        resend = asyncio.create_task(self._resend_pending(), name="cmamba-callbacks-resend")
        resend.add_done_callback(_log_failure)
        self._upkeep.append(resend)

    async def stop(self, timeout: float) -> None:
        """Drain the runner (its current parts finish), stop the upkeep, wait for callbacks
        under way (up to ``timeout``), close the store."""
        await self.runner.stop(timeout)
        for task in self._upkeep:
            task.cancel()
        if self._sending:
            await asyncio.wait(self._sending, timeout=timeout)
        for task in [*self._upkeep, *self._sending]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.to_thread(self.store.close)

    # -- use cases ----------------------------------------------------------------------------

    async def check_capacity(self, incoming_bytes: int | None) -> None:
        """Refuse a new job before its body is read: the queue is full (429) or its upload
        would pass the disk quota (507)."""
        queued = await asyncio.to_thread(self.store.count, JobState.QUEUED)
        if queued >= self.settings.jobs_max_queued:
            raise TooManyJobsError(
                f"{queued} jobs are queued already (the limit is "
                f"{self.settings.jobs_max_queued}); retry later"
            )
        if incoming_bytes is not None:
            await self.check_quota(incoming_bytes)

    async def check_quota(self, incoming_bytes: int, *, kept: Path | None = None) -> None:
        used = await asyncio.to_thread(_folder_bytes, self.uploads_dir)
        if kept is not None:
            used -= incoming_bytes  # already counted in the folder
        quota = self.settings.jobs_disk_quota_bytes
        if used + incoming_bytes > quota:
            raise JobStorageFullError(
                f"the uploads kept for jobs would take {used + incoming_bytes} bytes, over the "
                f"quota of {quota} bytes: retry once running jobs end, or send a shorter file"
            )

    async def options(self, window: float, callback_url: str | None) -> JobOptions:
        """Checked job options (the callback target against the allow-list)."""
        if callback_url is not None:
            callback_url = callback_url.strip() or None
        if callback_url is not None:
            await asyncio.to_thread(self.policy.check, callback_url)
        return JobOptions(window=window, callback_url=callback_url)

    def import_path(self, path: str) -> Path:
        """The file ``path`` names inside the import folder (relative to it, or absolute);
        anything that resolves outside it (``..``, symlinks) is refused."""
        folder = self.settings.jobs_import_dir
        if folder is None:
            raise ImportPathError("this server takes no `path` (jobs_import_dir is not set)")
        if not path or "\x00" in path or len(path) > 4096:
            raise ImportPathError("the path is empty or invalid")
        root = folder.resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root):
            raise ImportPathError("the path is outside the import folder")
        if not target.is_file():
            raise ImportPathError("the path is not a file in the import folder")
        return target

    async def submit(
        self, media: Path, *, owns_media: bool, options: JobOptions, filename: str | None
    ) -> JobRecord:
        """Queue a job on ``media`` (an upload in :attr:`uploads_dir` when ``owns_media``: it
        is deleted with the job, and here when the job is refused)."""
        try:
            if self.core.state in (CoreState.DRAINING, CoreState.STOPPED):
                raise DrainingError("the server is shutting down")
            await self.check_capacity(None)
            probed = await asyncio.to_thread(_probe, media)
            limit_s = self.settings.jobs_max_media_hours * 3600.0
            if probed.duration_s is not None and probed.duration_s > limit_s:
                raise MediaTooLongForJobError(
                    f"the recording is {probed.duration_s / 3600:.2f} h long; the limit is "
                    f"{self.settings.jobs_max_media_hours:g} h"
                )
            record = await asyncio.to_thread(
                self.store.create,
                media_path=str(media),
                owns_media=owns_media,
                options={
                    **options.as_dict(),
                    "filename": filename,
                    "container": probed.container,
                },
                media_seconds=probed.duration_s,
            )
        except BaseException:
            if owns_media:
                media.unlink(missing_ok=True)
            raise
        if options.callback_url is not None:
            await asyncio.to_thread(self.store.set_callback_state, record.id, "pending")
            fresh = await asyncio.to_thread(self.store.get, record.id)
            record = fresh if fresh is not None else record
        self.runner.wake()
        return record

    async def get(self, job_id: str) -> JobRecord:
        record = await asyncio.to_thread(self.store.get, job_id)
        if record is None:
            raise JobNotFoundError(f"no job {job_id[:64]!r}")
        return record

    async def list(
        self, *, limit: int, cursor: str | None, state: JobState | None
    ) -> tuple[list[JobRecord], str | None]:
        return await asyncio.to_thread(self.store.list, limit=limit, cursor=cursor, state=state)

    async def result(self, job_id: str) -> tuple[JobRecord, TimelinePrediction]:
        """The timeline of a finished job (409 while it is not, or when it failed)."""
        record = await self.get(job_id)
        if record.state is not JobState.SUCCEEDED:
            detail = f" ({record.error.get('message')})" if record.error else ""
            raise JobNotFinishedError(f"the job is {record.state}{detail}: no result")
        parts = await asyncio.to_thread(self.store.segments, job_id)
        return record, job_timeline(record, parts, self.core)

    async def delete(self, job_id: str) -> None:
        """Cancel the job (a runner stops at its next step) and remove it and its own file."""
        record = await self.get(job_id)
        if record.state not in FINISHED:
            await asyncio.to_thread(self.store.cancel, job_id)
        await asyncio.to_thread(self.store.delete, job_id)
        if record.owns_media:
            Path(record.media_path).unlink(missing_ok=True)

    # -- upkeep -------------------------------------------------------------------------------

    def callback_window_s(self) -> float:
        """The longest a delivery can take: every try's timeout and every wait between tries."""
        settings = self.settings
        attempts = settings.jobs_callback_attempts
        waits = settings.jobs_callback_backoff_s * (2 ** (attempts - 1) - 1)
        return attempts * settings.jobs_callback_timeout_s + waits

    async def _resend_pending(self, scan: int = 1000) -> None:
        """Send again the callbacks a stopped process left pending: those of jobs that ended
        longer ago than a delivery can take (a live replica is done with them by then); up to
        ``scan`` newest jobs of each final state are looked at."""
        window = timedelta(seconds=self.callback_window_s() + 5.0)
        for state in (JobState.SUCCEEDED, JobState.FAILED):
            cursor: str | None = None
            seen = 0
            while seen < scan:
                records, cursor = await self.list(limit=200, cursor=cursor, state=state)
                seen += len(records)
                for record in records:
                    ended = record.finished_at
                    if record.callback_state != "pending" or ended is None:
                        continue
                    late = utc_now() - ended
                    if late < window:  # maybe still under way elsewhere: look again later
                        await asyncio.sleep((window - late).total_seconds())
                        fresh = await asyncio.to_thread(self.store.get, record.id)
                        if fresh is None or fresh.callback_state != "pending":
                            continue
                        record = fresh
                    logger.info("job %s: sending the callback a stopped process left", record.id)
                    await self._finished(record)
                if cursor is None:
                    break

    async def _finished(self, record: JobRecord) -> None:
        """A job has ended: send its callback (in the background)."""
        url = record.options.get("callback_url")
        if not url or record.state is JobState.CANCELLED:
            return
        task = asyncio.create_task(self._send(record, url), name=f"cmamba-callback-{record.id}")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, record: JobRecord, url: str) -> None:
        body = json.dumps(job_status(record, f"/v1/jobs/{record.id}")).encode()
        try:
            delivered = await self.callbacks.deliver(url, body)
        except CallbackNotAllowedError:
            delivered = False
        state = "delivered" if delivered else "failed"
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.store.set_callback_state, record.id, state)
        logger.info("job %s: callback %s", record.id, state)

    async def purge_expired(self, now: datetime | None = None) -> int:
        """Delete the jobs that finished more than ``jobs_retention_s`` ago, and their own
        files (:func:`service.jobs.retention.purge_expired`); how many jobs."""
        purged = await asyncio.to_thread(
            purge_expired,
            self.store,
            timedelta(seconds=self.settings.jobs_retention_s),
            now or utc_now(),
        )
        return purged.jobs

    async def _retention_loop(self) -> None:
        while True:
            try:
                removed = await self.purge_expired()
                if removed:
                    logger.info("retention: %d finished jobs deleted", removed)
            except Exception:
                logger.exception("retention failed")
            await asyncio.sleep(self.settings.jobs_retention_interval_s)

    async def _gauge_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.refresh_gauge()
            await asyncio.sleep(5.0)

    async def refresh_gauge(self) -> None:
        """Set ``cmamba_jobs{state}`` from the store."""
        for state in JobState:
            count = await asyncio.to_thread(self.store.count, state)
            self.metrics.jobs.labels(state=str(state)).set(count)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s failed", task.get_name(), exc_info=task.exception())


def job_timeline(
    record: JobRecord, parts: list[dict[str, Any]], core: InferenceCore
) -> TimelinePrediction:
    """The timeline of a job from its stored parts, in ``/v1/timeline``'s terms: the segments
    of every part in time order, overall the duration-weighted mean of the segments."""
    parts = sorted(parts, key=lambda p: int(p["index"]))
    scored = [segment_from_record(s) for part in parts for s in part["segments"]]
    duration = record.media_seconds or (float(parts[-1]["end_s"]) if parts else 0.0)
    clips = sum(int(p.get("clips_scored", 0)) for p in parts)
    timeline: Timeline = segment_mean(scored, duration, clips_scored=clips)
    timings: dict[str, float] = {}
    for part in parts:
        for stage, ms in (part.get("timings_ms") or {}).items():
            timings[stage] = timings.get(stage, 0.0) + float(ms)
    run_s = _between(record.started_at, record.finished_at)
    timings["total"] = (run_s or 0.0) * 1000.0
    return TimelinePrediction(
        timeline=timeline,
        modalities=_merged_summary([p.get("modalities") or {} for p in parts], record),
        timings_ms=timings,
        model=core.identity,
        largest_batch=max((int(p.get("largest_batch", 0)) for p in parts), default=0),
    )


def _merged_summary(summaries: list[dict[str, Any]], record: JobRecord) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for summary in summaries:
        for key, value in summary.items():
            if key == "transcript":
                if value:
                    merged[key] = f"{merged[key]} {value}" if merged.get(key) else value
                else:
                    merged.setdefault(key, None)
            elif isinstance(value, bool) or not isinstance(value, int | float):
                merged.setdefault(key, value)
                if isinstance(value, bool):
                    merged[key] = bool(merged[key]) or value
            else:
                merged[key] = merged.get(key, 0) + value
    if record.options.get("container"):
        merged["container"] = record.options["container"]
    return merged


@dataclass(frozen=True)
class _Probed:
    container: str
    duration_s: float | None


def _probe(path: Path) -> _Probed:
    """The container and the header's duration of a job's media (no decoding). A duration
    that is not a finite positive number (a broken or hostile header: Matroska's is a float) is
    taken as unknown: the runner measures the length from the packets."""
    from preprocessing.errors import PreprocessingError
    from preprocessing.parts import probe_duration

    try:
        container, duration = probe_duration(path)
    except PreprocessingError as exc:
        raise from_preprocessing_error(exc) from exc
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        duration = None
    return _Probed(container=container, duration_s=duration)


def _folder_bytes(folder: Path) -> int:
    total = 0
    if folder.is_dir():
        for entry in folder.iterdir():
            with contextlib.suppress(OSError):
                if entry.is_file():
                    total += entry.stat().st_size
    return total


def open_jobs(
    settings: ServiceSettings, core: InferenceCore, metrics: ServiceMetrics
) -> JobService:
    """Open and migrate the job store of ``settings`` and build the job service on it
    (blocking: call it off the event loop). Raises :class:`StartupError` when the store cannot
    be used (an unreachable database, a newer schema): its message names the database without
    its password."""
    from service.jobs.store import JobStoreError, open_store

    settings.jobs_dir.mkdir(parents=True, exist_ok=True)
    try:
        store = open_store(settings.jobs_store_url())
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
    except JobStoreError as exc:
        raise StartupError(f"the job store cannot be used: {exc}") from None
    return JobService(store, core, settings, metrics)


def unavailable_reason(settings: ServiceSettings) -> str | None:
    """Why this server runs no jobs, or None when it does."""
    if not settings.jobs_enabled:
        return "jobs are disabled on this server (jobs_enabled is false)"
    if not settings.enable_media:
        return "this server extracts no media (enable_media is false), so it runs no jobs"
    return None
