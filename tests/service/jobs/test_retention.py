"""Retention on each backend, with real files: old finished jobs go, with the files they own."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from jobstores import FakeClock

from service.jobs.retention import Purged, purge_expired, remove_file
from service.jobs.store import JobRecord, JobState, JobStore

WEEK = timedelta(days=7)


def job_with_file(
    store: JobStore, folder: Path, name: str, *, owns_media: bool = True
) -> tuple[JobRecord, Path]:
    media = folder / name
    media.write_bytes(b"\x00" * 1024)
    job = store.create(media_path=str(media), owns_media=owns_media, options={}, media_seconds=None)
    return job, media


def run_and_finish(store: JobStore, job: JobRecord, state: JobState = JobState.SUCCEEDED) -> None:
    claimed = store.claim("runner", 1e7)
    assert claimed is not None and claimed.id == job.id
    assert store.add_segment(job.id, "runner", 0, {"score": 0.1})
    assert store.finish(job.id, "runner", state)


def test_old_finished_jobs_and_their_own_files_are_deleted(
    store: JobStore, clock: FakeClock, tmp_path: Path
) -> None:
    uploads, imports = tmp_path / "uploads", tmp_path / "import"
    uploads.mkdir()
    imports.mkdir()
    done, done_file = job_with_file(store, uploads, "done.mp4")
    run_and_finish(store, done)
    failed, failed_file = job_with_file(store, uploads, "failed.mp4")
    run_and_finish(store, failed, JobState.FAILED)
    imported, imported_file = job_with_file(store, imports, "meeting.mp4", owns_media=False)
    run_and_finish(store, imported)
    cancelled, cancelled_file = job_with_file(store, uploads, "cancelled.mp4")
    assert store.cancel(cancelled.id) is not None
    clock.advance(WEEK.total_seconds() - 60)
    recent, recent_file = job_with_file(store, uploads, "recent.mp4")
    run_and_finish(store, recent)
    # Old but not finished: a long job still running and one still waiting keep everything.
    queued, queued_file = job_with_file(store, uploads, "queued.mp4")
    clock.advance(120)  # the first four ended a week and a minute ago

    purged = purge_expired(store, WEEK, clock.now)

    assert purged == Purged(jobs=4, files=3, failed=0)
    for job in (done, failed, imported, cancelled):
        assert store.get(job.id) is None and store.segments(job.id) == []
    assert not done_file.exists() and not failed_file.exists() and not cancelled_file.exists()
    assert imported_file.exists()  # the import folder's file is not the job's to delete
    assert store.get(recent.id) is not None and recent_file.exists()
    assert store.segments(recent.id) == [{"score": 0.1}]
    assert store.get(queued.id) is not None and queued_file.exists()
    assert sorted(p.name for p in uploads.iterdir()) == ["queued.mp4", "recent.mp4"]
    # Nothing left to do the second time.
    assert purge_expired(store, WEEK, clock.now) == Purged(jobs=0, files=0, failed=0)


def test_a_file_already_gone_does_not_stop_the_purge(
    store: JobStore, clock: FakeClock, tmp_path: Path
) -> None:
    job, media = job_with_file(store, tmp_path, "gone.mp4")
    run_and_finish(store, job)
    media.unlink()
    clock.advance(WEEK.total_seconds() + 1)
    assert purge_expired(store, WEEK, clock.now).jobs == 1
    assert store.get(job.id) is None


def test_a_file_that_cannot_be_deleted_keeps_its_job_for_the_next_purge(
    store: JobStore, clock: FakeClock, tmp_path: Path
) -> None:
    jobs = []
    for n in range(5):
        job, media = job_with_file(store, tmp_path, f"{n}.mp4")
        run_and_finish(store, job)
        jobs.append((job, media))
    clock.advance(WEEK.total_seconds() + 1)
    stuck = {str(jobs[0][1]), str(jobs[3][1])}

    def flaky_delete(path: str) -> None:
        if path in stuck:
            raise PermissionError(13, "Permission denied", path)
        remove_file(path)

    # A batch smaller than the failures: the purge reads past the stuck jobs.
    purged = purge_expired(store, WEEK, clock.now, flaky_delete, batch=2)
    assert purged == Purged(jobs=3, files=3, failed=2)
    assert [store.get(job.id) is not None for job, _ in jobs] == [True, False, False, True, False]
    assert [media.exists() for _, media in jobs] == [True, False, False, True, False]

    stuck.clear()
    assert purge_expired(store, WEEK, clock.now, flaky_delete) == Purged(jobs=2, files=2, failed=0)
    assert store.count() == 0 and list(tmp_path.glob("*.mp4")) == []


def test_many_expired_jobs_are_purged_in_batches(
    store: JobStore, clock: FakeClock, tmp_path: Path
) -> None:
    deleted: list[str] = []
    delete: Callable[[str], None] = deleted.append
    for n in range(7):
        job, _ = job_with_file(store, tmp_path, f"{n}.mp4")
        run_and_finish(store, job)
    clock.advance(WEEK.total_seconds() + 1)
    assert purge_expired(store, WEEK, clock.now, delete, batch=3) == Purged(7, 7, 0)
    assert sorted(Path(p).name for p in deleted) == [f"{n}.mp4" for n in range(7)]
    assert store.count() == 0


def test_now_must_be_timezone_aware(store: JobStore, clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="timezone"):
        purge_expired(store, WEEK, clock.now.replace(tzinfo=None))
