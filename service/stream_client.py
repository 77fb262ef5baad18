"""A small Python client of ``WS /v1/stream`` (the protocol: docs/STREAMING.md).

```python
from service.stream_client import StreamClient

with StreamClient("ws://127.0.0.1:8000/v1/stream", sample_rate=16000, token=None) as stream:
    stream.send_audio(samples)            # mono float32 in [-1, 1], in order
    stream.send_frame(jpeg_bytes, 0.4)    # with video=True
    final = stream.stop()                 # the final answer ({"type": "final", ...})
print(stream.updates[-1]["sentiment"], final["result"]["sentiment"])
```

Server messages are read on a background thread: ``on_message`` (when given) sees each one as
it arrives, and ``updates`` keeps the updates. :func:`play_media` sends a decoded media file at
real-time pace (or as fast as possible).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import numpy as np

from service.stream_wire import KIND_AUDIO, KIND_VIDEO, PROTOCOL, TOKEN_PREFIX, encode_frame


class StreamClosedError(RuntimeError):
    """The server ended the stream without a final answer (``code``, ``reason`` and the
    ``error`` body it sent, when it sent one)."""

    def __init__(self, code: int | None, reason: str, error: dict[str, Any] | None) -> None:
        detail = f": {error['error']['message']}" if error else ""
        super().__init__(f"stream closed with code {code} ({reason}){detail}")
        self.code = code
        self.reason = reason
        self.error = error


class StreamClient:
    """One live stream over a WebSocket (blocking calls; server messages on a thread).

    Args:
        url: ``ws://host:port/v1/stream``.
        sample_rate: samples per second of the audio sent.
        audio_format: "f32le" or "s16le" (how samples are put on the wire).
        video: whether JPEG frames will be sent.
        update_interval_s: seconds of stream between updates.
        transcript_hint: what is said, when known.
        token: the server's API token (sent as a subprotocol, never in the URL).
        on_message: called with every server message (on the reader thread).
        open_timeout: seconds to connect and get the ``ready`` message.
    """

    def __init__(
        self,
        url: str,
        *,
        sample_rate: int = 16_000,
        audio_format: str = "f32le",
        video: bool = False,
        update_interval_s: float = 1.0,
        transcript_hint: str | None = None,
        token: str | None = None,
        on_message: Callable[[dict[str, Any]], None] | None = None,
        open_timeout: float = 30.0,
    ) -> None:
        if audio_format not in ("f32le", "s16le"):
            raise ValueError(f"audio_format must be f32le or s16le, not {audio_format!r}")
        self.url = url
        self.sample_rate = sample_rate
        self.audio_format = audio_format
        self.video = video
        self.update_interval_s = update_interval_s
        self.transcript_hint = transcript_hint
        self._token = token
        self._on_message = on_message
        self._open_timeout = open_timeout
        self._socket: Any = None
        self._reader: threading.Thread | None = None
        self._final: queue.Queue[dict[str, Any] | BaseException] = queue.Queue()
        self.ready: dict[str, Any] | None = None
        self.updates: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self.close_code: int | None = None
        self._audio_s = 0.0

    # -- connection ---------------------------------------------------------------------------

    def open(self) -> StreamClient:
        """Connect, send the start message and wait for ``ready``.

        Raises:
            StreamClosedError: the server refused the stream (token, limits, bad start).
        """
        from websockets.sync.client import connect

        protocols = [PROTOCOL] + ([TOKEN_PREFIX + self._token] if self._token else [])
        self._socket = connect(
            self.url,
            subprotocols=protocols,  # type: ignore[arg-type]
            open_timeout=self._open_timeout,
            max_size=2**22,
        )
        start: dict[str, Any] = {
            "type": "start",
            "audio": {"format": self.audio_format, "sample_rate": self.sample_rate},
            "update_interval_s": self.update_interval_s,
        }
        if self.video:
            start["video"] = {"format": "jpeg"}
        if self.transcript_hint:
            start["transcript_hint"] = self.transcript_hint
        self._socket.send(json.dumps(start))
        first = self._next_message(self._open_timeout)
        if first is None or first.get("type") != "ready":
            self._raise_closed(first)
        self.ready = first
        self._reader = threading.Thread(target=self._read, name="cmamba-stream-reader", daemon=True)
        self._reader.start()
        return self

    def __enter__(self) -> StreamClient:
        return self.open()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (without a stop: the server ends the stream, no answer)."""
        if self._socket is not None:
            self._socket.close()
        if self._reader is not None:
            self._reader.join(timeout=5)

    # -- sending ------------------------------------------------------------------------------

    def send_audio(self, samples: np.ndarray) -> None:
        """Send mono samples (float in [-1, 1]) at the stream's sample rate, in order."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self.audio_format == "f32le":
            payload = samples.astype("<f4").tobytes()
        else:
            payload = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
        self._send(encode_frame(KIND_AUDIO, self._audio_s, payload))
        self._audio_s += len(samples) / self.sample_rate

    def send_frame(self, jpeg: bytes, time_s: float) -> None:
        """Send one JPEG video frame at ``time_s`` seconds of stream (in time order)."""
        self._send(encode_frame(KIND_VIDEO, time_s, jpeg))

    def stop(self, timeout: float = 120.0) -> dict[str, Any]:
        """Send the stop message and wait for the final answer.

        Raises:
            StreamClosedError: the stream ended without one.
            TimeoutError: none came within ``timeout`` seconds.
        """
        self._send(json.dumps({"type": "stop"}))
        return self.wait_final(timeout)

    def wait_final(self, timeout: float = 120.0) -> dict[str, Any]:
        """The final answer, once the server sends it (stop, idle, max duration, drain).

        Raises:
            StreamClosedError: the stream ended without one.
            TimeoutError: none came within ``timeout`` seconds.
        """
        try:
            outcome = self._final.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no final answer within {timeout} s") from None
        self._final.put(outcome)  # later calls answer the same
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _send(self, message: bytes | str) -> None:
        if self._socket is None:
            raise RuntimeError("the stream is not open")
        from websockets.exceptions import ConnectionClosed

        try:
            self._socket.send(message)
        except ConnectionClosed:
            self.wait_final(timeout=5)  # raises the server's reason when it closed on an error
            raise

    # -- reading ------------------------------------------------------------------------------

    def _next_message(self, timeout: float | None = None) -> dict[str, Any] | None:
        from websockets.exceptions import ConnectionClosed

        try:
            raw = self._socket.recv(timeout=timeout)
        except ConnectionClosed as exc:
            self.close_code = exc.rcvd.code if exc.rcvd is not None else None
            self._close_reason = exc.rcvd.reason if exc.rcvd is not None else ""
            return None
        message: dict[str, Any] = json.loads(raw)
        return message

    def _raise_closed(self, message: dict[str, Any] | None) -> None:
        error = message if message is not None and "error" in message else None
        if error is not None and self.close_code is None:
            self._next_message(5)  # read the close frame that follows the error
        raise StreamClosedError(self.close_code, getattr(self, "_close_reason", ""), error)

    def _read(self) -> None:
        error: dict[str, Any] | None = None
        while True:
            message = self._next_message()
            if message is None:
                break
            if self._on_message is not None:
                self._on_message(message)
            kind = message.get("type")
            if kind == "update":
                self.updates.append(message)
            elif kind == "final":
                self.final = message
                self._final.put(message)
            elif "error" in message:
                error = message
        if self.final is None:
            reason = getattr(self, "_close_reason", "")
            self._final.put(StreamClosedError(self.close_code, reason, error))


def media_pieces(
    audio: np.ndarray | None,
    frames: Iterator[tuple[np.ndarray, float]] | list[tuple[np.ndarray, float]],
    sample_rate: int,
    piece_s: float = 0.1,
) -> Iterator[tuple[float, str, Any]]:
    """(stream time, "audio" | "video", samples or RGB frame) in time order: audio in pieces
    of ``piece_s``, each frame before the audio piece that starts after it."""
    step = max(1, int(sample_rate * piece_s))
    pending = list(frames)
    index = 0
    n = 0 if audio is None else len(audio)
    for first in range(0, n, step):
        time_s = first / sample_rate
        while index < len(pending) and pending[index][1] <= time_s:
            yield pending[index][1], "video", pending[index][0]
            index += 1
        assert audio is not None
        yield time_s, "audio", audio[first : first + step]
    for frame, time_s in pending[index:]:
        yield time_s, "video", frame


def jpeg_of(rgb: np.ndarray, quality: int = 85) -> bytes:
    """An RGB frame as JPEG bytes."""
    import cv2

    ok, data = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("the frame could not be encoded as JPEG")
    return bytes(data)


def play_media(
    client: StreamClient,
    audio: np.ndarray | None,
    frames: list[tuple[np.ndarray, float]],
    *,
    fast: bool = False,
    piece_s: float = 0.1,
) -> None:
    """Send decoded media through an open client at real-time pace (or as fast as possible
    with ``fast``), audio in pieces of ``piece_s`` and frames at their times."""
    started = time.monotonic()
    for time_s, kind, data in media_pieces(audio, frames, client.sample_rate, piece_s):
        if not fast:  # a piece of audio is sent once it has been "captured": at its end
            due = time_s + (len(data) / client.sample_rate if kind == "audio" else 0.0)
            wait = started + due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        if kind == "audio":
            client.send_audio(data)
        elif client.video:
            client.send_frame(jpeg_of(data), time_s)
