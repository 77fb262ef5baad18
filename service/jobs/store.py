"""Durable job state: the records of long-recording jobs and their timelines, on a database.

A job is accepted (``QUEUED``), claimed by one runner under a lease (``RUNNING``), and ends
``SUCCEEDED``, ``FAILED`` or ``CANCELLED``. A runner holds its job only while its lease lasts:
it renews the lease as it works, and a job whose lease lapsed (its process died) is claimed
again by another runner. Every write of a runner names its owner and is refused once the job
is no longer its own (claimed by another after the lease lapsed, or cancelled), so a stale
runner can never overwrite a newer one's work.

The timeline is stored segment by segment: a runner that takes over a job reads the segments
already stored and carries on from the last one.

Two backends implement :class:`JobStore`: SQLite (:mod:`service.jobs.sqlite`, a file under the
data folder, the default) and PostgreSQL (:mod:`service.jobs.postgres`, for replicas that share
one queue). :func:`open_store` picks one from a URL. Every method is synchronous and
thread-safe: call them off the event loop.
"""

from __future__ import annotations

import builtins
import enum
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from service.errors import InvalidJobCursorError

__all__ = [
    "FINISHED_STATES",
    "Clock",
    "InvalidJobCursorError",
    "JobRecord",
    "JobState",
    "JobStore",
    "JobStoreError",
    "SchemaVersionError",
    "UnsupportedStoreURLError",
    "open_store",
    "utc_now",
]


class JobState(enum.StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_STATES: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
)
"""States a job never leaves (retention deletes them)."""

CALLBACK_STATES: frozenset[str] = frozenset({"pending", "delivered", "failed"})
"""Values of :attr:`JobRecord.callback_state` besides None (no callback asked for)."""


@dataclass(frozen=True)
class JobRecord:
    """One job as stored. Times are timezone-aware UTC."""

    id: str
    """Opaque, URL-safe and unguessable (a uuid4 in hex)."""
    state: JobState
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    """When a runner first claimed it."""
    finished_at: datetime | None
    media_path: str
    """Where the media lies: an upload kept by the service or a file of the import folder."""
    owns_media: bool
    """True: the media file is the job's own and is deleted with the job."""
    options: dict[str, Any]
    media_seconds: float | None
    """Length of the media, once known."""
    done_seconds: float
    """Media seconds analysed so far."""
    stage: str | None
    error: dict[str, Any] | None
    """``{"type": ..., "message": ...}`` of a failed job."""
    attempts: int
    """How many times a runner claimed it."""
    lease_owner: str | None
    lease_expires_at: datetime | None
    callback_state: str | None
    """None (no callback), "pending", "delivered" or "failed"."""


class JobStoreError(RuntimeError):
    """The job store cannot be used as configured (not a client's error)."""


class UnsupportedStoreURLError(JobStoreError, ValueError):
    """The database URL names no supported backend."""


class SchemaVersionError(JobStoreError):
    """The database holds a newer schema than this code knows (a newer release wrote it)."""


class Row(Protocol):
    """A database row read by column name (``sqlite3.Row``, psycopg's dict rows)."""

    def __getitem__(self, key: str, /) -> Any: ...


