"""Live streams against a real ``cmamba serve`` process with the real live extractor: the
``cmamba stream`` command and the Python client on a shared clip, and SIGTERM draining open
streams with a final answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import REPO, ServerProcess, wait_until

from service.stream_client import StreamClient, play_media

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

CLIP = "cremad_1001_DFA_HAP_XX.mp4"


@pytest.fixture(scope="module")
def live_server(checkpoint: Path) -> Any:
    server = ServerProcess(
        {
            "CMAMBA_MODEL_PATH": str(checkpoint),
            "CMAMBA_STREAM_MAX_STREAMS": "2",
            "CMAMBA_DRAIN_TIMEOUT_S": "60",
        }
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _ws(server: ServerProcess) -> str:
    return server.url.replace("http://", "ws://") + "/v1/stream"


def _cmamba_stream(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "stream", *args, "--url", server.url],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + server.log_tail()
    return done


def test_cmamba_stream_plays_speech_in_real_time(
    live_server: ServerProcess, shared_media: Path
) -> None:
    """An 11 s speech clip at real-time pace: updates as utterances are recognised, then the
    final answer with the transcript."""
    done = _cmamba_stream(live_server, str(shared_media / "jfk.flac"), "--interval", "0.5")
    lines = done.stdout.splitlines()
    updates = [line for line in lines if line.startswith("t=")]
    assert len(updates) >= 2, done.stdout
    assert any("|" in line for line in updates), "no words in any update"
    final = json.loads("\n".join(lines[len(updates) :]))
    assert final["type"] == "final" and final["reason"] == "stop"
    result = final["result"]
    assert result["sentiment"]["label"] in ("negative", "neutral", "positive")
    assert result["modalities"]["audio_seconds"] == pytest.approx(11.0, abs=0.1)
    assert "country" in (result["modalities"]["transcript"] or "").lower()
    assert final["words_total"] > 10


def test_cmamba_stream_sends_video_frames(live_server: ServerProcess, shared_media: Path) -> None:
    done = _cmamba_stream(live_server, str(shared_media / CLIP), "--fast", "--json")
    messages = [json.loads(line) for line in done.stdout.splitlines()]
    assert messages[-1]["type"] == "final"
    result = messages[-1]["result"]
    assert result["modalities"]["frames"] > 0  # the clip's video went as JPEG frames
    assert "visual" in result["modalities"]["used"] and result["modalities"]["steps"] > 10


def test_python_client_and_live_metrics(live_server: ServerProcess, shared_media: Path) -> None:
    from preprocessing import ExtractorSettings
    from preprocessing.media import decode_media

    media = decode_media(shared_media / CLIP, ExtractorSettings(), audio=True, video=False)
    seen: list[dict[str, Any]] = []
    with StreamClient(_ws(live_server), update_interval_s=0.5, on_message=seen.append) as client:
        assert client.ready is not None and client.ready["protocol"] == 1
        play_media(client, media.audio, [], fast=True)
        final = client.stop()
    assert client.close_code == 1000
    assert seen[-1] == final and client.updates == [m for m in seen if m["type"] == "update"]
    assert final["result"]["modalities"]["frames"] == 0
    assert final["result"]["modalities"]["audio_seconds"] == pytest.approx(
        media.audio_seconds, abs=0.01
    )
    import urllib.request

    with urllib.request.urlopen(live_server.url + "/metrics", timeout=10) as answer:
        metrics = answer.read().decode()
    assert 'cmamba_stream_ended_total{reason="stop"}' in metrics
    assert "cmamba_stream_active 0.0" in metrics


def test_sigterm_ends_open_streams_with_a_final_answer(checkpoint: Path) -> None:
    server = ServerProcess({"CMAMBA_MODEL_PATH": str(checkpoint), "CMAMBA_DRAIN_TIMEOUT_S": "60"})
    try:
        server.wait_ready()
        client = StreamClient(_ws(server), update_interval_s=0.5)
        client.open()
        t = np.arange(16_000 * 2) / 16_000
        client.send_audio((0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
        got_update = threading.Event()
        wait_until(lambda: bool(client.updates) or got_update.is_set(), "a first update", 60)
        server.proc.send_signal(signal.SIGTERM)
        final = client.wait_final(timeout=60)
        assert final["reason"] == "draining" and final["result"] is not None
        assert final["result"]["modalities"]["audio_seconds"] == pytest.approx(2.0)
        wait_until(lambda: server.proc.poll() is not None, "the server to exit", 60)
        assert server.proc.returncode == 0, server.log_tail()
        assert client.close_code == 1001
        client.close()
    finally:
        server.stop()
