"""/v1/jobs in process: a real tiny model, the real extractor (audio only) and a real SQLite
job store; a recording goes in, is analysed part by part, and its timeline comes out."""

from __future__ import annotations

import csv
import io
import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import wait_until
from jobmedia import audio_checkpoint, write_tone_wav

from service.main import create_app
from service.settings import ServiceSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def audio_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return audio_checkpoint(tmp_path_factory.mktemp("ckpt") / "audio")


@pytest.fixture(scope="module")
def audio_extractor() -> Any:
    from preprocessing import Extractor

    extractor = Extractor(modalities=("audio",))
    extractor.warmup()
    return extractor


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tone_wav(tmp_path_factory.mktemp("media") / "talk.wav", 42.0)


@pytest.fixture
def jobs_app(
    tmp_path: Path,
    audio_ckpt: Path,
    audio_extractor: Any,
    start_client: Callable[..., TestClient],
) -> Callable[..., TestClient]:
    def build(**overrides: Any) -> TestClient:
        values: dict[str, Any] = {
            "model_path": audio_ckpt,
            "jobs_dir": tmp_path / "jobs",
            "jobs_part_s": 10.0,
            "jobs_poll_s": 0.1,
            "torch_threads": 1,
            "max_batch_delay_ms": 2.0,
        }
        values.update(overrides)
        return start_client(create_app(ServiceSettings(**values), extractor=audio_extractor))

    return build


def submit(client: TestClient, path: Path, query: str = "", **headers: str) -> Any:
    with path.open("rb") as fh:
        return client.post(
            f"/v1/jobs{query}", files={"file": (path.name, fh, "audio/wav")}, headers=headers
        )


def finished(client: TestClient, location: str, timeout: float = 120.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status: dict[str, Any] = client.get(location).json()
        return status if status["state"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(done, "the job to end", timeout, interval=0.1)


def test_a_recording_becomes_a_timeline_part_by_part(
    jobs_app: Callable[..., TestClient], recording: Path, tmp_path: Path
) -> None:
    client = jobs_app()
    answer = submit(client, recording, "?window=4")
    assert answer.status_code == 202, answer.text
    location = answer.headers["location"]
    job = answer.json()
    assert location == f"/v1/jobs/{job['id']}" and job["state"] == "queued"
    assert job["progress"]["media_seconds"] == pytest.approx(42.0, abs=0.1)
    kept = list((tmp_path / "jobs" / "uploads").iterdir())
    assert len(kept) == 1  # the upload is kept until the job ends

    status = finished(client, location)
    assert status["state"] == "succeeded", status
    assert status["progress"]["done_seconds"] == pytest.approx(42.0, abs=0.1)
    assert status["progress"]["stage"] == "part 5/5"
    assert status["timings"]["run_s"] is not None and status["attempts"] == 1
    assert not list((tmp_path / "jobs" / "uploads").iterdir())  # removed once the job ended

    result = client.get(f"{location}/result")
    assert result.status_code == 200
    body = result.json()
    timeline_keys = set(client.get("/openapi.json").json()["components"]["schemas"]
                        ["TimelineResponse"]["properties"])  # fmt: skip
    assert set(body) == timeline_keys
    assert body["overall_method"] == "segment_mean"
    assert body["duration_s"] == pytest.approx(42.0, abs=0.1)
    segments = body["segments"]
    # Windows of about 4 s, in order, gapless, and cut at the part boundaries (10, 20...).
    assert segments[0]["start"] == 0.0 and segments[-1]["end"] == pytest.approx(42.0, abs=0.1)
    for before, after in itertools.pairwise(segments):
        assert after["start"] == pytest.approx(before["end"], abs=1e-3)
        assert 2.0 <= before["end"] - before["start"] <= 6.0
    assert {10.0, 20.0, 30.0, 40.0} <= {round(s["start"], 3) for s in segments}
    assert all(s["attribution"]["audio"] is not None for s in segments)
    assert body["modalities"]["container"] == "wav"
    weights = [s["end"] - s["start"] for s in segments]
    mean = sum(w * s["score"] for w, s in zip(weights, segments, strict=True)) / sum(weights)
    assert body["sentiment"]["score"] == pytest.approx(mean, rel=1e-4)  # times rounded

    table = client.get(f"{location}/result?format=csv")
    assert table.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert len(rows) == len(segments)
    assert float(rows[3]["score"]) == pytest.approx(segments[3]["score"], abs=1e-5)

    listed = client.get("/v1/jobs").json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]] and listed["next_cursor"] is None
    assert client.delete(location).status_code == 204
    assert client.get(location).status_code == 404
    assert client.get(f"{location}/result").status_code == 404