Clock = Callable[[], datetime]
"""Returns the current time, timezone-aware UTC."""


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class JobStore(Protocol):
    """The job records and timelines. All methods are synchronous and thread-safe."""

    def migrate(self) -> int:
        """Apply the versioned migrations not yet applied; return the schema version.

        Safe to call from several processes at once and again on an up-to-date database.
        Raises :class:`SchemaVersionError` when the database is newer than this code.
        """
        ...

    def create(
        self,
        *,
        media_path: str,
        owns_media: bool,
        options: dict[str, Any],
        media_seconds: float | None,
    ) -> JobRecord:
        """Store a new ``QUEUED`` job."""
        ...

    def get(self, job_id: str) -> JobRecord | None:
        """The job, or None when there is no such job."""
        ...

    def list(
        self, *, limit: int, cursor: str | None, state: JobState | None = None
    ) -> tuple[list[JobRecord], str | None]:
        """Up to ``limit`` jobs, newest first, after ``cursor`` (None: from the newest), and
        the cursor of the next page (None: no more). Jobs created meanwhile never shift a
        page. Raises :class:`InvalidJobCursorError` for a cursor it did not hand out."""
        ...

    def count(self, state: JobState | None = None) -> int:
        """How many jobs there are (in ``state``)."""
        ...

    def claim(self, owner: str, lease_seconds: float) -> JobRecord | None:
        """Take the oldest job to run: a ``QUEUED`` one, or a ``RUNNING`` one whose lease
        lapsed. It becomes ``RUNNING`` under ``owner``'s lease and its ``attempts`` grows by
        one. Two callers, in any processes, never get the same job under live leases.
        ``owner`` must be unique to the runner (host, process and a random part)."""
        ...

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend ``owner``'s lease to ``lease_seconds`` from now; False when the job is no
        longer ``owner``'s (claimed by another, cancelled, finished or deleted)."""
        ...

    def progress(
        self,
        job_id: str,
        owner: str,
        *,
        done_seconds: float,
        stage: str | None,
        media_seconds: float | None = None,
    ) -> bool:
        """Record progress (``media_seconds`` too when given); False when not ``owner``'s."""
        ...

    def add_segment(self, job_id: str, owner: str, index: int, segment: dict[str, Any]) -> bool:
        """Store timeline segment ``index`` (JSON). Storing an index again keeps the first;
        False when the job is not ``owner``'s (nothing is stored then)."""
        ...

    def segments(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """The stored segments in index order (empty for an unknown job)."""
        ...

    def finish(
        self,
        job_id: str,
        owner: str,
        state: JobState,
        *,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """End ``owner``'s job in a finished ``state``; False when it is not ``owner``'s."""
        ...

    def release(self, job_id: str, owner: str) -> bool:
        """Hand ``owner``'s running job back to the queue at once (a process that stops
        mid-job: the next claim, here or in another replica, resumes it without waiting for the
        lease to lapse). It keeps its segments, progress, ``started_at`` and ``attempts``.
        False when the job is not ``owner``'s."""
        ...

    def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a ``QUEUED`` or ``RUNNING`` job (its runner sees it at its next renew or
        write); a finished job is left as it is. Returns the job, or None when there is none."""
        ...

    def delete(self, job_id: str) -> bool:
        """Remove the job and its segments; False when there was none. Files are the caller's."""
        ...

    def set_callback_state(self, job_id: str, state: str) -> None:
        """Record the callback's delivery: "pending", "delivered" or "failed"."""
        ...

    def expired(self, finished_before: datetime, limit: int) -> builtins.list[JobRecord]:
        """Up to ``limit`` finished jobs that ended before ``finished_before``, oldest first."""
        ...

    def close(self) -> None:
        """Release the connections."""
        ...


def open_store(url: str, *, clock: Clock = utc_now) -> JobStore:
    """The job store at ``url``: ``sqlite:///relative/jobs.db``, ``sqlite:////abs/jobs.db``
    or ``postgresql://user:password@host:port/database`` (libpq's URL, ``postgres://`` too).

    ``clock`` gives the time the store stamps and judges leases by (tests move it).
    The schema is not touched: call :meth:`JobStore.migrate` once at start.
    """
    if url.startswith("sqlite:///"):
        from service.jobs.sqlite import SqliteJobStore

        path = url.removeprefix("sqlite:///")
        if not path or path.endswith("/"):
            raise UnsupportedStoreURLError(f"the job database URL {url!r} names no file")
        return SqliteJobStore(path, clock=clock)
    if url.startswith(("postgresql://", "postgres://")):
        from service.jobs.postgres import PostgresJobStore

        return PostgresJobStore(url, clock=clock)
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise UnsupportedStoreURLError(
        f"unsupported job database URL scheme {scheme[:32]!r}: use sqlite:///<path> or "
        "postgresql://user:password@host:port/database"
    )


# -- helpers shared by the backends ---------------------------------------------------------------


def new_job_id() -> str:
    """A fresh job id: 128 random bits in hex."""
    import uuid

    return uuid.uuid4().hex


def dump_json(value: Any) -> str:
    """``value`` as standard JSON text (no NaN or infinities: they would break every reader)."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def load_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def encode_cursor(seq: int) -> str:
    """The paging cursor of the job stored at ``seq`` (the order of creation)."""
    return f"j{seq}"


def decode_cursor(cursor: str) -> int:
    """The ``seq`` a cursor of :func:`encode_cursor` holds; :class:`InvalidJobCursorError`
    for anything else."""
    digits = cursor[1:]
    if not (cursor.startswith("j") and digits.isascii() and digits.isdigit() and len(digits) < 19):
        raise InvalidJobCursorError("the paging cursor is not one this service handed out")
    return int(digits)


def lease_until(now: datetime, lease_seconds: float) -> datetime:
    """When a lease of ``lease_seconds`` taken at ``now`` lapses."""
    if not (math.isfinite(lease_seconds) and lease_seconds > 0):
        raise ValueError(f"a lease must be a positive number of seconds, not {lease_seconds!r}")
    return now + timedelta(seconds=lease_seconds)


def check_seconds(name: str, value: float | None) -> None:
    """A media time is a finite number of seconds, not below 0 (SQLite would keep NaN as NULL)."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")


def check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")


def check_finished(state: JobState) -> None:
    if state not in FINISHED_STATES:
        raise ValueError(f"a job finishes as succeeded, failed or cancelled, not {state!r}")


def check_callback_state(state: str) -> None:
    if state not in CALLBACK_STATES:
        raise ValueError(f"callback state must be one of {sorted(CALLBACK_STATES)}, not {state!r}")


def checked_now(clock: Clock) -> datetime:
    """``clock()``, refused when it is not timezone-aware (a naive time would be misread)."""
    now = clock()
    if now.tzinfo is None:
        raise ValueError("the job store's clock must return timezone-aware times")
    return now.astimezone(UTC)


def record_from_row(row: Row, time: Callable[[Any], datetime | None]) -> JobRecord:
    """A :class:`JobRecord` from a ``jobs`` row; ``time`` reads the backend's time columns."""

    def required_time(value: Any) -> datetime:
        converted = time(value)
        assert converted is not None
        return converted

    return JobRecord(
        id=row["id"],
        state=JobState(row["state"]),
        created_at=required_time(row["created_at"]),
        updated_at=required_time(row["updated_at"]),
        started_at=time(row["started_at"]),
        finished_at=time(row["finished_at"]),
        media_path=row["media_path"],
        owns_media=bool(row["owns_media"]),
        options=load_json(row["options"]),
        media_seconds=row["media_seconds"],
        done_seconds=float(row["done_seconds"]),
        stage=row["stage"],
        error=load_json(row["error"]),
        attempts=int(row["attempts"]),
        lease_owner=row["lease_owner"],
        lease_expires_at=time(row["lease_expires_at"]),
        callback_state=row["callback_state"],
    )
