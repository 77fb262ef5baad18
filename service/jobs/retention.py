"""Retention: finished jobs are deleted, with the media files they own, once they are old."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from service.jobs.store import JobStore

logger = logging.getLogger(__name__)


def remove_file(path: str) -> None:
    """Delete the file at ``path``; one already gone is fine."""
    Path(path).unlink(missing_ok=True)


@dataclass(frozen=True)
class Purged:
    """What one purge removed."""

    jobs: int
    """Job records deleted (with their timeline segments)."""
    files: int
    """Media files the purged jobs owned (asked to delete; some may have been gone already)."""
    failed: int
    """Jobs kept because their file could not be deleted (tried again at the next purge)."""


def purge_expired(
    store: JobStore,
    retention: timedelta,
    now: datetime,
    delete_file: Callable[[str], None] = remove_file,
    *,
    batch: int = 100,
) -> Purged:
    """Delete every job that finished more than ``retention`` before ``now``, and the media
    file of each that owns its media (``delete_file``; a file of the import folder is left).

    A job's file goes first, then its record: a job whose file cannot be deleted (an
    ``OSError`` of ``delete_file``) keeps its record, so no file is ever left without the job
    that would delete it, and the next purge tries again. Blocking: call it off the event loop.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    cutoff = now - retention
    jobs = files = 0
    failed: set[str] = set()
    while True:
        # Jobs kept on a failure come back in every read: read past them.
        limit = batch + len(failed)
        expired = store.expired(cutoff, limit=limit)
        todo = [job for job in expired if job.id not in failed]
        for job in todo:
            if job.owns_media:
                try:
                    delete_file(job.media_path)
                except OSError as exc:
                    logger.warning("job %s: cannot delete its media file: %s", job.id, exc)
                    failed.add(job.id)
                    continue
                files += 1
            if store.delete(job.id):
                jobs += 1
        if not todo or len(expired) < limit:
            break
    return Purged(jobs=jobs, files=files, failed=len(failed))
