"""The job store in one SQLite file (the embedded default).

One connection guarded by a lock serves every thread of a process; several processes may share
the file. The file is in WAL mode (readers never wait for the writer), and every write is one
``BEGIN IMMEDIATE`` transaction: it takes the database's write lock before it reads, so a claim
reads and marks its job with no other writer in between, in any process. A busy database is
waited for (``busy_timeout_s``), not failed.
"""

from __future__ import annotations

import builtins
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from service.jobs.migrations import LATEST_VERSION, MIGRATIONS
from service.jobs.store import (
    FINISHED_STATES,
    Clock,
    JobRecord,
    JobState,
    SchemaVersionError,
    check_callback_state,
    check_finished,
    check_limit,
    check_seconds,
    checked_now,
    decode_cursor,
    dump_json,
    encode_cursor,
    lease_until,
    load_json,
    new_job_id,
    record_from_row,
    utc_now,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_FINISHED = tuple(str(state) for state in sorted(FINISHED_STATES))


def _micros(moment: datetime) -> int:
    """``moment`` as integer microseconds since the epoch (exact, unlike ``timestamp()``)."""
    return (moment - _EPOCH) // _MICROSECOND


def _moment(micros: int | None) -> datetime | None:
    return None if micros is None else _EPOCH + micros * _MICROSECOND


class SqliteJobStore:
    """:class:`service.jobs.store.JobStore` on the SQLite file at ``path`` (created with its
    folder when missing)."""

    def __init__(
        self, path: str | Path, *, clock: Clock = utc_now, busy_timeout_s: float = 30.0
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.path,
            timeout=busy_timeout_s,
            isolation_level=None,  # transactions are begun and ended here, explicitly
            check_same_thread=False,  # the lock serialises the threads
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.execute("PRAGMA journal_mode = WAL")

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the database's write lock from its start."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction (a consistent snapshot for several statements)."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def _now(self) -> datetime:
        return checked_now(self._clock)

    @staticmethod
    def _record(row: sqlite3.Row | None) -> JobRecord | None:
        return None if row is None else record_from_row(row, _moment)

    # -- schema ---------------------------------------------------------------------------------

    def migrate(self, *, target: int = LATEST_VERSION) -> int:
        """Apply the migrations up to ``target`` (tests stop early to build old files)."""
        with self._write() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
            )
            (current,) = conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM schema_version"
            ).fetchone()
            if current > LATEST_VERSION:
                raise SchemaVersionError(
                    f"the job database {self.path} has schema version {current}; this release "
                    f"knows up to {LATEST_VERSION}: run a newer release or a fresh database"
                )
            now = _micros(self._now())
            for step in MIGRATIONS:
                if current < step.version <= target:
                    for statement in step.sqlite:
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                        (step.version, step.name, now),
                    )
                    current = step.version
            return int(current)

    # -- jobs -----------------------------------------------------------------------------------

    def create(
        self,
        *,
        media_path: str,
        owns_media: bool,
        options: dict[str, Any],
        media_seconds: float | None,
    ) -> JobRecord:
        check_seconds("media_seconds", media_seconds)
        options_json = dump_json(options)
        with self._write() as conn:
            now = _micros(self._now())
            row = conn.execute(
                "INSERT INTO jobs (id, state, created_at, updated_at, media_path, owns_media,"
                " options, media_seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                (
                    new_job_id(),
                    JobState.QUEUED.value,
                    now,
                    now,
                    media_path,
                    int(owns_media),
                    options_json,
                    media_seconds,
                ),
            ).fetchone()
        record = self._record(row)
        assert record is not None
        return record

    def get(self, job_id: str) -> JobRecord | None:
        with self._read() as conn:
            return self._record(
                conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            )

    def list(
        self, *, limit: int, cursor: str | None, state: JobState | None = None
    ) -> tuple[list[JobRecord], str | None]:
        check_limit(limit)
        before = decode_cursor(cursor) if cursor is not None else None
        clauses: list[str] = []
        params: list[Any] = []
        if before is not None:
            clauses.append("seq < ?")
            params.append(before)
        if state is not None:
            clauses.append("state = ?")
            params.append(JobState(state).value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ?", (*params, limit + 1)
            ).fetchall()
        page = rows[:limit]
        next_cursor = encode_cursor(page[-1]["seq"]) if len(rows) > limit else None
        return [record_from_row(row, _moment) for row in page], next_cursor

    def count(self, state: JobState | None = None) -> int:
        with self._read() as conn:
            if state is None:
                (n,) = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()
            else:
                (n,) = conn.execute(
                    "SELECT COUNT(*) FROM jobs WHERE state = ?", (JobState(state).value,)
                ).fetchone()
        return int(n)

    # -- runners --------------------------------------------------------------------------------

    def claim(self, owner: str, lease_seconds: float) -> JobRecord | None:
        with self._write() as conn:
            now = self._now()
            expires = _micros(lease_until(now, lease_seconds))
            (seq,) = conn.execute(
                "SELECT MIN(seq) FROM ("
                " SELECT MIN(seq) AS seq FROM jobs WHERE state = 'queued'"
                " UNION ALL"
                " SELECT MIN(seq) FROM jobs WHERE state = 'running' AND lease_expires_at <= ?)",
                (_micros(now),),
            ).fetchone()
            if seq is None:
                return None
            row = conn.execute(
                "UPDATE jobs SET state = 'running', lease_owner = ?, lease_expires_at = ?,"
                " attempts = attempts + 1, started_at = COALESCE(started_at, ?), updated_at = ?"
                " WHERE seq = ? RETURNING *",
                (owner, expires, _micros(now), _micros(now), seq),
            ).fetchone()
        return self._record(row)

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        with self._write() as conn:
            now = self._now()
            cursor = conn.execute(
                "UPDATE jobs SET lease_expires_at = ?, updated_at = ?"
                " WHERE id = ? AND state = 'running' AND lease_owner = ?",
                (_micros(lease_until(now, lease_seconds)), _micros(now), job_id, owner),
            )
            return cursor.rowcount == 1

    def progress(
        self,
        job_id: str,
        owner: str,
        *,
        done_seconds: float,
        stage: str | None,
        media_seconds: float | None = None,
    ) -> bool:
        check_seconds("done_seconds", done_seconds)
        check_seconds("media_seconds", media_seconds)
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET done_seconds = ?, stage = ?,"
                " media_seconds = COALESCE(?, media_seconds), updated_at = ?"
                " WHERE id = ? AND state = 'running' AND lease_owner = ?",
                (done_seconds, stage, media_seconds, _micros(self._now()), job_id, owner),
            )
            return cursor.rowcount == 1

    def add_segment(self, job_id: str, owner: str, index: int, segment: dict[str, Any]) -> bool:
        segment_json = dump_json(segment)
        with self._write() as conn:
            held = conn.execute(
                "SELECT 1 FROM jobs WHERE id = ? AND state = 'running' AND lease_owner = ?",
                (job_id, owner),
            ).fetchone()
            if held is None:
                return False
            conn.execute(
                "INSERT INTO job_segments (job_id, idx, segment) VALUES (?, ?, ?)"
                " ON CONFLICT (job_id, idx) DO NOTHING",
                (job_id, index, segment_json),
            )
            return True

    def segments(self, job_id: str) -> builtins.list[dict[str, Any]]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT segment FROM job_segments WHERE job_id = ? ORDER BY idx", (job_id,)
            ).fetchall()
        return [load_json(row["segment"]) for row in rows]

    def finish(
        self,
        job_id: str,
        owner: str,
        state: JobState,
        *,
        error: dict[str, Any] | None = None,
    ) -> bool:
        check_finished(state)
        error_json = None if error is None else dump_json(error)
        with self._write() as conn:
            now = _micros(self._now())
            cursor = conn.execute(
                "UPDATE jobs SET state = ?, error = ?, finished_at = ?, updated_at = ?,"
                " lease_owner = NULL, lease_expires_at = NULL"
                " WHERE id = ? AND state = 'running' AND lease_owner = ?",
                (JobState(state).value, error_json, now, now, job_id, owner),
            )
            return cursor.rowcount == 1

    def release(self, job_id: str, owner: str) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL,"
                " updated_at = ? WHERE id = ? AND state = 'running' AND lease_owner = ?",
                (_micros(self._now()), job_id, owner),
            )
            return cursor.rowcount == 1

    # -- clients --------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> JobRecord | None:
        with self._write() as conn:
            now = _micros(self._now())
            conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?,"
                " lease_owner = NULL, lease_expires_at = NULL"
                " WHERE id = ? AND state IN ('queued', 'running')",
                (now, now, job_id),
            )
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._record(row)

    def delete(self, job_id: str) -> bool:
        with self._write() as conn:
            conn.execute("DELETE FROM job_segments WHERE job_id = ?", (job_id,))
            return conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount == 1

    def set_callback_state(self, job_id: str, state: str) -> None:
        check_callback_state(state)
        with self._write() as conn:
            conn.execute(
                "UPDATE jobs SET callback_state = ?, updated_at = ? WHERE id = ?",
                (state, _micros(self._now()), job_id),
            )

    def expired(self, finished_before: datetime, limit: int) -> builtins.list[JobRecord]:
        check_limit(limit)
        if finished_before.tzinfo is None:
            raise ValueError("finished_before must be timezone-aware")
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT * FROM jobs WHERE state IN ({', '.join('?' * len(_FINISHED))})"
                " AND finished_at < ? ORDER BY finished_at, seq LIMIT ?",
                (*_FINISHED, _micros(finished_before), limit),
            ).fetchall()
        return [record_from_row(row, _moment) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