def test_a_job_segments_equal_the_timeline_of_its_parts(
    jobs_app: Callable[..., TestClient], recording: Path, tmp_path: Path
) -> None:
    """The job runs the synchronous timeline's segment code: its first part's segments are
    those of /v1/timeline on the same 10 s of audio."""
    from preprocessing.parts import plan_parts, write_part

    client = jobs_app()
    location = submit(client, recording).headers["location"]
    assert finished(client, location)["state"] == "succeeded"
    segments = client.get(f"{location}/result").json()["segments"]
    start, end = plan_parts(recording, 10.0).bounds[1]
    part = tmp_path / "part.mkv"
    write_part(recording, start, end, part)
    with part.open("rb") as fh:
        answer = client.post("/v1/timeline", files={"file": ("p.mkv", fh, "video/x-matroska")})
    assert answer.status_code == 200, answer.text
    expected = answer.json()["segments"]
    got = [s for s in segments if start - 1e-6 <= s["start"] < end - 1e-6]
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert mine["start"] == pytest.approx(theirs["start"] + start, abs=1e-3)
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-5)
        audio = theirs["attribution"]["audio"]
        assert mine["attribution"]["audio"] == pytest.approx(audio, abs=1e-5)


def test_queued_jobs_page_conflict_and_cancel(
    jobs_app: Callable[..., TestClient], recording: Path, tmp_path: Path
) -> None:
    client = jobs_app(jobs_workers=0, jobs_max_queued=3)  # nothing runs them
    ids = [submit(client, recording).json()["id"] for _ in range(3)]
    first = client.get("/v1/jobs?limit=2").json()
    assert [j["id"] for j in first["jobs"]] == ids[::-1][:2]  # newest first
    second = client.get(f"/v1/jobs?limit=2&cursor={first['next_cursor']}").json()
    assert [j["id"] for j in second["jobs"]] == ids[:1] and second["next_cursor"] is None
    assert len(client.get("/v1/jobs?state=queued").json()["jobs"]) == 3
    assert client.get("/v1/jobs?state=running").json()["jobs"] == []

    early = client.get(f"/v1/jobs/{ids[0]}/result")
    assert early.status_code == 409 and early.json()["error"]["type"] == "job_not_finished"

    over = submit(client, recording)
    assert over.status_code == 429 and over.json()["error"]["type"] == "too_many_jobs"
    assert "retry-after" in over.headers
    assert len(list((tmp_path / "jobs" / "uploads").iterdir())) == 3  # the refused one is gone

    assert client.delete(f"/v1/jobs/{ids[1]}").status_code == 204
    assert len(list((tmp_path / "jobs" / "uploads").iterdir())) == 2
    assert submit(client, recording).status_code == 202  # room again
    assert client.get("/v1/jobs/no-such-job").status_code == 404
    assert client.get("/v1/jobs/bad%20id").status_code == 422
    assert client.get("/v1/jobs?cursor=garbage").status_code == 422


def test_limits_and_bad_input_answer_clear_errors(
    jobs_app: Callable[..., TestClient], recording: Path, tmp_path: Path
) -> None:
    client = jobs_app(jobs_disk_quota_bytes=recording.stat().st_size + 10_000)
    assert submit(client, recording).status_code == 202
    full = submit(client, recording)
    assert full.status_code == 507, full.text
    assert full.json()["error"]["type"] == "insufficient_storage"
    assert "quota" in full.json()["error"]["message"]

    text = tmp_path / "notes.txt"
    text.write_text("not a recording\n" * 20)
    unsupported = submit(client, text)
    assert unsupported.status_code == 415, unsupported.text

    callback = submit(client, recording, "?callback_url=http://127.0.0.1:9/hook")
    assert callback.status_code == 400
    assert callback.json()["error"]["type"] == "callback_not_allowed"
    assert client.post("/v1/jobs?window=0.1", files={"file": ("a", b"x")}).status_code == 422


