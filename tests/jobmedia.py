"""Helpers of the job tests: long recordings that are cheap to make and to analyse (a mono WAV
whose tone comes and goes, no speech), an audio-only tiny checkpoint (its extraction runs no ASR
and no face mesh), and a real HTTP receiver of callbacks."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from helpers import tiny_checkpoint

RATE = 16_000


def write_tone_wav(path: Path, seconds: float, *, seed: int = 0) -> Path:
    """A 16 kHz mono WAV: tones of changing pitch that come and go every few seconds."""
    import av

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    pitch = 150.0 + 60.0 * np.sin(2 * np.pi * 0.05 * t)
    gate = (np.sin(2 * np.pi * 0.2 * t + rng.uniform(0, 6)) > -0.2).astype(np.float32)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    signal = (0.3 * gate * np.sin(phase) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=RATE)
        stream.layout = "mono"
        for first in range(0, signal.size, 8192):
            frame = av.AudioFrame.from_ndarray(
                signal[None, first : first + 8192], format="flt", layout="mono"
            )
            frame.sample_rate, frame.pts = RATE, first
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def audio_checkpoint(folder: Path) -> Path:
    """A tiny real model (seeded random weights) that reads the audio modality alone."""
    return tiny_checkpoint(folder, ("audio",), name="tiny-audio")


class Receiver:
    """A real HTTP server on 127.0.0.1 that answers 500 to the first ``failures`` POSTs."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.requests.append(
                    {"at": time.monotonic(), "headers": dict(self.headers), "body": body}
                )
                code = 500 if len(receiver.requests) <= receiver.failures else 204
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/job"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
