"""Jobs survive their server: a real ``cmamba serve`` process is killed (kill -9, and SIGTERM)
in the middle of a job and started again on the same database (SQLite and PostgreSQL); the job
resumes from its last stored part, queued jobs run, and the result equals that of a run without
a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ServerProcess, free_port, wait_until
from jobmedia import Receiver, audio_checkpoint, write_tone_wav

from service.jobs.store import JobState, open_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]

LONG_S = 150.0
SHORT_S = 20.0
PART_S = 5.0


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    return {
        "long": write_tone_wav(folder / "long.wav", LONG_S, seed=1),
        "short": write_tone_wav(folder / "short.wav", SHORT_S, seed=2),
        "ckpt": audio_checkpoint(folder / "ckpt"),
    }


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The job database of the test: a SQLite file (the default), or a fresh database on the
    session's PostgreSQL server when the test is parametrized with ``"postgres"``."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs' / 'jobs.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    name = f"jobs_{uuid.uuid4().hex[:16]}"
    yield server.create_database(name)
    server.drop_database(name)


@pytest.fixture
def servers(database_url: str) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(ckpt: Path, jobs_dir: Path, **extra: str) -> ServerProcess:
        server = ServerProcess(
            {
                **extra,
                "CMAMBA_MODEL_PATH": str(ckpt),
                "CMAMBA_JOBS_DIR": str(jobs_dir),
                "CMAMBA_JOBS_DATABASE_URL": database_url,
                "CMAMBA_JOBS_PART_S": str(PART_S),
                "CMAMBA_JOBS_LEASE_S": "2",
                "CMAMBA_JOBS_POLL_S": "0.2",
                "CMAMBA_TORCH_THREADS": "1",
                "CMAMBA_DRAIN_TIMEOUT_S": "20",
            }
        )
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


def _submit(server: ServerProcess, path: Path) -> str:
    with path.open("rb") as fh:
        answer = httpx.post(
            f"{server.url}/v1/jobs", files={"file": (path.name, fh, "audio/wav")}, timeout=30
        )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def _status(server: ServerProcess, job_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=10)
    assert answer.status_code == 200, answer.text
    status: dict[str, Any] = answer.json()
    return status


def _done(server: ServerProcess, job_id: str, timeout: float = 240) -> dict[str, Any]:
    return wait_until(
        lambda: (s := _status(server, job_id))["state"] in ("succeeded", "failed") and s,
        f"job {job_id} to end",
        timeout,
        process=server,
        interval=0.2,
    )


def _media_seconds_processed(server: ServerProcess) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cmamba_job_media_seconds_total":
                return float(sample.value)
    raise AssertionError("cmamba_job_media_seconds_total is not exported")


def _stored_parts(url: str, job_id: str) -> list[dict[str, Any]]:
    store = open_store(url)
    try:
        return store.segments(job_id)
    finally:
        store.close()


def _record(url: str, job_id: str) -> Any:
    store = open_store(url)
    try:
        return store.get(job_id)
    finally:
        store.close()


def _segments(server: ServerProcess, job_id: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{server.url}/v1/jobs/{job_id}/result", timeout=30)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["segments"])


def _same_timeline(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert (mine["start"], mine["end"], mine["source"]) == (
            theirs["start"],
            theirs["end"],
            theirs["source"],
        )
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-5)
        assert mine["attribution"]["audio"] == pytest.approx(
            theirs["attribution"]["audio"], abs=1e-5
        )


def _mid_job(server: ServerProcess, job_id: str, seconds: float) -> dict[str, Any]:
    return wait_until(
        lambda: (s := _status(server, job_id))["progress"]["done_seconds"] >= seconds and s,
        f"job {job_id} to pass {seconds} s",
        240,
        process=server,
        interval=0.05,
    )


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_kill_9_mid_job_resumes_from_the_last_stored_part(
    servers: Callable[..., ServerProcess],
    media: dict[str, Path],
    tmp_path: Path,
    database_url: str,
) -> None:
    jobs_dir = tmp_path / "jobs"
    first = servers(media["ckpt"], jobs_dir)
    long_id = _submit(first, media["long"])
    short_id = _submit(first, media["short"])  # queued behind it (one worker)
    seen = _mid_job(first, long_id, 6 * PART_S)
    assert seen["state"] == "running"
    first.proc.kill()  # no drain, no cleanup
    first.proc.wait(30)

    stored = _stored_parts(database_url, long_id)
    stored_s = sum(p["end_s"] - p["start_s"] for p in stored)
    assert sorted(p["index"] for p in stored) == list(range(len(stored)))
    assert 6 * PART_S <= stored_s < LONG_S, "the kill came after the job's end"
    before = {p["index"]: p for p in stored}
    record = _record(database_url, long_id)
    assert record.state is JobState.RUNNING
    assert _record(database_url, short_id).state is JobState.QUEUED
    upload = Path(record.media_path)
    assert upload.exists()  # the upload is kept until its job ends

    second = servers(media["ckpt"], jobs_dir)
    status = _done(second, long_id)
    assert status["state"] == "succeeded", status
    assert status["attempts"] == 2
    assert _done(second, short_id)["state"] == "succeeded"  # the queued job ran too
    assert not upload.exists()
    # The parts stored before the kill were not computed again: the second process worked
    # through the rest of the long recording and all of the short one, nothing more.
    assert _media_seconds_processed(second) == pytest.approx((LONG_S - stored_s) + SHORT_S, abs=0.5)
    after = {p["index"]: p for p in _stored_parts(database_url, long_id)}
    assert all(after[i] == part for i, part in before.items())

    # The same recording without a kill gives the same timeline.
    fresh_id = _submit(second, media["long"])
    assert _done(second, fresh_id)["state"] == "succeeded"
    _same_timeline(_segments(second, long_id), _segments(second, fresh_id))


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_sigterm_finishes_the_current_part_and_the_next_start_resumes(
    servers: Callable[..., ServerProcess],
    media: dict[str, Path],
    tmp_path: Path,
    database_url: str,
) -> None:
    jobs_dir = tmp_path / "jobs"
    first = servers(media["ckpt"], jobs_dir)
    job_id = _submit(first, media["long"])
    seen = _mid_job(first, job_id, 3 * PART_S)
    first.proc.terminate()
    assert first.proc.wait(60) == 0, first.log_tail()

    stored = _stored_parts(database_url, job_id)
    stored_s = sum(p["end_s"] - p["start_s"] for p in stored)
    assert sorted(p["index"] for p in stored) == list(range(len(stored)))
    assert seen["progress"]["done_seconds"] <= stored_s < LONG_S
    record = _record(database_url, job_id)
    # Released by the drain: queued again at once (no lease to wait out), its parts kept.
    assert record.state is JobState.QUEUED and record.error is None
    assert record.lease_owner is None and record.attempts == 1

    second = servers(media["ckpt"], jobs_dir)
    status = _done(second, job_id)
    assert status["state"] == "succeeded" and status["attempts"] == 2
    assert _media_seconds_processed(second) == pytest.approx(LONG_S - stored_s, abs=0.5)
    segments = _segments(second, job_id)
    assert segments[-1]["end"] == pytest.approx(LONG_S, abs=0.1)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_two_servers_on_one_database_never_run_a_job_twice(
    servers: Callable[..., ServerProcess],
    media: dict[str, Path],
    tmp_path: Path,
    database_url: str,
) -> None:
    """Two replicas share one PostgreSQL queue: every job runs once, on one of them, and each
    media second is processed once across both."""
    shared = tmp_path / "jobs"  # both keep uploads in one folder, as on a shared volume
    first = servers(media["ckpt"], shared)
    second = servers(media["ckpt"], shared)
    ids = [_submit(first if i % 2 else second, media["short"]) for i in range(6)]
    for job_id in ids:
        status = _done(first, job_id)
        assert status["state"] == "succeeded" and status["attempts"] == 1, status
        assert _status(second, job_id)["state"] == "succeeded"  # one queue, seen by both
    processed = [_media_seconds_processed(s) for s in (first, second)]
    assert sum(processed) == pytest.approx(6 * SHORT_S, abs=0.5)
    assert all(p > 0 for p in processed), processed  # both took work


def test_a_callback_left_pending_by_a_killed_server_is_sent_by_the_next(
    servers: Callable[..., ServerProcess], media: dict[str, Path], tmp_path: Path
) -> None:
    target = Receiver(failures=1000)  # down for now
    try:
        allow = {"CMAMBA_JOBS_CALLBACK_ALLOW": '["127.0.0.1/32"]',
                 "CMAMBA_JOBS_CALLBACK_SECRET": "s"}  # fmt: skip
        jobs_dir = tmp_path / "jobs"
        first = servers(media["ckpt"], jobs_dir, **allow, CMAMBA_JOBS_CALLBACK_BACKOFF_S="30")
        with media["short"].open("rb") as fh:
            answer = httpx.post(
                f"{first.url}/v1/jobs",
                params={"callback_url": target.url},
                files={"file": ("short.wav", fh, "audio/wav")},
                timeout=30,
            )
        job_id = answer.json()["id"]
        assert _done(first, job_id)["state"] == "succeeded"
        wait_until(lambda: len(target.requests) >= 1, "the first try", 30, process=first)
        first.proc.kill()  # while it waits 30 s to try again
        first.proc.wait(30)
        assert _status_in_store(tmp_path, job_id) == "pending"

        target.failures = len(target.requests)  # the receiver is back
        second = servers(
            media["ckpt"], jobs_dir, **allow, CMAMBA_JOBS_CALLBACK_ATTEMPTS="2",
            CMAMBA_JOBS_CALLBACK_TIMEOUT_S="1", CMAMBA_JOBS_CALLBACK_BACKOFF_S="0.1",
        )  # fmt: skip
        status = wait_until(
            lambda: (s := _status(second, job_id))["callback"]["state"] == "delivered" and s,
            "the callback to be sent by the restarted server",
            60,
            process=second,
        )
        assert status["state"] == "succeeded"
        assert len(target.requests) == target.failures + 1
        assert json.loads(target.requests[-1]["body"])["id"] == job_id
    finally:
        target.close()


def _status_in_store(tmp_path: Path, job_id: str) -> str | None:
    record = _record(f"sqlite:///{tmp_path / 'jobs' / 'jobs.db'}", job_id)
    return None if record is None else record.callback_state


def test_an_unreachable_job_database_fails_the_startup_clearly(tmp_path: Path) -> None:
    """``cmamba serve`` on a PostgreSQL URL where nothing listens: a startup failure that
    names the database (its password hidden) and a non-zero exit, not a server without jobs."""
    port = free_port()  # closed: nothing listens there
    url = f"postgresql://cmamba:pa55-w0rd@127.0.0.1:{port}/jobs"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CMAMBA_")},
        "CMAMBA_JOBS_DATABASE_URL": url,
        "CMAMBA_JOBS_DIR": str(tmp_path / "jobs"),
        "CMAMBA_MODEL_PATH": str(REPO / "model" / "checkpoints" / "default"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(free_port())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "startup failed: the job store cannot be used" in result.stderr, result.stderr[-3000:]
    assert f"postgresql://cmamba:***@127.0.0.1:{port}/jobs" in result.stderr
    assert "pa55-w0rd" not in result.stderr + result.stdout
