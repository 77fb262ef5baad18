"""The job store's contract, run on each backend against a real database (SQLite file,
PostgreSQL server): the same tests, the same answers."""

from __future__ import annotations

import math
import re
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
from jobstores import FakeClock

from service.errors import InvalidInputError
from service.jobs.migrations import LATEST_VERSION, MIGRATIONS
from service.jobs.store import (
    InvalidJobCursorError,
    JobRecord,
    JobState,
    JobStore,
    SchemaVersionError,
    UnsupportedStoreURLError,
    open_store,
)

OPTIONS: dict[str, Any] = {
    "window_seconds": 2.5,
    "attribution": True,
    "callback_url": "https://example.org/hook?a=1&b=2",
    "filename": "réunion – 2026.mp4",
    "nested": {"list": [1, 2.25, None, "x"], "empty": {}},
}


def new_job(store: JobStore, name: str = "clip.mp4", **options: Any) -> JobRecord:
    return store.create(
        media_path=f"/media/{name}", owns_media=True, options=options, media_seconds=None
    )


def raw_query(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` read past the store, straight from the database at ``url``."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return list(conn.execute(sql).fetchall())
    import psycopg

    with psycopg.connect(url) as conn:
        return list(conn.execute(sql).fetchall())


def raw_execute(url: str, sql: str) -> None:
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        with conn:
            conn.execute(sql)
        conn.close()
        return
    import psycopg

    with psycopg.connect(url) as conn:
        conn.execute(sql)


def index_names(url: str) -> set[str]:
    if url.startswith("sqlite:///"):
        rows = raw_query(url, "SELECT name FROM sqlite_master WHERE type = 'index'")
    else:
        rows = raw_query(url, "SELECT indexname FROM pg_indexes WHERE tablename = 'jobs'")
    return {row[0] for row in rows}


# -- schema ---------------------------------------------------------------------------------------


def test_migrations_are_numbered_one_by_one_and_cover_both_backends() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, LATEST_VERSION + 1))
    for migration in MIGRATIONS:
        assert migration.sqlite and migration.postgres


def test_migrate_builds_the_schema_once(
    open_test_store: Callable[[], JobStore], store_url: str
) -> None:
    store = open_test_store()
    assert store.migrate() == LATEST_VERSION
    job = new_job(store)
    # Again, and from a second store on the same database (a second process starting).
    assert store.migrate() == LATEST_VERSION
    assert open_test_store().migrate() == LATEST_VERSION
    assert store.get(job.id) == job
    versions = raw_query(store_url, "SELECT version FROM schema_version ORDER BY version")
    assert [v for (v,) in versions] == list(range(1, LATEST_VERSION + 1))


def test_a_version_1_database_is_upgraded_with_its_jobs(
    open_test_store: Callable[[], JobStore], store_url: str, clock: FakeClock
) -> None:
    old = open_test_store()
    assert old.migrate(target=1) == 1
    assert "jobs_state_seq" not in index_names(store_url)
    queued = new_job(old, "a.mp4", **OPTIONS)
    running = new_job(old, "b.mp4")
    assert old.claim("runner-1", 30) == old.get(queued.id)
    assert old.add_segment(queued.id, "runner-1", 0, {"start": 0.0, "score": 0.5})
    old.close()

    new = open_test_store()
    assert new.migrate() == LATEST_VERSION
    assert {"jobs_state_seq", "jobs_finished_at"} <= index_names(store_url)
    upgraded = new.get(queued.id)
    assert upgraded is not None
    assert upgraded.options == OPTIONS and upgraded.state is JobState.RUNNING
    assert new.segments(queued.id) == [{"start": 0.0, "score": 0.5}]
    claimed = new.claim("runner-2", 30)
    assert claimed is not None and claimed.id == running.id


def test_a_newer_schema_is_refused(store: JobStore, store_url: str) -> None:
    raw_execute(
        store_url,
        f"INSERT INTO schema_version (version, name, applied_at) "
        f"VALUES ({LATEST_VERSION + 1}, 'from the future', 0)"
        if store_url.startswith("sqlite")
        else f"INSERT INTO schema_version (version, name) VALUES ({LATEST_VERSION + 1}, 'x')",
    )
    with pytest.raises(SchemaVersionError, match=f"version {LATEST_VERSION + 1}"):
        store.migrate()


def test_unknown_url_schemes_are_refused() -> None:
    with pytest.raises(UnsupportedStoreURLError, match="'mysql'"):
        open_store("mysql://user@host/db")
    for url in ("sqlite:///", "sqlite:////tmp/"):
        with pytest.raises(UnsupportedStoreURLError, match="names no file"):
            open_store(url)


def test_a_relative_sqlite_path_is_under_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///data/jobs.db")
    try:
        store.migrate()
    finally:
        store.close()
    assert (tmp_path / "data" / "jobs.db").is_file()


# -- records --------------------------------------------------------------------------------------


def test_create_stores_a_queued_job_with_its_options(store: JobStore, clock: FakeClock) -> None:
    job = store.create(
        media_path="/data/uploads/x.mp4", owns_media=True, options=OPTIONS, media_seconds=2400.5
    )
    assert re.fullmatch(r"[0-9a-f]{32}", job.id)
    assert job.state is JobState.QUEUED
    assert job.created_at == job.updated_at == clock.now
    assert job.created_at.tzinfo is not None and job.created_at.utcoffset() == timedelta(0)
    assert (job.started_at, job.finished_at, job.lease_owner, job.lease_expires_at) == (None,) * 4
    assert (job.media_path, job.owns_media, job.media_seconds) == (
        "/data/uploads/x.mp4",
        True,
        2400.5,
    )
    assert (job.done_seconds, job.stage, job.error, job.attempts) == (0.0, None, None, 0)
    assert job.callback_state is None
    assert store.get(job.id) == job
    assert job.options == OPTIONS and job.options is not OPTIONS

    other = store.create(
        media_path="/import/y.wav", owns_media=False, options={}, media_seconds=None
    )
    assert other.id != job.id
    assert store.get(other.id) == other and other.owns_media is False


def test_get_of_an_unknown_job_is_none(store: JobStore) -> None:
    assert store.get("0" * 32) is None
    assert store.get("'; DROP TABLE jobs; --") is None


def test_options_that_are_not_json_are_refused_and_nothing_is_stored(store: JobStore) -> None:
    with pytest.raises(ValueError):
        store.create(media_path="/m", owns_media=True, options={"x": math.nan}, media_seconds=None)
    with pytest.raises(TypeError):
        store.create(media_path="/m", owns_media=True, options={"x": object()}, media_seconds=None)
    assert store.count() == 0


def test_list_pages_newest_first_and_new_jobs_do_not_shift_pages(
    store: JobStore, clock: FakeClock
) -> None:
    jobs = []
    for n in range(7):
        jobs.append(new_job(store, f"{n}.mp4"))
        clock.advance(1)
    newest_first = [job.id for job in reversed(jobs)]

    page, cursor = store.list(limit=3, cursor=None)
    assert [job.id for job in page] == newest_first[:3] and cursor is not None
    assert page[0] == store.get(page[0].id)
    new_job(store, "late-1.mp4")  # arrives between pages: it belongs before page 1
    page, cursor = store.list(limit=3, cursor=cursor)
    assert [job.id for job in page] == newest_first[3:6] and cursor is not None
    new_job(store, "late-2.mp4")
    page, last = store.list(limit=3, cursor=cursor)
    assert [job.id for job in page] == newest_first[6:] and last is None

    everything, none = store.list(limit=100, cursor=None)
    assert len(everything) == 9 and none is None
    page, cursor = store.list(limit=9, cursor=None)
    assert len(page) == 9 and cursor is None


def test_list_and_count_by_state(store: JobStore) -> None:
    first, second, third = (new_job(store, f"{n}.mp4") for n in range(3))
    assert store.claim("runner", 30) is not None  # first
    assert store.cancel(third.id) is not None
    assert store.count() == 3
    assert store.count(JobState.QUEUED) == 1
    assert store.count(JobState.RUNNING) == 1
    assert store.count(JobState.SUCCEEDED) == 0
    assert [j.id for j in store.list(limit=10, cursor=None, state=JobState.RUNNING)[0]] == [
        first.id
    ]
    page, cursor = store.list(limit=1, cursor=None, state=JobState.QUEUED)
    assert [j.id for j in page] == [second.id] and cursor is None


@pytest.mark.parametrize("cursor", ["", "j", "jx", "12", "j-1", "j" + "9" * 30, "j١٢"])
def test_a_cursor_not_handed_out_is_a_client_error(store: JobStore, cursor: str) -> None:
    new_job(store)
    with pytest.raises(InvalidJobCursorError) as raised:
        store.list(limit=5, cursor=cursor)
    assert isinstance(raised.value, InvalidInputError)  # answered 422, like other bad input


# -- claiming and leases --------------------------------------------------------------------------


def test_claim_takes_the_oldest_queued_job_once(store: JobStore, clock: FakeClock) -> None:
    jobs = [new_job(store, f"{n}.mp4") for n in range(3)]
    clock.advance(5)
    claimed = [store.claim(f"runner-{n}", 30) for n in range(3)]
    assert [job.id for job in claimed if job] == [job.id for job in jobs]
    assert store.claim("runner-3", 30) is None
    first = claimed[0]
    assert first is not None
    assert first.state is JobState.RUNNING and first.attempts == 1
    assert first.lease_owner == "runner-0"
    assert first.started_at == clock.now
    assert first.lease_expires_at == clock.now + timedelta(seconds=30)
    assert store.get(first.id) == first


def test_a_lapsed_lease_is_claimed_again_and_never_before(
    store: JobStore, clock: FakeClock
) -> None:
    job = new_job(store)
    held = store.claim("dead-runner", 10)
    assert held is not None
    started = held.started_at
    clock.advance(9.999)
    assert store.claim("other", 10) is None
    clock.advance(0.001)
    taken = store.claim("other", 10)
    assert taken is not None and taken.id == job.id
    assert taken.attempts == 2 and taken.lease_owner == "other"
    assert taken.started_at == started  # when it first started: the queue wait stays true

    # The first runner's writes are refused from now on; the new owner's go through.
    assert store.renew(job.id, "dead-runner", 10) is False
    assert store.progress(job.id, "dead-runner", done_seconds=5, stage="asr") is False
    assert store.add_segment(job.id, "dead-runner", 0, {"stale": True}) is False
    assert store.finish(job.id, "dead-runner", JobState.SUCCEEDED) is False
    assert store.segments(job.id) == []
    assert store.progress(job.id, "other", done_seconds=5, stage="asr") is True
    record = store.get(job.id)
    assert record is not None and record.state is JobState.RUNNING
    assert (record.done_seconds, record.stage, record.lease_owner) == (5.0, "asr", "other")


def test_renew_keeps_the_job(store: JobStore, clock: FakeClock) -> None:
    job = new_job(store)
    assert store.claim("runner", 10) is not None
    clock.advance(8)
    assert store.renew(job.id, "runner", 10) is True
    renewed = store.get(job.id)
    assert renewed is not None and renewed.lease_expires_at == clock.now + timedelta(seconds=10)
    clock.advance(8)  # 16 s after the claim, 8 s after the renewal
    assert store.claim("other", 10) is None
    clock.advance(2)
    assert store.claim("other", 10) is not None


def test_a_queued_job_cannot_be_renewed_or_written(store: JobStore) -> None:
    job = new_job(store)
    assert store.renew(job.id, "runner", 10) is False
    assert store.progress(job.id, "runner", done_seconds=1, stage=None) is False
    assert store.add_segment(job.id, "runner", 0, {}) is False
    assert store.finish(job.id, "runner", JobState.FAILED) is False
    assert store.renew("0" * 32, "runner", 10) is False
    assert store.get(job.id) == job


@pytest.mark.parametrize("lease", [0, -1, math.nan, math.inf])
def test_a_lease_must_be_a_positive_time(store: JobStore, lease: float) -> None:
    job = new_job(store)
    with pytest.raises(ValueError, match="lease"):
        store.claim("runner", lease)
    assert store.get(job.id) == job


def test_progress_records_the_media_length_once_known(store: JobStore, clock: FakeClock) -> None:
    job = new_job(store)
    assert store.claim("runner", 30) is not None
    clock.advance(3)
    assert store.progress(job.id, "runner", done_seconds=0, stage="decode", media_seconds=3600)
    assert store.progress(job.id, "runner", done_seconds=120.5, stage="model")
    record = store.get(job.id)
    assert record is not None
    assert (record.media_seconds, record.done_seconds, record.stage) == (3600.0, 120.5, "model")
    assert record.updated_at == clock.now


# -- segments -------------------------------------------------------------------------------------


def test_segments_are_stored_once_each_and_read_in_order(store: JobStore) -> None:
    job = new_job(store)
    assert store.claim("runner", 30) is not None
    segments = [
        {"start": 10.0 * n, "end": 10.0 * n + 10, "score": -0.5 + n / 4, "label": "neutral"}
        for n in range(3)
    ]
    segments[1]["emotions"] = {"happy": 0.25, "sad": 0.125, "nested": [1, {"deep": None}]}
    for index in (2, 0, 1):
        assert store.add_segment(job.id, "runner", index, segments[index])
    # Written again after a restart: the first write stays.
    assert store.add_segment(job.id, "runner", 1, {"start": -1.0}) is True
    assert store.segments(job.id) == segments
    assert store.segments("0" * 32) == []


def test_segments_of_one_job_are_not_another_jobs(store: JobStore) -> None:
    first, second = new_job(store), new_job(store)
    assert store.claim("a", 30) is not None and store.claim("b", 30) is not None
    assert store.add_segment(first.id, "a", 0, {"job": "first"})
    assert store.add_segment(second.id, "b", 0, {"job": "second"})
    assert store.add_segment(second.id, "a", 1, {"job": "wrong owner"}) is False
    assert store.segments(first.id) == [{"job": "first"}]
    assert store.segments(second.id) == [{"job": "second"}]


# -- the end of a job -----------------------------------------------------------------------------


def test_finish_ends_the_job_and_releases_the_lease(store: JobStore, clock: FakeClock) -> None:
    ok, bad = new_job(store), new_job(store)
    assert store.claim("runner", 30) is not None and store.claim("runner", 30) is not None
    clock.advance(60)
    assert store.finish(ok.id, "runner", JobState.SUCCEEDED) is True
    error = {"type": "undecodable_media", "message": "no audio or video stream"}
    assert store.finish(bad.id, "runner", JobState.FAILED, error=error) is True
    done, failed = store.get(ok.id), store.get(bad.id)
    assert done is not None and failed is not None
    assert done.state is JobState.SUCCEEDED and done.error is None
    assert done.finished_at == clock.now
    assert (done.lease_owner, done.lease_expires_at) == (None, None)
    assert failed.state is JobState.FAILED and failed.error == error
    # A finished job is no one's: not finished again, not claimed, not written.
    assert store.finish(ok.id, "runner", JobState.FAILED) is False
    assert store.add_segment(ok.id, "runner", 0, {}) is False
    clock.advance(3600)
    assert store.claim("other", 30) is None
    assert store.get(ok.id) == done


@pytest.mark.parametrize("state", [JobState.QUEUED, JobState.RUNNING])
def test_finish_takes_only_a_final_state(store: JobStore, state: JobState) -> None:
    job = new_job(store)
    claimed = store.claim("runner", 30)
    with pytest.raises(ValueError, match="finishes"):
        store.finish(job.id, "runner", state)
    assert store.get(job.id) == claimed


def test_cancel_a_queued_job(store: JobStore, clock: FakeClock) -> None:
    job = new_job(store)
    clock.advance(2)
    cancelled = store.cancel(job.id)
    assert cancelled is not None and cancelled.state is JobState.CANCELLED
    assert cancelled.finished_at == clock.now
    assert store.get(job.id) == cancelled
    assert store.claim("runner", 30) is None


def test_a_running_job_cancelled_refuses_its_runner(store: JobStore, clock: FakeClock) -> None:
    job = new_job(store)
    assert store.claim("runner", 30) is not None
    assert store.add_segment(job.id, "runner", 0, {"n": 0})
    cancelled = store.cancel(job.id)
    assert cancelled is not None and cancelled.state is JobState.CANCELLED
    assert cancelled.lease_owner is None
    assert store.renew(job.id, "runner", 30) is False
    assert store.progress(job.id, "runner", done_seconds=20, stage="model") is False
    assert store.add_segment(job.id, "runner", 1, {"n": 1}) is False
    assert store.finish(job.id, "runner", JobState.SUCCEEDED) is False
    assert store.get(job.id) == cancelled
    assert store.segments(job.id) == [{"n": 0}]
    clock.advance(3600)
    assert store.claim("other", 30) is None


def test_cancel_leaves_a_finished_job_as_it_is(store: JobStore) -> None:
    job = new_job(store)
    assert store.claim("runner", 30) is not None
    assert store.finish(job.id, "runner", JobState.SUCCEEDED)
    done = store.get(job.id)
    assert store.cancel(job.id) == done
    assert store.cancel("0" * 32) is None


def test_delete_removes_the_job_and_its_segments(store: JobStore, store_url: str) -> None:
    job, kept = new_job(store), new_job(store)
    assert store.claim("runner", 30) is not None
    assert store.add_segment(job.id, "runner", 0, {"n": 0})
    assert store.delete(job.id) is True
    assert store.get(job.id) is None and store.segments(job.id) == []
    assert raw_query(store_url, "SELECT COUNT(*) FROM job_segments") == [(0,)]
    assert store.delete(job.id) is False
    assert store.get(kept.id) == kept and store.count() == 1
    # The runner of a deleted job is refused like one of a cancelled job.
    assert store.add_segment(job.id, "runner", 1, {"n": 1}) is False
    assert store.renew(job.id, "runner", 30) is False


def test_callback_state_is_recorded(store: JobStore) -> None:
    job = new_job(store)
    for state in ("pending", "failed", "delivered"):
        store.set_callback_state(job.id, state)
        record = store.get(job.id)
        assert record is not None and record.callback_state == state
    with pytest.raises(ValueError, match="callback state"):
        store.set_callback_state(job.id, "lost")
    record = store.get(job.id)
    assert record is not None and record.callback_state == "delivered"


def test_expired_lists_jobs_that_finished_before_the_cutoff(
    store: JobStore, clock: FakeClock
) -> None:
    start = clock.now
    running, done, failed, cancelled, recent = (new_job(store) for _ in range(5))
    for _ in range(5):
        assert store.claim("runner", 1e6) is not None
    queued = new_job(store)
    clock.advance(10)
    assert store.finish(failed.id, "runner", JobState.FAILED, error={"type": "x", "message": "y"})
    clock.advance(10)
    assert store.finish(done.id, "runner", JobState.SUCCEEDED)
    clock.advance(10)
    assert store.cancel(cancelled.id) is not None
    clock.advance(10)
    assert store.finish(recent.id, "runner", JobState.SUCCEEDED)
    cutoff = start + timedelta(seconds=35)

    old = store.expired(cutoff, limit=10)
    assert [job.id for job in old] == [failed.id, done.id, cancelled.id]
    assert [job.id for job in store.expired(cutoff, limit=2)] == [failed.id, done.id]
    assert store.expired(start + timedelta(seconds=10), limit=10) == []
    later = store.expired(cutoff + timedelta(days=365), limit=10)
    assert {job.id for job in later} == {failed.id, done.id, cancelled.id, recent.id}
    assert queued.id not in {job.id for job in later} and running.id not in {
        job.id for job in later
    }
    assert all(job.finished_at is not None for job in later)
    with pytest.raises(ValueError, match="timezone"):
        store.expired(cutoff.replace(tzinfo=None), limit=10)


def test_every_time_is_timezone_aware_utc(store: JobStore, clock: FakeClock) -> None:
    clock.now = clock.now.astimezone(UTC)
    job = new_job(store)
    assert store.claim("runner", 30) is not None
    clock.advance(1.5)
    assert store.finish(job.id, "runner", JobState.SUCCEEDED)
    record = store.get(job.id)
    assert record is not None
    times = [record.created_at, record.updated_at, record.started_at, record.finished_at]
    for moment in times:
        assert moment is not None and moment.utcoffset() == timedelta(0)
    assert record.finished_at == clock.now  # microseconds kept
    assert record.finished_at - record.created_at == timedelta(seconds=1.5)


def test_a_naive_clock_is_refused(
    open_test_store: Callable[[], JobStore], clock: FakeClock
) -> None:
    store = open_test_store()
    store.migrate()
    clock.now = clock.now.replace(tzinfo=None)
    with pytest.raises(ValueError, match="timezone-aware"):
        new_job(store)
    assert store.count() == 0


def test_release_hands_a_running_job_back_at_once(store: JobStore, clock: FakeClock) -> None:
    first, second = new_job(store), new_job(store)
    claimed = store.claim("stopping", 30)
    assert claimed is not None and claimed.id == first.id
    assert store.add_segment(first.id, "stopping", 0, {"n": 0})
    assert store.progress(first.id, "stopping", done_seconds=30, stage="model", media_seconds=90)
    assert store.release(first.id, "other") is False
    clock.advance(1)
    assert store.release(first.id, "stopping") is True
    released = store.get(first.id)
    assert released is not None and released.state is JobState.QUEUED
    assert (released.lease_owner, released.lease_expires_at) == (None, None)
    assert released.started_at == claimed.started_at and released.attempts == 1
    assert (released.done_seconds, released.media_seconds) == (30.0, 90.0)
    assert store.release(first.id, "stopping") is False  # not running any more
    assert store.add_segment(first.id, "stopping", 1, {"n": 1}) is False

    # Taken again before the later job, with its segments, and without waiting for the lease.
    again = store.claim("next-start", 30)
    assert again is not None and again.id == first.id and again.attempts == 2
    assert store.segments(first.id) == [{"n": 0}]
    taken = store.claim("next-start", 30)
    assert taken is not None and taken.id == second.id


def test_threads_sharing_one_store_claim_each_job_once(store: JobStore) -> None:
    ids = {new_job(store, f"{n}.mp4").id for n in range(60)}
    claimed: list[list[str]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def work(n: int) -> None:
        start.wait()
        while (job := store.claim(f"thread-{n}", 60)) is not None:
            claimed[n].append(job.id)
            assert store.add_segment(job.id, f"thread-{n}", 0, {"thread": n})
            assert store.finish(job.id, f"thread-{n}", JobState.SUCCEEDED)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    everything = [job_id for ids_of_one in claimed for job_id in ids_of_one]
    assert len(everything) == len(set(everything)) == 60 and set(everything) == ids
    assert store.count(JobState.SUCCEEDED) == 60


def test_stores_starting_together_migrate_once(
    open_test_store: Callable[[], JobStore], store_url: str
) -> None:
    stores = [open_test_store() for _ in range(3)]
    start = threading.Barrier(3)

    def migrate(store: JobStore) -> int:
        start.wait()
        return store.migrate()

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(migrate, stores)) == [LATEST_VERSION] * 3
    versions = raw_query(store_url, "SELECT version FROM schema_version ORDER BY version")
    assert [v for (v,) in versions] == list(range(1, LATEST_VERSION + 1))
    job = new_job(stores[0])
    assert stores[2].get(job.id) == job


def test_an_unreachable_postgres_is_a_clear_error_without_the_password() -> None:
    from helpers import free_port

    from service.jobs.postgres import PostgresJobStore
    from service.jobs.store import JobStoreError

    url = f"postgresql://cmamba:s3cret@127.0.0.1:{free_port()}/jobs"
    with pytest.raises(JobStoreError, match="cannot connect") as raised:
        PostgresJobStore(url, connect_timeout_s=1.0)
    message = str(raised.value)
    assert "s3cret" not in message and "cmamba:***@127.0.0.1" in message


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -1.0])
def test_media_times_must_be_finite_seconds(store: JobStore, seconds: float) -> None:
    with pytest.raises(ValueError, match="media_seconds"):
        store.create(media_path="/m", owns_media=True, options={}, media_seconds=seconds)
    job = new_job(store)
    assert store.claim("runner", 30) is not None
    with pytest.raises(ValueError, match="done_seconds"):
        store.progress(job.id, "runner", done_seconds=seconds, stage="model")
    with pytest.raises(ValueError, match="media_seconds"):
        store.progress(job.id, "runner", done_seconds=1, stage="model", media_seconds=seconds)
    record = store.get(job.id)
    assert record is not None and (record.done_seconds, record.media_seconds) == (0.0, None)
    assert store.count() == 1
