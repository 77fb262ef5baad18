"""Hostile input (issue #19): a bad request gets its own 4xx and harms no other request."""

from __future__ import annotations

import functools
import gc
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from service.main import create_app


def post_together(client: TestClient, bodies: list[dict[str, Any]]) -> list[Any]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: client.post("/v1/predict/features", json=b), bodies))


def _poisoned(payload: dict[str, Any], kind: str) -> dict[str, Any]:
    features = payload["features"]
    if kind == "all-huge":
        payload["features"] = {m: [[1e20] * len(r) for r in rows] for m, rows in features.items()}
    else:  # one value near the top of float32's range
        features["audio"][0][0] = 1e30
    return payload


@pytest.mark.parametrize("kind", ["all-huge", "one-huge"])
def test_features_that_overflow_the_model_fail_alone(
    features_app: Callable[..., TestClient], payload: Callable[..., dict], kind: str
) -> None:
    # Nine clips batched together (the batch waits until it is full): one of them overflows
    # the model's float range; it gets a 422, the eight others their answers.
    client = features_app(max_batch_size=9, max_batch_delay_ms=10_000, adaptive_batch_delay=False)
    bodies = [payload(12, seed=i) for i in range(8)]
    bodies.insert(3, _poisoned(payload(12, seed=99), kind))
    answers = post_together(client, bodies)
    statuses = [a.status_code for a in answers]
    assert statuses == [200] * 3 + [422] + [200] * 5, [a.text[:200] for a in answers]
    assert answers[3].json()["error"]["type"] == "invalid_input"
    assert "too large" in answers[3].json()["error"]["message"]


# -- leaks and echoes (against a real server) ----------------------------------------------------


def test_model_metadata_does_not_show_server_paths(features_server: Any, checkpoint: Path) -> None:
    answer = httpx.get(f"{features_server.url}/v2/models/tiny", timeout=30)
    assert answer.status_code == 200
    assert str(checkpoint.parent) not in answer.text
    assert answer.json()["checkpoint"]["name"] == checkpoint.name


@pytest.mark.parametrize("field", ["profile", "modalities", "masks"])
def test_error_messages_do_not_echo_client_input_unbounded(
    features_server: Any, payload: Callable[..., dict], field: str
) -> None:
    body = payload(4, seed=0)
    if field == "profile":
        body["profile"] = "x" * 1_000_000
    elif field == "modalities":
        body["features"].update({f"unknown-{i}": [[0.0]] for i in range(20_000)})
    else:
        body["masks"] = {f"unknown-{i}": [True] for i in range(20_000)}
    answer = httpx.post(f"{features_server.url}/v1/predict/features", json=body, timeout=60)
    assert answer.status_code == 422
    assert answer.json()["error"]["type"] in ("invalid_input", "feature_mismatch")
    assert len(answer.content) < 2_000, answer.content[:300]


# -- security headers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 200),
        ("GET", "/v2/health/ready", 200),
        ("GET", "/no/such/path", 404),
        ("POST", "/v1/predict/features", 422),
    ],
)
def test_every_answer_has_security_headers_and_no_server_banner(
    features_server: Any, method: str, path: str, status: int
) -> None:
    answer = httpx.request(method, f"{features_server.url}{path}", json={}, timeout=30)
    assert answer.status_code == status
    headers = answer.headers
    assert headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["referrer-policy"] == "no-referrer"
    assert "server" not in headers


# -- hostile media (against a real server with the real extractor) ---------------------------------


def _post_media(server: Any, name: str, data: bytes, content_type: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/predict",
        files={"file": (name, data, content_type)},
        data={"transcript": "hello there"},
        timeout=120,
    )


def test_media_with_broken_headers_is_refused_not_a_server_error(
    media_server: Any, shared_media: Path, tmp_path: Path, remux: Callable[..., Path]
) -> None:
    mkv = remux(
        shared_media / "cremad_1001_DFA_HAP_XX.mp4",
        tmp_path / "clip.mkv",
        "matroska",
        ("audio", "video"),
    ).read_bytes()
    cluster = mkv.index(b"\x1f\x43\xb6\x75")  # the first Cluster's ID, its size cut off
    nested = b""
    for _ in range(5000):
        nested = b"LIST" + struct.pack("<I", len(nested) + 4) + b"hdrl" + nested
    avi = b"RIFF" + struct.pack("<I", len(nested) + 4) + b"AVI " + nested
    for name, data in (("cut.mkv", mkv[: cluster + 4]), ("nested.avi", avi)):
        answer = _post_media(media_server, name, data, "video/x-matroska")
        assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text[:300])
        assert answer.json()["error"]["type"] == "undecodable_media"


