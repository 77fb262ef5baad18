"""``cmamba stream FILE``: play a media file to a running server's ``WS /v1/stream`` at
real-time pace (or ``--fast``) and print each update, then the final answer.

The file is decoded here (audio at 16 kHz mono; with a video stream, frames sampled as the
extractor samples them, sent as JPEG). Each update is one line; the final answer is printed as
JSON (with ``--json``, every server message is printed as one JSON line instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a video or audio file to play")
    parser.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="base URL of the running server (http:// or ws://)",
    )
    parser.add_argument(
        "--api-key", help="the server's token (default: $CMAMBA_API_KEY, else none)"
    )
    parser.add_argument(
        "--fast", action="store_true", help="send as fast as possible instead of in real time"
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds of stream between updates"
    )
    parser.add_argument("--no-video", action="store_true", help="send the audio only")
    parser.add_argument(
        "--transcript", help="what is said, when known (default: none, recognised live)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print every server message as one JSON line"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the final answer"
    )


def _ws_url(base: str) -> str:
    base = base.rstrip("/")
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if base.startswith(http):
            base = ws + base[len(http) :]
    return base if base.endswith("/v1/stream") else base + "/v1/stream"


def _line(message: dict[str, Any]) -> str:
    sentiment = message["sentiment"]
    words = " ".join(w["text"] for w in message["words"])
    return (
        f"t={message['stream_time_s']:6.1f}s  score={sentiment['score']:+.3f} "
        f"{sentiment['label']:<8}  lag={message['lag_s']:.2f}s  "
        f"latency={message['latency_ms']:.0f}ms  dropped={message['dropped_frames']}"
        + (f"  | {words}" if words else "")
    )


def run(args: argparse.Namespace) -> int:
    from preprocessing import ExtractorSettings
    from preprocessing.errors import PreprocessingError
    from preprocessing.media import AUDIO_SAMPLE_RATE, decode_media
    from service.stream_client import StreamClient, StreamClosedError, play_media

    if not args.file.is_file():
        print(f"cmamba stream: no such file: {args.file}", file=sys.stderr)
        return 2
    frames: list[tuple[Any, float]] = []
    try:
        media = decode_media(
            args.file,
            ExtractorSettings(),
            audio=True,
            video=not args.no_video,
            on_frame=lambda rgb, time_s: frames.append((rgb, time_s)),
        )
    except PreprocessingError as exc:
        print(f"cmamba stream: cannot decode {args.file}: {exc}", file=sys.stderr)
        return 2
    if media.audio is None:
        print(f"cmamba stream: {args.file} has no audio stream", file=sys.stderr)
        return 2

    def show(message: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(message), flush=True)
        elif message.get("type") == "update":
            print(_line(message), flush=True)

    client = StreamClient(
        _ws_url(args.url),
        sample_rate=AUDIO_SAMPLE_RATE,
        video=bool(frames),
        update_interval_s=args.interval,
        transcript_hint=args.transcript,
        token=args.api_key or os.environ.get("CMAMBA_API_KEY") or None,
        on_message=show,
    )
    try:
        with client:
            play_media(client, media.audio, frames, fast=args.fast)
            final = client.stop(timeout=args.timeout)
    except StreamClosedError as exc:
        print(f"cmamba stream: {exc}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError) as exc:
        print(f"cmamba stream: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if not args.json:
        print(json.dumps(final, indent=2))
    return 0
