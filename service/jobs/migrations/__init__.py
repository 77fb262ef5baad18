"""The job store's schema, as numbered steps applied in order (each once, recorded in the
``schema_version`` table).

Each step carries the same change for both backends, so a version number means one schema
everywhere. Never edit a released step: append a new one. A step's statements run in one
transaction with the row that records it.
"""

from __future__ import annotations

from dataclasses import dataclass

_STATES = "'queued', 'running', 'succeeded', 'failed', 'cancelled'"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        name="jobs and their timeline segments",
        # SQLite keeps times as integer microseconds since the epoch (UTC), which sort and
        # compare exactly; AUTOINCREMENT never reuses a seq, so paging cursors stay valid.
        sqlite=(
            f"""
            CREATE TABLE jobs (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                id TEXT NOT NULL UNIQUE,
                state TEXT NOT NULL CHECK (state IN ({_STATES})),
                created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL,
                started_at INTEGER,
                finished_at INTEGER,
                media_path TEXT NOT NULL,
                owns_media INTEGER NOT NULL,
                options TEXT NOT NULL,
                media_seconds REAL,
                done_seconds REAL NOT NULL DEFAULT 0,
                stage TEXT,
                error TEXT,
                attempts INTEGER NOT NULL DEFAULT 0,
                lease_owner TEXT,
                lease_expires_at INTEGER,
                callback_state TEXT
            )
            """,
            """
            CREATE TABLE job_segments (
                job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
                idx INTEGER NOT NULL,
                segment TEXT NOT NULL,
                PRIMARY KEY (job_id, idx)
            ) WITHOUT ROWID
            """,
        ),
        postgres=(
            f"""
            CREATE TABLE jobs (
                seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
                id TEXT PRIMARY KEY,
                state TEXT NOT NULL CHECK (state IN ({_STATES})),
                created_at TIMESTAMPTZ NOT NULL,
                updated_at TIMESTAMPTZ NOT NULL,
                started_at TIMESTAMPTZ,
                finished_at TIMESTAMPTZ,
                media_path TEXT NOT NULL,
                owns_media BOOLEAN NOT NULL,
                options TEXT NOT NULL,
                media_seconds DOUBLE PRECISION,
                done_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
                stage TEXT,
                error TEXT,
                attempts INTEGER NOT NULL DEFAULT 0,
                lease_owner TEXT,
                lease_expires_at TIMESTAMPTZ,
                callback_state TEXT
            )
            """,
            """
            CREATE TABLE job_segments (
                job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
                idx INTEGER NOT NULL,
                segment TEXT NOT NULL,
                PRIMARY KEY (job_id, idx)
            )
            """,
        ),
    ),
    Migration(
        version=2,
        name="indexes for claiming, listing by state and retention",
        sqlite=(
            "CREATE INDEX jobs_state_seq ON jobs (state, seq)",
            "CREATE INDEX jobs_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL",
        ),
        postgres=(
            "CREATE INDEX jobs_state_seq ON jobs (state, seq)",
            "CREATE INDEX jobs_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version