def test_a_recording_longer_than_the_limit_is_refused(
    jobs_app: Callable[..., TestClient], recording: Path
) -> None:
    client = jobs_app(jobs_max_media_hours=0.01)  # 36 s
    refused = submit(client, recording)
    assert refused.status_code == 422
    assert refused.json()["error"]["type"] == "media_too_long"
    assert client.get("/v1/jobs").json()["jobs"] == []


def test_import_folder_paths_stay_inside_it(
    jobs_app: Callable[..., TestClient], recording: Path, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    inside = inbox / "sub" / "meeting.wav"
    inside.write_bytes(recording.read_bytes())
    outside = tmp_path / "secret.wav"
    outside.write_bytes(recording.read_bytes())
    os.symlink(outside, inbox / "link.wav")
    client = jobs_app(jobs_import_dir=inbox)

    answer = client.post("/v1/jobs", json={"path": "sub/meeting.wav"})
    assert answer.status_code == 202, answer.text
    status = finished(client, answer.headers["location"])
    assert status["state"] == "succeeded" and status["filename"] == "meeting.wav"
    assert inside.exists()  # a host file is not the job's to delete
    for bad in ("../secret.wav", str(outside), "link.wav", "sub", "missing.wav", ""):
        refused = client.post("/v1/jobs", json={"path": bad})
        assert refused.status_code == 400, (bad, refused.text)
        assert refused.json()["error"]["type"] == "invalid_path"
    assert client.post("/v1/jobs", json={"file": "x"}).status_code == 422
    assert client.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"}
                       ).status_code == 422  # fmt: skip
    no_inbox = jobs_app(jobs_dir=tmp_path / "other")
    assert no_inbox.post("/v1/jobs", json={"path": "sub/meeting.wav"}).status_code == 400


def test_jobs_need_the_token(jobs_app: Callable[..., TestClient], recording: Path) -> None:
    client = jobs_app(api_key="s3cret", jobs_workers=0)
    assert submit(client, recording).status_code == 401
    assert client.get("/v1/jobs").status_code == 401
    answer = submit(client, recording, Authorization="Bearer s3cret")
    assert answer.status_code == 202
    assert client.get(answer.headers["location"]).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    assert client.get(answer.headers["location"], headers=auth).status_code == 200


