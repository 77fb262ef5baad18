"""The job store on PostgreSQL: several service replicas share one queue.

Connections come from a small pool (psycopg 3, psycopg_pool), each checked before use so a
restarted database server costs no failed call. A claim is one statement: it picks the oldest
claimable row with ``FOR UPDATE SKIP LOCKED`` (a row another claim is taking is skipped, not
waited for) and marks it in the same statement, so two replicas never take the same job. A
runner's writes hold the job's row lock (``FOR SHARE``) while they check its lease, so a cancel
or a take-over cannot slip in between. Migrations run under a transaction-scoped advisory lock:
replicas starting together apply each step once.

Times are stamped by the store's clock (the service host's UTC clock), like the SQLite store:
replicas on several hosts need their clocks in step (NTP) to within a small part of the lease.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from service.jobs.migrations import LATEST_VERSION, MIGRATIONS
from service.jobs.store import (
    FINISHED_STATES,
    Clock,
    JobRecord,
    JobState,
    JobStoreError,
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

MIGRATION_LOCK = 0x636D616D6261  # "cmamba": the advisory lock key migrations hold
_FINISHED = [str(state) for state in sorted(FINISHED_STATES)]


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class PostgresJobStore:
    """:class:`service.jobs.store.JobStore` on the PostgreSQL database at ``url``."""

    def __init__(
        self,
        url: str,
        *,
        clock: Clock = utc_now,
        max_connections: int = 8,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self._clock = clock
        self._url = redacted(url)
        self._pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"row_factory": dict_row, "connect_timeout": max(1, round(connect_timeout_s))},
            connection_class=psycopg.Connection[dict[str, Any]],
            check=ConnectionPool.check_connection,
            timeout=connect_timeout_s,
            name="cmamba-jobs",
            open=False,
        )
        self._pool.open()
        try:
            self._pool.wait(timeout=connect_timeout_s)
        except PoolTimeout as exc:
            self._pool.close()
            raise JobStoreError(
                f"cannot connect to the job database {self._url} within {connect_timeout_s:g} s"
            ) from exc

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """A pooled connection in one transaction (committed at the end, rolled back on error)."""
        with self._pool.connection() as conn, conn.transaction():
            yield conn

    def _now(self) -> datetime:
        return checked_now(self._clock)

    @staticmethod
    def _record(row: dict[str, Any] | None) -> JobRecord | None:
        return None if row is None else record_from_row(row, _utc)

    # -- schema ---------------------------------------------------------------------------------

    def migrate(self, *, target: int = LATEST_VERSION) -> int:
        """Apply the migrations up to ``target`` (tests stop early to build old databases)."""
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
                " name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            row = conn.execute(
                "SELECT COALESCE(MAX(version), 0) AS version FROM schema_version"
            ).fetchone()
            current = int(row["version"]) if row else 0
            if current > LATEST_VERSION:
                raise SchemaVersionError(
                    f"the job database {self._url} has schema version {current}; this release "
                    f"knows up to {LATEST_VERSION}: run a newer release or a fresh database"
                )
            for step in MIGRATIONS:
                if current < step.version <= target:
                    for statement in step.postgres:
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_version (version, name, applied_at)"
                        " VALUES (%s, %s, %s)",
                        (step.version, step.name, self._now()),
                    )
                    current = step.version
            return current

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
        now = self._now()
        with self._transaction() as conn:
            row = conn.execute(
                "INSERT INTO jobs (id, state, created_at, updated_at, media_path, owns_media,"
                " options, media_seconds) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING *",
                (
                    new_job_id(),
                    JobState.QUEUED.value,
                    now,
                    now,
                    media_path,
                    owns_media,
                    options_json,
                    media_seconds,
                ),
            ).fetchone()
        record = self._record(row)
        assert record is not None
        return record

    def get(self, job_id: str) -> JobRecord | None:
        with self._transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()
        return self._record(row)

    def list(
        self, *, limit: int, cursor: str | None, state: JobState | None = None
    ) -> tuple[list[JobRecord], str | None]:
        check_limit(limit)
        before = decode_cursor(cursor) if cursor is not None else None
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs"
                " WHERE (%(before)s::bigint IS NULL OR seq < %(before)s)"
                " AND (%(state)s::text IS NULL OR state = %(state)s)"
                " ORDER BY seq DESC LIMIT %(limit)s",
                {
                    "before": before,
                    "state": None if state is None else JobState(state).value,
                    "limit": limit + 1,
                },
            ).fetchall()
        page = rows[:limit]
        next_cursor = encode_cursor(page[-1]["seq"]) if len(rows) > limit else None
        return [record_from_row(row, _utc) for row in page], next_cursor

    def count(self, state: JobState | None = None) -> int:
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT COUNT(*) AS n FROM jobs"
                " WHERE (%(state)s::text IS NULL OR state = %(state)s)",
                {"state": None if state is None else JobState(state).value},
            ).fetchone()
        return int(row["n"]) if row else 0

    # -- runners --------------------------------------------------------------------------------

    def claim(self, owner: str, lease_seconds: float) -> JobRecord | None:
        now = self._now()
        expires = lease_until(now, lease_seconds)
        with self._transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET state = 'running', lease_owner = %(owner)s,"
                " lease_expires_at = %(expires)s, attempts = attempts + 1,"
                " started_at = COALESCE(started_at, %(now)s), updated_at = %(now)s"
                " WHERE seq = ("
                "  SELECT seq FROM jobs"
                "  WHERE state = 'queued' OR (state = 'running' AND lease_expires_at <= %(now)s)"
                "  ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)"
                " RETURNING *",
                {"owner": owner, "expires": expires, "now": now},
            ).fetchone()
        return self._record(row)

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        now = self._now()
        expires = lease_until(now, lease_seconds)
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET lease_expires_at = %s, updated_at = %s"
                " WHERE id = %s AND state = 'running' AND lease_owner = %s",
                (expires, now, job_id, owner),
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
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET done_seconds = %s, stage = %s,"
                " media_seconds = COALESCE(%s, media_seconds), updated_at = %s"
                " WHERE id = %s AND state = 'running' AND lease_owner = %s",
                (done_seconds, stage, media_seconds, self._now(), job_id, owner),
            )
            return cursor.rowcount == 1

    def add_segment(self, job_id: str, owner: str, index: int, segment: dict[str, Any]) -> bool:
        segment_json = dump_json(segment)
        with self._transaction() as conn:
            held = conn.execute(
                "SELECT 1 FROM jobs WHERE id = %s AND state = 'running' AND lease_owner = %s"
                " FOR SHARE",
                (job_id, owner),
            ).fetchone()
            if held is None:
                return False
            conn.execute(
                "INSERT INTO job_segments (job_id, idx, segment) VALUES (%s, %s, %s)"
                " ON CONFLICT (job_id, idx) DO NOTHING",
                (job_id, index, segment_json),
            )
            return True

    def segments(self, job_id: str) -> builtins.list[dict[str, Any]]:
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT segment FROM job_segments WHERE job_id = %s ORDER BY idx", (job_id,)
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
        now = self._now()
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET state = %s, error = %s, finished_at = %s, updated_at = %s,"
                " lease_owner = NULL, lease_expires_at = NULL"
                " WHERE id = %s AND state = 'running' AND lease_owner = %s",
                (JobState(state).value, error_json, now, now, job_id, owner),
            )
            return cursor.rowcount == 1

    def release(self, job_id: str, owner: str) -> bool:
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL,"
                " updated_at = %s WHERE id = %s AND state = 'running' AND lease_owner = %s",
                (self._now(), job_id, owner),
            )
            return cursor.rowcount == 1

    # -- clients --------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> JobRecord | None:
        now = self._now()
        with self._transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = %s, updated_at = %s,"
                " lease_owner = NULL, lease_expires_at = NULL"
                " WHERE id = %s AND state IN ('queued', 'running') RETURNING *",
                (now, now, job_id),
            ).fetchone()
            if row is None:
                row = conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()
        return self._record(row)

    def delete(self, job_id: str) -> bool:
        with self._transaction() as conn:
            conn.execute("DELETE FROM job_segments WHERE job_id = %s", (job_id,))
            return conn.execute("DELETE FROM jobs WHERE id = %s", (job_id,)).rowcount == 1

    def set_callback_state(self, job_id: str, state: str) -> None:
        check_callback_state(state)
        with self._transaction() as conn:
            conn.execute(
                "UPDATE jobs SET callback_state = %s, updated_at = %s WHERE id = %s",
                (state, self._now(), job_id),
            )

    def expired(self, finished_before: datetime, limit: int) -> builtins.list[JobRecord]:
        check_limit(limit)
        if finished_before.tzinfo is None:
            raise ValueError("finished_before must be timezone-aware")
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE state = ANY(%s) AND finished_at < %s"
                " ORDER BY finished_at, seq LIMIT %s",
                (_FINISHED, finished_before, limit),
            ).fetchall()
        return [record_from_row(row, _utc) for row in rows]

    def close(self) -> None:
        self._pool.close()
