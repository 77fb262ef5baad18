"""``cmamba predict FILE``: print the JSON answer for a media file (or, with no FILE, for
``--transcript`` alone: its text is scored).

With ``--url`` the file is posted to a running server (a 503 with ``Retry-After`` is retried,
a bounded number of times); without it the model and extractors are loaded in this process and
the same inference core answers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import email.utils
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file",
        type=Path,
        nargs="?",
        help="a video or audio file (default: none, then --transcript alone is scored)",
    )
    parser.add_argument(
        "--url",
        help="base URL of a running server, e.g. http://127.0.0.1:8000 (default: none, the "
        "model runs in this process)",
    )
    parser.add_argument(
        "--transcript",
        help="what is said, when known (skips speech recognition; default: none, recognised)",
    )
    parser.add_argument(
        "--api-key",
        help="bearer token for --url (default: $CMAMBA_API_KEY, else none)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (--url)")
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="times a 503 with Retry-After is retried, after the wait it asks for (--url)",
    )
    parser.add_argument(
        "--max-retry-wait",
        type=float,
        default=30.0,
        help="longest Retry-After waited for; a longer one is not retried (--url)",
    )
    parser.add_argument(
        "--model-path",
        type=Path,
        help="checkpoint folder (local mode; default: $CMAMBA_MODEL_PATH, else the embedded "
        "default checkpoint)",
    )
    parser.add_argument(
        "--device",
        help='"auto", "cpu" or "cuda[:N]" (local mode; default: $CMAMBA_DEVICE, else auto)',
    )


def run(args: argparse.Namespace) -> int:
    if args.file is None and not (args.transcript or "").strip():
        print("cmamba predict: give a FILE, or --transcript TEXT to score", file=sys.stderr)
        return 2
    if args.file is not None and not args.file.is_file():
        print(f"cmamba predict: no such file: {args.file}", file=sys.stderr)
        return 2
    if args.url:
        status, body = _predict_remote(args)
    else:
        status, body = _predict_local(args)
    print(json.dumps(body, indent=2))
    return 0 if status == 200 else 1


def _predict_remote(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    import mimetypes

    import httpx

    api_key = args.api_key or os.environ.get("CMAMBA_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = args.url.rstrip("/") + "/v1/predict"
    with contextlib.ExitStack() as stack:
        # multipart/form-data either way: a transcript alone goes as a form field
        parts: dict[str, Any] = {}
        if args.transcript:
            parts["transcript"] = (None, args.transcript)
        handle = None
        if args.file is not None:
            handle = stack.enter_context(args.file.open("rb"))
            content_type = mimetypes.guess_type(args.file.name)[0] or "application/octet-stream"
            parts["file"] = (args.file.name, handle, content_type)
        for attempt in range(max(0, args.retries) + 1):
            if handle is not None:
                handle.seek(0)
            try:
                response = httpx.post(url, files=parts, headers=headers, timeout=args.timeout)
            except httpx.HTTPError as exc:
                return 0, {"error": {"type": "connection_error", "message": f"{url}: {exc}"}}
            wait = retry_after_s(response) if response.status_code == 503 else None
            if wait is None or wait > args.max_retry_wait or attempt >= args.retries:
                break
            print(
                f"cmamba predict: the server is busy (503), retrying in {wait:g} s "
                f"({attempt + 1}/{args.retries})",
                file=sys.stderr,
            )
            time.sleep(wait)
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"type": "http_error", "message": response.text[:500]}}
    return response.status_code, body


def retry_after_s(response: Any) -> float | None:
    """Seconds a response's ``Retry-After`` asks to wait (delta-seconds or an HTTP date);
    None without a valid one."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def _predict_local(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    import asyncio
    import uuid

    from service.api.errors import http_status
    from service.api.schemas import PredictResponse
    from service.core.engine import InferenceCore
    from service.errors import ServiceError, StartupError, error_body
    from service.metrics import ServiceMetrics
    from service.settings import ServiceSettings

    overrides: dict[str, Any] = {"max_batch_delay_ms": 0.0}
    if args.model_path is not None:
        overrides["model_path"] = args.model_path
    if args.device is not None:
        overrides["device"] = args.device
    settings = ServiceSettings(**overrides)
    core = InferenceCore(settings, ServiceMetrics())
    try:
        core.check()
        core.start()
    except StartupError as exc:
        return 1, error_body("startup_failed", str(exc))
    except Exception as exc:  # a corrupt checkpoint, a missing extractor model...
        return 1, error_body("startup_failed", f"{type(exc).__name__}: {exc}")

    async def predict() -> dict[str, Any]:
        started, deadline = time.perf_counter(), time.monotonic() + settings.request_timeout_s
        async with core.admit():
            if args.file is None:
                prediction = await core.predict_text(
                    args.transcript.strip(), started=started, deadline=deadline
                )
            else:
                prediction = await core.predict_media(
                    args.file,
                    args.transcript,
                    started=started,
                    deadline=deadline,
                    remove_after=False,
                )
        return PredictResponse.from_prediction(prediction, uuid.uuid4().hex).model_dump(mode="json")

    try:
        return 200, asyncio.run(predict())
    except ServiceError as exc:
        return http_status(exc), error_body(exc.error_type, exc.message)
    finally:
        core.stop()