def test_a_job_whose_media_is_gone_fails_and_the_next_one_runs(
    jobs_app: Callable[..., TestClient], recording: Path, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    doomed = inbox / "doomed.wav"
    doomed.write_bytes(recording.read_bytes())
    queued = jobs_app(jobs_import_dir=inbox, jobs_workers=0)  # queues only
    bad = queued.post("/v1/jobs", json={"path": "doomed.wav"})
    assert bad.status_code == 202
    doomed.unlink()  # the host file goes away before the job runs
    client = jobs_app(jobs_import_dir=inbox)  # the same store, with a worker
    good = submit(client, recording)
    status = finished(client, bad.headers["location"])
    assert status["state"] == "failed"
    assert status["error"]["type"] == "media_missing" and status["error"]["message"]
    missing = client.get(bad.headers["location"] + "/result")
    assert missing.status_code == 409 and "failed" in missing.json()["error"]["message"]
    assert finished(client, good.headers["location"])["state"] == "succeeded"


def test_job_metrics_are_exported(
    jobs_app: Callable[..., TestClient], recording: Path, metric: Callable[..., float]
) -> None:
    client = jobs_app()
    location = submit(client, recording).headers["location"]
    assert finished(client, location)["state"] == "succeeded"
    app_jobs = client.app.state.jobs  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline:
        text = client.get("/metrics").text
        if metric(text, "cmamba_jobs", state="succeeded") == 1:
            break
        time.sleep(0.2)
    assert metric(text, "cmamba_jobs", state="succeeded") == 1, app_jobs
    assert metric(text, "cmamba_job_media_seconds_total") == pytest.approx(42.0, abs=0.1)
    assert metric(text, "cmamba_job_duration_seconds_count", state="succeeded") == 1
    assert metric(text, "cmamba_job_queue_wait_seconds_count") == 1


def test_finished_jobs_expire(
    jobs_app: Callable[..., TestClient], recording: Path, tmp_path: Path
) -> None:
    """The periodic retention task deletes a finished job once it is older than
    jobs_retention_s (a host file of the import folder stays)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "host.wav").write_bytes(recording.read_bytes())
    client = jobs_app(jobs_retention_s=1.0, jobs_retention_interval_s=0.2, jobs_import_dir=inbox)
    done = client.post("/v1/jobs", json={"path": "host.wav"}).headers["location"]
    assert finished(client, done)["state"] == "succeeded"
    assert client.get(f"{done}/result").status_code == 200
    wait_until(lambda: client.get(done).status_code == 404, "the job to expire", 30)
    assert client.get(f"{done}/result").status_code == 404
    assert (inbox / "host.wav").exists()


def test_deleting_a_running_job_stops_it(
    jobs_app: Callable[..., TestClient],
    recording: Path,
    tmp_path: Path,
    metric: Callable[..., float],
) -> None:
    long = write_tone_wav(tmp_path / "long.wav", 240.0)
    client = jobs_app(jobs_part_s=5.0, jobs_lease_s=1.0)
    location = submit(client, long).headers["location"]
    wait_until(
        lambda: client.get(location).json()["progress"]["done_seconds"] >= 10.0,
        "the job to be under way",
        60,
        interval=0.05,
    )
    assert client.delete(location).status_code == 204
    assert client.get(location).status_code == 404
    assert not list((tmp_path / "jobs" / "uploads").iterdir())  # its upload is gone
    # The worker lets go of it after the step it was on, and takes the next job.
    after = submit(client, recording).headers["location"]
    assert finished(client, after)["state"] == "succeeded"
    processed = metric(client.get("/metrics").text, "cmamba_job_media_seconds_total")
    assert processed < 240.0 * 0.5 + 42.0  # the deleted job was not run to its end
    assert not list((tmp_path / "jobs" / "parts").iterdir())  # no part file left behind


def _store_of(tmp_path: Path) -> Any:
    from service.jobs.store import open_store

    return open_store(f"sqlite:///{tmp_path / 'jobs' / 'jobs.db'}")


def test_each_worker_of_a_process_holds_its_leases_under_its_own_name(
    jobs_app: Callable[..., TestClient], tmp_path: Path
) -> None:
    """Two workers of one process run two jobs at once, each under an owner name of its own: a
    worker whose lease lapsed cannot write over the job that its neighbour has claimed since."""
    client = jobs_app(jobs_workers=2, jobs_part_s=5.0)
    locations = [
        submit(client, write_tone_wav(tmp_path / f"long{n}.wav", 90.0, seed=n)).headers["location"]
        for n in range(2)
    ]
    store = _store_of(tmp_path)
    try:
        ids = [location.rsplit("/", 1)[1] for location in locations]

        def both_running() -> list[Any] | None:
            records = [store.get(job_id) for job_id in ids]
            running = all(r is not None and r.state == "running" for r in records)
            return records if running else None

        records = wait_until(both_running, "both jobs to run at once", 60, interval=0.02)
    finally:
        store.close()
    owners = [r.lease_owner for r in records]
    assert owners[0] != owners[1], owners
    # Names of one process: the same host, pid and tag, then the worker.
    assert owners[0].rsplit("/", 1)[0] == owners[1].rsplit("/", 1)[0], owners
    for location in locations:
        assert finished(client, location)["state"] == "succeeded"


def test_a_job_that_keeps_crashing_its_process_fails_once_over_the_limit(
    jobs_app: Callable[..., TestClient], recording: Path, tmp_path: Path
) -> None:
    queued = jobs_app(jobs_workers=0)  # queues only
    location = submit(queued, recording).headers["location"]
    job_id = location.rsplit("/", 1)[1]
    store = _store_of(tmp_path)
    try:
        for crash in range(2):  # two processes claimed it and died mid-job (leases lapse)
            wait_until(
                lambda n=crash: store.claim(f"crashed-{n}", 0.05),
                "the lapsed lease to be claimed again",
                10,
                interval=0.02,
            )
        record = store.get(job_id)
        assert record is not None and record.attempts == 2 and record.state == "running"
    finally:
        store.close()
    client = jobs_app(jobs_max_attempts=2)  # the same store, with a worker
    status = finished(client, location)
    assert status["state"] == "failed", status
    assert status["attempts"] == 3
    assert status["error"]["type"] == "too_many_attempts"
    assert "3 times" in status["error"]["message"] and "limit is 2" in status["error"]["message"]
    assert not list((tmp_path / "jobs" / "uploads").iterdir())  # its upload is removed
    # The worker goes on to the next job.
    assert finished(client, submit(client, recording).headers["location"])["state"] == "succeeded"


def _matroska_with_header_duration(source: Path, out: Path, duration: float) -> Path:
    """``source``'s packets copied into Matroska, the header's Duration (an EBML float) then
    set to ``duration`` (a broken or hostile header: the packets are fine)."""
    import struct

    import av

    with av.open(str(source)) as src, av.open(str(out), "w", format="matroska") as sink:
        stream = src.streams.audio[0]
        target = sink.add_stream_from_template(stream)
        for packet in src.demux(stream):
            if packet.dts is None:
                continue
            packet.stream = target
            sink.mux(packet)
    data = bytearray(out.read_bytes())
    at = data.find(b"\x44\x89\x88")  # the Duration element, an 8-byte float
    assert at > 0, "no Duration element"
    data[at + 3 : at + 11] = struct.pack(">d", duration)
    out.write_bytes(bytes(data))
    return out


def test_a_recording_whose_header_length_is_negative_is_measured_from_its_packets(
    jobs_app: Callable[..., TestClient], recording: Path, tmp_path: Path
) -> None:
    from preprocessing.parts import probe_duration

    broken = _matroska_with_header_duration(recording, tmp_path / "broken.mkv", -5000.0)
    assert probe_duration(broken)[1] == pytest.approx(-5.0)  # what the header claims
    client = jobs_app()
    with broken.open("rb") as fh:
        answer = client.post("/v1/jobs", files={"file": ("broken.mkv", fh, "video/x-matroska")})
    assert answer.status_code == 202, answer.text
    assert answer.json()["progress"]["media_seconds"] is None  # unknown until planned
    status = finished(client, answer.headers["location"])
    assert status["state"] == "succeeded", status
    assert status["progress"]["media_seconds"] == pytest.approx(42.0, abs=0.1)
    assert status["progress"]["done_seconds"] == pytest.approx(42.0, abs=0.1)


@pytest.mark.parametrize("length", [float("nan"), float("inf")])
def test_a_recording_whose_packets_give_no_finite_length_fails_clearly(
    jobs_app: Callable[..., TestClient],
    recording: Path,
    monkeypatch: pytest.MonkeyPatch,
    length: float,
) -> None:
    """Packet times give no such length in practice; should the planner's measure ever be
    NaN or infinite the job fails with a clear error instead of being retried forever."""
    import dataclasses

    from preprocessing import parts

    real = parts.plan_parts

    def plan_with_length(*args: Any, **kwargs: Any) -> parts.PartPlan:
        return dataclasses.replace(real(*args, **kwargs), duration_s=length)

    monkeypatch.setattr(parts, "plan_parts", plan_with_length)
    client = jobs_app()
    status = finished(client, submit(client, recording).headers["location"], timeout=60)
    assert status["state"] == "failed", status
    assert status["error"]["type"] == "undecodable_media"
    assert "length could not be read" in status["error"]["message"]
    assert status["attempts"] == 1
