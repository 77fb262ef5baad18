"""``cmamba --version``, help and defaults of every flag, and ``cmamba predict --url`` retries."""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import service
from service.cli import COMMANDS, HelpFormatter, build_parser, main


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cmamba {service.__version__}"


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.choices[name] for name in COMMANDS}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_has_help_that_shows_its_default(command: str) -> None:
    parser = _command_parsers()[command]
    formatter = HelpFormatter(prog=f"cmamba {command}")
    checked = 0
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{command} {name}: no help"
        assert len(action.help.split()) >= 2, f"{command} {name}: help {action.help!r}"
        takes_default = action.option_strings and not action.required
        if takes_default:
            shown = formatter._get_help_string(action) or ""
            assert "default" in shown.lower(), f"{command} {name}: no default in {shown!r}"
            checked += 1
    parser.format_help()  # every help string renders (no stray %)
    assert checked > 0 or command == "bench"


def test_api_key_from_the_environment_is_never_printed_in_help(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CMAMBA_API_KEY", "secret-token-123")
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    out = capsys.readouterr().out
    assert "$CMAMBA_API_KEY" in out and "secret-token-123" not in out


# -- cmamba predict --url against a real HTTP server ------------------------------------------


class _Busy:
    """A server that answers 503 (with ``retry_after``) ``busy`` times, then 200."""

    def __init__(self, busy: int, retry_after: str | None) -> None:
        self.busy = busy
        self.retry_after = retry_after
        self.arrivals: list[float] = []
        self.bodies: list[bytes] = []
        self.authorization: list[str | None] = []


@pytest.fixture
def busy_server() -> Iterator[tuple[ThreadingHTTPServer, _Busy]]:
    state = _Busy(0, None)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            state.arrivals.append(time.monotonic())
            state.bodies.append(body)
            state.authorization.append(self.headers.get("authorization"))
            if len(state.arrivals) <= state.busy:
                answer = json.dumps({"error": {"type": "overloaded", "message": "busy"}})
                self.send_response(503)
                if state.retry_after is not None:
                    self.send_header("Retry-After", state.retry_after)
            else:
                answer = json.dumps({"sentiment": {"score": 1.5}})
                self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, state
    server.shutdown()
    server.server_close()


def _predict(server: ThreadingHTTPServer, clip: Path, *extra: str) -> int | str | None:
    host, port = server.server_address[:2]
    url = f"http://{host!s}:{port}"
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(clip), "--url", url, "--timeout", "10", *extra])
    return exit_info.value.code


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    path = tmp_path / "clip.wav"
    path.write_bytes(b"RIFF-not-really-audio-" * 10)
    return path


def test_a_503_with_retry_after_is_retried_after_the_wait(
    busy_server: tuple[ThreadingHTTPServer, _Busy],
    clip: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, state = busy_server
    state.busy, state.retry_after = 1, "1"
    monkeypatch.setenv("CMAMBA_API_KEY", "token-1")
    code = _predict(server, clip)
    captured = capsys.readouterr()
    assert code == 0, captured
    assert json.loads(captured.out) == {"sentiment": {"score": 1.5}}
    assert "retrying in 1 s" in captured.err
    assert len(state.arrivals) == 2
    assert state.arrivals[1] - state.arrivals[0] >= 0.95  # it waited as asked
    assert all(clip.read_bytes() in body for body in state.bodies)  # the whole file each time
    assert state.authorization == ["Bearer token-1", "Bearer token-1"]


def test_retries_are_bounded(
    busy_server: tuple[ThreadingHTTPServer, _Busy],
    clip: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, state = busy_server
    state.busy, state.retry_after = 100, "0"
    code = _predict(server, clip, "--retries", "2")
    assert code == 1
    assert len(state.arrivals) == 3  # the first try and two retries
    assert json.loads(capsys.readouterr().out)["error"]["type"] == "overloaded"


@pytest.mark.parametrize(
    ("retry_after", "extra"),
    [(None, []), ("60", ["--max-retry-wait", "5"]), ("soon", [])],
    ids=["no-retry-after", "wait-over-the-limit", "unreadable"],
)
def test_a_503_it_cannot_honour_is_not_retried(
    busy_server: tuple[ThreadingHTTPServer, _Busy],
    clip: Path,
    retry_after: str | None,
    extra: list[str],
) -> None:
    server, state = busy_server
    state.busy, state.retry_after = 100, retry_after
    code = _predict(server, clip, *extra)
    assert code == 1
    assert len(state.arrivals) == 1


def test_an_http_date_retry_after_is_understood(
    busy_server: tuple[ThreadingHTTPServer, _Busy], clip: Path
) -> None:
    from email.utils import formatdate

    server, state = busy_server
    state.busy, state.retry_after = 1, formatdate(time.time() + 1, usegmt=True)
    code = _predict(server, clip)
    assert code == 0
    assert len(state.arrivals) == 2


def test_a_transcript_alone_is_sent_as_a_form_field(
    busy_server: tuple[ThreadingHTTPServer, _Busy], capsys: pytest.CaptureFixture[str]
) -> None:
    server, state = busy_server
    host, port = server.server_address[:2]
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--transcript", "I loved it", "--url", f"http://{host!s}:{port}"])
    assert exit_info.value.code == 0
    (body,) = state.bodies
    assert b'name="transcript"\r\n\r\nI loved it\r\n' in body
    assert b'name="file"' not in body and b"filename=" not in body


def test_no_file_and_no_transcript_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--url", "http://127.0.0.1:9"])
    assert exit_info.value.code == 2
    assert "give a FILE, or --transcript TEXT" in capsys.readouterr().err