def test_audio_whose_sample_rate_changes_mid_stream_is_scored(
    media_server: Any, encode_tone: Callable[..., bytes]
) -> None:
    data = encode_tone("mp3", "libmp3lame", 44_100, "mono") + encode_tone(
        "mp3", "libmp3lame", 22_050, "stereo"
    )
    answer = _post_media(media_server, "two-parts.mp3", data, "audio/mpeg")
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["modalities"]["audio_seconds"] > 1.9


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_failed_decodes_do_not_hold_native_threads(
    media_server: Any,
    shared_media: Path,
    tmp_path: Path,
    encode_tone: Callable[..., bytes],
    remux: Callable[..., Path],
) -> None:
    mp4 = (shared_media / "cremad_1001_DFA_HAP_XX.mp4").read_bytes()
    flac = (shared_media / "jfk.flac").read_bytes()
    mkv = remux(
        shared_media / "cremad_1001_DFA_HAP_XX.mp4",
        tmp_path / "clip.mkv",
        "matroska",
        ("audio", "video"),
    ).read_bytes()
    failing = [
        ("half.mp4", mp4[: len(mp4) // 2], "video/mp4"),
        ("half.flac", flac[: len(flac) // 3], "audio/flac"),
        ("half.mkv", mkv[: len(mkv) // 2], "video/x-matroska"),
        ("tail.mp3", encode_tone("mp3", "libmp3lame", 44_100, "mono")[:-700], "audio/mpeg"),
    ]
    for name, data, kind in failing:  # first uses may start lasting pools
        _post_media(media_server, name, data, kind)
    before = _threads(media_server.proc.pid)
    for round_ in range(15):
        for name, data, kind in failing:
            answer = _post_media(media_server, name, data, kind)
            assert answer.status_code < 500, (round_, name, answer.text[:300])
    assert _threads(media_server.proc.pid) <= before + 2


# -- work nobody waits for is stopped ------------------------------------------------------------


class StallingExtractor:
    """Extracts nothing: polls ``should_stop`` until told to stop (or released at teardown)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.release = threading.Event()

    def warmup(self) -> object:
        return {}

    def extract(
        self,
        path: Path,
        transcript: str | None = None,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> Any:
        from preprocessing.errors import ExtractionStoppedError

        self.started.set()
        while not self.release.wait(0.01):
            if should_stop is not None and should_stop():
                self.stopped.set()
                raise ExtractionStoppedError("stopped")
        raise RuntimeError("released at teardown")


@pytest.fixture
def stalling() -> Iterator[StallingExtractor]:
    extractor = StallingExtractor()
    yield extractor
    extractor.release.set()


def _clip_body(boundary: str = "hostile") -> tuple[bytes, str]:
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.mp3"\r\n'
        f"Content-Type: audio/mpeg\r\n\r\n{'x' * 1000}\r\n--{boundary}--\r\n"
    ).encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_extraction_stops_after_the_deadline(
    make_settings: Callable[..., Any],
    start_client: Callable[..., TestClient],
    stalling: StallingExtractor,
) -> None:
    app = create_app(make_settings(enable_media=True, request_timeout_s=1.0), extractor=stalling)
    client = start_client(app)
    body, content_type = _clip_body()
    answer = client.post("/v1/predict", content=body, headers={"content-type": content_type})
    assert answer.status_code == 504
    assert stalling.stopped.wait(30), "the extraction went on after the 504"


@contextmanager
def served_in_thread(app: Any, port: int) -> Iterator[None]:
    """Serve ``app`` with uvicorn on ``port`` in a thread (an in-process app with fakes, over a
    real socket); uvicorn's loggers left unconfigured, so they propagate to ``caplog``."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="info")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert app.state.core.wait_started(120)
        yield
    finally:
        server.should_exit = True
        thread.join(30)


def test_extraction_stops_when_the_client_disconnects(
    make_settings: Callable[..., Any], stalling: StallingExtractor, unused_port: int
) -> None:
    app = create_app(make_settings(enable_media=True, request_timeout_s=120.0), extractor=stalling)
    with served_in_thread(app, unused_port):
        body, content_type = _clip_body()
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", unused_port), timeout=30) as sock:
            sock.sendall(head + body)
            assert stalling.started.wait(30)
        assert stalling.stopped.wait(30), "the extraction went on after the client left"


def test_audio_of_extreme_rate_times_channels_is_refused(
    media_server: Any, encode_tone: Callable[..., bytes]
) -> None:
    data = encode_tone("flac", "flac", 384_000, "7.1", seconds=0.2)
    answer = _post_media(media_server, "wide.flac", data, "audio/flac")
    assert answer.status_code == 413, answer.text[:300]
    assert "channels" in answer.json()["error"]["message"]


# -- parsing stays off the event loop; health answers under load ---------------------------------


def _raw_post(port: int, path: str, content_type: str, body: bytes) -> int:
    """POST over a raw socket (the send releases the GIL); the answer's status code."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head)
        sock.sendall(body)
        answer = b""
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    return int(answer.split(b" ", 2)[1])


def _assert_loop_free(latencies: list[float], load_seconds: list[float]) -> None:
    # Compared within the run, not against a clock: with the body parsed on the event loop a
    # health check waits for a whole parse, about as long as a load request takes (the loads
    # then also finish one parse after another); off the loop it waits a few scheduler slices.
    assert len(latencies) >= 3
    assert max(latencies) < 0.5 * min(load_seconds), (sorted(latencies)[-5:], load_seconds)


def _health_latencies_during(
    url: str, loads: list[Callable[[], int]]
) -> tuple[list[float], list[int], list[float]]:
    """Run ``loads`` in parallel and time /v2/health/ready one request after another until they
    are all answered; the health latencies, the loads' status codes and their durations."""
    latencies: list[float] = []

    def timed(load: Callable[[], int]) -> tuple[int, float]:
        started = time.perf_counter()
        status = load()
        return status, time.perf_counter() - started

    with ThreadPoolExecutor(len(loads)) as pool, httpx.Client(timeout=30) as client:
        client.get(f"{url}/v2/health/ready")  # the connection is open before the load starts
        futures = [pool.submit(timed, load) for load in loads]
        while not all(f.done() for f in futures):
            started = time.perf_counter()
            assert client.get(f"{url}/v2/health/ready").status_code == 200
            latencies.append(time.perf_counter() - started)
        results = [f.result() for f in futures]
        return latencies, [status for status, _ in results], [s for _, s in results]


def test_health_answers_while_large_features_bodies_are_parsed(
    features_server: Any, dims: dict[str, int]
) -> None:
    # Numbers as strings: the schema's lax path (48 MB held the event loop 1.1 s each).
    row = "[" + ",".join(['"0.5"'] * dims["text"]) + "]"
    rows = ",".join([row] * (48_000_000 // len(row)))
    body = f'{{"profile": "default-v1", "features": {{"text": [{rows}]}}}}'.encode()
    load = functools.partial(
        _raw_post, features_server.port, "/v1/predict/features", "application/json", body
    )
    latencies, statuses, load_seconds = _health_latencies_during(features_server.url, [load] * 4)
    assert statuses == [422] * 4
    _assert_loop_free(latencies, load_seconds)


def test_form_parts_are_capped_and_health_answers_meanwhile(media_server: Any) -> None:
    part = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\ny\r\n'
    body = part * (3_900_000 // len(part)) + b"--b--\r\n"  # tens of thousands of tiny parts
    load = functools.partial(
        _raw_post, media_server.port, "/v1/predict", "multipart/form-data; boundary=b", body
    )
    # The cap ends each of these requests within tens of milliseconds, too soon to compare a
    # health check against: health answers 200 throughout, and the parts are refused.
    latencies, statuses, _ = _health_latencies_during(media_server.url, [load] * 4)
    assert statuses == [422] * 4
    assert latencies
    answer = httpx.post(
        f"{media_server.url}/v1/predict",
        content=b"--b\r\n" + b"A" * 8200 + b": v\r\n\r\nz\r\n--b--\r\n",
        headers={"content-type": "multipart/form-data; boundary=b"},
        timeout=30,
    )
    assert answer.status_code == 422
    assert "header" in answer.json()["error"]["message"]


def test_multipart_body_without_closing_boundary_says_so(media_server: Any) -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.mp3"\r\n\r\nabc'
    answer = httpx.post(
        f"{media_server.url}/v1/predict",
        content=body,
        headers={"content-type": "multipart/form-data; boundary=b"},
        timeout=30,
    )
    assert answer.status_code == 422
    assert "closing boundary" in answer.json()["error"]["message"]


# -- slow clients (raw sockets against a real server) ----------------------------------------------


def _closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes the connection (True) or 60 s pass (False)."""
    sock.settimeout(60)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_slow_clients_are_disconnected(spawn_server: Callable[..., Any], checkpoint: Path) -> None:
    server = spawn_server(
        {
            "CMAMBA_MODEL_PATH": str(checkpoint),
            "CMAMBA_ENABLE_MEDIA": "false",
            "CMAMBA_HEADER_TIMEOUT_S": "1",
            "CMAMBA_BODY_TIMEOUT_S": "2",
            "CMAMBA_KEEP_ALIVE_TIMEOUT_S": "1",
        }
    )
    server.wait_ready()
    address = ("127.0.0.1", server.port)
    never_speaks = [socket.create_connection(address) for _ in range(20)]
    headers_unfinished = socket.create_connection(address)
    headers_unfinished.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
    body_unfinished = socket.create_connection(address)
    body_unfinished.sendall(
        b"POST /v1/predict/features HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"profile": '
    )
    idle = socket.create_connection(address)
    idle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        for sock in [*never_speaks, headers_unfinished, body_unfinished, idle]:
            assert _closed_by_server(sock)
        # and the server still serves
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=30).status_code == 200
    finally:
        for sock in [*never_speaks, headers_unfinished, body_unfinished, idle]:
            sock.close()


# -- log noise -----------------------------------------------------------------------------------


class SlowExtractor(StallingExtractor):
    """Holds the one extraction thread until released; no stop support (runs to the end)."""

    def extract(self, path: Path, transcript: str | None = None, **_: Any) -> Any:  # type: ignore[override]
        self.started.set()
        self.release.wait(60)
        raise RuntimeError("nothing extracted")


def test_a_500_is_logged_once_and_late_deadlines_are_not_reported(
    make_settings: Callable[..., Any],
    payload: Callable[..., dict],
    unused_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def fail(features: Any, masks: Any) -> None:
        raise RuntimeError("injected model failure")

    slow = SlowExtractor()
    settings = make_settings(enable_media=True, request_timeout_s=1.0, warmup=False)
    app = create_app(settings, extractor=slow, before_forward=fail)
    url = f"http://127.0.0.1:{unused_port}"
    body, content_type = _clip_body()
    headers = {"content-type": content_type}
    with caplog.at_level(logging.INFO):
        with served_in_thread(app, unused_port):
            answer = httpx.post(f"{url}/v1/predict/features", json=payload(8, 0), timeout=30)
            assert answer.status_code == 500
            assert answer.json()["error"]["type"] == "internal_error"
            # Two uploads: the first holds the one extraction thread past both deadlines; the
            # second's job starts after its 504 and ends with a deadline error nobody awaits.
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(httpx.post, f"{url}/v1/predict", content=body, headers=headers)
                assert slow.started.wait(30)
                second = httpx.post(f"{url}/v1/predict", content=body, headers=headers)
                assert second.status_code == 504
                assert first.result().status_code == 504
            slow.release.set()
        gc.collect()  # the server stopped: its jobs are over and their futures gone
    tracebacks = [r for r in caplog.records if r.exc_info and "injected" in str(r.exc_info[1])]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    never_retrieved = [
        r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()
    ]
    assert never_retrieved == []


# -- start-up --------------------------------------------------------------------------------------


def test_upload_folders_of_stopped_processes_are_removed_at_start_up(
    spawn_server: Callable[..., Any], checkpoint: Path, tmp_path: Path
) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f"cmamba-uploads-{gone.stdout.strip()}-abc123"
    stale.mkdir()
    (stale / "upload-x").write_bytes(b"left by a killed server")
    alive = tmp_path / f"cmamba-uploads-{os.getpid()}-def456"
    alive.mkdir()
    server = spawn_server({"CMAMBA_MODEL_PATH": str(checkpoint), "CMAMBA_ENABLE_MEDIA": "false",
                           "TMPDIR": str(tmp_path)})  # fmt: skip
    server.wait_ready()
    assert not stale.exists()
    assert alive.is_dir()
    own = [p for p in tmp_path.glob("cmamba-uploads-*") if p not in (alive,)]
    assert [p.name.split("-")[2] for p in own] == [str(server.proc.pid)]
