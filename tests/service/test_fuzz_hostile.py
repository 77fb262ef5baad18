"""Seeded fuzzing of the media path and the features endpoint against real servers.

A fixed number of cases (bounded time): mutated shared clips with random declared types, and
random features bodies. No answer is a 5xx, and afterwards the server holds no upload file and
no more threads or file descriptors than before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow

MEDIA_CASES = 40
FEATURES_CASES = 150
CONTENT_TYPES = ["video/mp4", "audio/mpeg", "audio/flac", "application/octet-stream", "video/x-flv"]


def _resources(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def _upload_files(pid: int) -> list[Path]:
    import tempfile

    folders = Path(tempfile.gettempdir()).glob(f"cmamba-uploads-{pid}-*")
    return [f for folder in folders for f in folder.iterdir()]


def _media_cases(
    media: Path, mutate: Callable[[bytes, np.random.Generator], bytes]
) -> Iterator[tuple[str, bytes, str, str | None]]:
    rng = np.random.default_rng(1919)
    clips = sorted(p for p in media.iterdir() if p.suffix in (".mp4", ".flv", ".mpg", ".flac"))
    sources = [clip.read_bytes()[:1_500_000] for clip in clips]
    for i in range(MEDIA_CASES):
        source = sources[i % len(sources)]
        data = mutate(source, rng) or b"\0"
        kind = CONTENT_TYPES[int(rng.integers(len(CONTENT_TYPES)))]
        transcript = "it was fine" if rng.random() < 0.7 else None
        yield f"case{i}{clips[i % len(clips)].suffix}", data, kind, transcript


def _features_cases(dims: dict[str, int]) -> Iterator[bytes]:
    rng = np.random.default_rng(2019)
    modalities = list(dims)
    for i in range(FEATURES_CASES):
        steps = int(rng.integers(1, 40))
        body: dict[str, Any] = {"profile": "default-v1", "features": {}}
        for m in modalities:
            if rng.random() < 0.7:
                values = rng.standard_normal((steps, dims[m])) * 10.0 ** rng.integers(-3, 39)
                body["features"][m] = values.astype(np.float64).tolist()
        variant = i % 10
        if variant == 1 and body["features"]:  # ragged
            first = next(iter(body["features"].values()))
            first[0] = first[0][:-1]
        elif variant == 2:  # masks of random shapes
            body["masks"] = {m: [bool(b) for b in rng.integers(0, 2, int(rng.integers(0, 50)))]
                             for m in modalities}  # fmt: skip
        elif variant == 3:  # another profile, strings where numbers go
            body["profile"] = "mmsa-sims"
            body["features"] = {"text": [["1.0", None, True]]}
        elif variant == 4:  # deeper lists
            body["features"] = {m: [[[0.0]]] for m in modalities}
        text = json.dumps(body, allow_nan=True)  # NaN and Infinity are not JSON
        if variant == 5:
            text = text[: int(rng.integers(0, len(text)))]  # truncated
        elif variant == 6:
            raw = bytearray(text.encode())
            for at in rng.integers(0, len(raw), 8):
                raw[at] = int(rng.integers(0, 256))
            yield bytes(raw)
            continue
        yield text.encode()


def test_fuzzed_uploads_never_answer_5xx_nor_leak(
    media_server: Any, shared_media: Path, mutate: Callable[[bytes, np.random.Generator], bytes]
) -> None:
    pid = media_server.proc.pid
    httpx.post(f"{media_server.url}/v1/predict", files={"file": ("a.mp3", b"xx")}, timeout=60)
    before = _resources(pid)
    statuses = []
    for name, data, kind, transcript in _media_cases(shared_media, mutate):
        answer = httpx.post(
            f"{media_server.url}/v1/predict",
            files={"file": (name, data, kind)},
            data={"transcript": transcript} if transcript else {},
            timeout=120,
        )
        assert answer.status_code < 500 or answer.status_code == 503, (name, answer.text[:300])
        statuses.append(answer.status_code)
    threads, fds = _resources(pid)
    assert threads <= before[0] + 2 and fds <= before[1] + 2, (before, (threads, fds))
    assert _upload_files(pid) == []
    assert len(set(statuses)) > 1  # the cases are not all refused the same way


def test_fuzzed_features_bodies_never_answer_5xx(
    features_server: Any, dims: dict[str, int]
) -> None:
    pid = features_server.proc.pid
    before = _resources(pid)
    seen = set()
    with httpx.Client(timeout=60) as client:
        for i, body in enumerate(_features_cases(dims)):
            answer = client.post(
                f"{features_server.url}/v1/predict/features",
                content=body,
                headers={"content-type": "application/json"},
            )
            assert answer.status_code < 500, (i, answer.text[:300])
            seen.add(answer.status_code)
    assert {200, 422} <= seen
    threads, fds = _resources(pid)
    assert threads <= before[0] + 2 and fds <= before[1] + 2, (before, (threads, fds))
