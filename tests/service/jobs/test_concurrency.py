"""Exclusivity across real processes: runner processes claiming from one database (a SQLite
file, a PostgreSQL server) never take the same job, and a runner killed with SIGKILL loses its
job to another only once its lease has lapsed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from helpers import REPO, wait_until

from service.jobs.store import JobState, JobStore, open_store

WORKER = Path(__file__).with_name("claim_worker.py")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Worker:
    """A claim_worker.py process; its stdout lines are collected as they come."""

    def __init__(self, url: str, owner: str, lease_s: float, mode: str, *extra: str) -> None:
        self.owner = owner
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.popen = subprocess.Popen(
            [sys.executable, str(WORKER), url, owner, str(lease_s), mode, *extra],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.strip())

    def log_tail(self, chars: int = 3000) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-chars:]

    def exit_report(self) -> str | None:
        if self.popen.poll() is None or self.popen.returncode == 0:
            return None
        return f"{self.owner} exited with {self.popen.returncode}:\n{self.log_tail()}"

    def expect(self, prefix: str, count: int = 1, timeout: float = 60.0) -> list[str]:
        """Wait for ``count`` lines starting with ``prefix``; returns all such lines."""
        return wait_until(
            lambda: (
                (found := [ln for ln in self.lines if ln.startswith(prefix)])
                and len(found) >= count
                and found
            ),
            f"{count} {prefix!r} line(s) from {self.owner}",
            timeout,
            process=self,
        )

    def go(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write("go\n")
        self.popen.stdin.flush()

    def claims(self) -> list[tuple[str, datetime, int, datetime]]:
        """(job id, claim time, attempts, lease expiry) of each job it reported."""
        rows = []
        for line in self.lines:
            if line.startswith("claimed "):
                _, job_id, at, attempts, expires = line.split()
                rows.append(
                    (
                        job_id,
                        datetime.fromisoformat(at),
                        int(attempts),
                        datetime.fromisoformat(expires),
                    )
                )
        return rows

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(30)
        self.stderr.close()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


def test_two_processes_claim_every_job_exactly_once(
    store: JobStore, store_url: str, workers: list[Worker]
) -> None:
    ids = {
        store.create(media_path=f"/m/{n}.mp4", owns_media=False, options={}, media_seconds=None).id
        for n in range(200)
    }
    workers.extend(Worker(store_url, f"runner-{n}", 60, "drain") for n in range(2))
    for worker in workers:
        worker.expect("ready")
    for worker in workers:
        worker.go()
    for worker in workers:
        worker.expect("done", timeout=120)

    claimed = [job_id for worker in workers for job_id, *_ in worker.claims()]
    assert len(claimed) == len(set(claimed)) == 200
    assert set(claimed) == ids
    assert all(worker.claims() for worker in workers), "one process took every job"
    assert store.count(JobState.SUCCEEDED) == 200
    jobs, _ = store.list(limit=500, cursor=None)
    assert {job.attempts for job in jobs} == {1}
    for worker in workers:
        for job_id, *_ in worker.claims():
            assert store.segments(job_id) == [{"owner": worker.owner}]


def test_a_killed_runners_job_is_taken_over_after_its_lease_and_never_before(
    store: JobStore, store_url: str, workers: list[Worker]
) -> None:
    lease_s = 4.0
    held = store.create(media_path="/m/held.mp4", owns_media=False, options={}, media_seconds=None)
    holder = Worker(store_url, "holder", lease_s, "hold")
    workers.append(holder)
    holder.expect("ready")
    holder.go()
    holder.expect("claimed")
    ((held_id, _, attempts, expires),) = holder.claims()
    assert (held_id, attempts) == (held.id, 1)
    os.kill(holder.popen.pid, signal.SIGKILL)
    assert holder.popen.wait(30) == -signal.SIGKILL

    # The taker claims as fast as it can from before the lease lapses: a queued job at once,
    # the dead runner's job only once its lease is over.
    queued = store.create(media_path="/m/q.mp4", owns_media=False, options={}, media_seconds=None)
    taker = Worker(store_url, "taker", 30, "poll", "2")
    workers.append(taker)
    taker.expect("ready")
    taker.go()
    taker.expect("done", timeout=60)
    (first_id, first_at, _, _), (second_id, second_at, second_attempts, _) = taker.claims()
    assert first_id == queued.id
    assert first_at < expires, "the taker was not polling before the lease lapsed"
    assert second_id == held.id and second_attempts == 2
    assert second_at >= expires
    record = store.get(held.id)
    assert record is not None and record.state is JobState.SUCCEEDED and record.attempts == 2


def test_the_postgres_store_carries_on_after_the_server_restarts() -> None:
    from pg import PostgresServer

    server = PostgresServer.start()
    store = None
    try:
        store = open_store(server.create_database("jobs"))
        store.migrate()
        job = store.create(media_path="/m/a.mp4", owns_media=True, options={}, media_seconds=1.0)
        server.restart()  # the pool's connection is cut
        assert store.get(job.id) == job
        assert store.claim("runner", 30) is not None
        assert store.finish(job.id, "runner", JobState.SUCCEEDED)
    finally:
        if store is not None:
            store.close()
        server.stop()
