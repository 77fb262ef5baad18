"""Fixtures shared by every test folder; the plain functions behind several of them are in
tests/helpers.py (``from helpers import ...``)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helpers
import numpy as np
import pytest
from pg import PostgresServer

# The shared folder beside the repository (CI clones the repo with shared/ next to it).
SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Fixtures that start a real process (``cmamba serve``, Ray, Prometheus, a deployment tool) or
# a server on a port. A test that uses one, directly or through another fixture, is marked
# ``integration``; tests that start processes themselves carry the mark in their file.
PROCESS_FIXTURES = frozenset(
    {
        "spawn_server",  # tests/service: `cmamba serve` subprocesses
        "media_server",
        "features_server",
        "unused_port",  # an app served by uvicorn on a real socket
        "live_service",  # tests/deploy: the service, Prometheus, Ray Serve, tool binaries
        "prometheus",
        "ray_stack",
        "ray_prometheus",
        "tool",
        "ray_service",  # tests/ray: Ray Serve behind HAProxy
        "postgres_server",  # a PostgreSQL server (tests/pg.py): the job store's database
    }
)


@pytest.fixture(scope="session", autouse=True)
def _session_jobs_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Apps and servers the tests start keep their jobs (/v1/jobs) in a folder of this session,
    never in the user's data folder; a test that sets ``CMAMBA_JOBS_DIR`` itself wins."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CMAMBA_JOBS_DIR", str(tmp_path_factory.mktemp("jobs-default")))
    yield
    patch.undo()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def shared_media() -> Path:
    """The shared real media clips (see shared/media/SOURCES.md)."""
    media = SHARED / "media"
    if not media.is_dir():
        pytest.skip(f"shared media folder not found at {media}")
    return media


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes PyTorch's CPU allocator held during ``fn()`` above what was live at its
    start (every c10 allocation and free, as recorded by ``torch.profiler``)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            extra = node.extra_fields
            events.append((node.start_time_ns, extra.alloc_size, extra.total_allocated))
        stack.extend(node.children)
    if not events:
        return 0
    events.sort()
    base = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - base


def remux_streams(src: Path, dst: Path, fmt: str, kinds: tuple[str, ...]) -> Path:
    """Copy the streams of ``kinds`` ("audio", "video") from ``src`` into a new container."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", format=fmt) as out:
        pairs = {}
        for stream in inp.streams:
            if stream.type in kinds:
                pairs[stream.index] = out.add_stream_from_template(stream)
        for packet in inp.demux(*[inp.streams[i] for i in pairs]):
            if packet.dts is None:
                continue
            packet.stream = pairs[packet.stream.index]
            out.mux(packet)
    return dst


@pytest.fixture(scope="session")
def remux() -> Callable[..., Path]:
    """``remux_streams``: copy some streams of a media file into a new container."""
    return remux_streams


@pytest.fixture
def peak_bytes() -> Callable[[Callable[[], object]], int]:
    """``cpu_peak_bytes``: peak CPU allocation of a call."""
    return cpu_peak_bytes


def _encode_tone(fmt: str, codec: str, rate: int, layout: str, seconds: float = 1.0) -> bytes:
    """A 440 Hz tone encoded with PyAV into a headerless stream format (mp3, adts)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        n = int(rate * seconds)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)).astype(np.float32)
        interleaved = np.repeat(tone, av.AudioLayout(layout).nb_channels)[None, :]
        frame = av.AudioFrame.from_ndarray(interleaved, format="flt", layout=layout)
        frame.sample_rate = rate
        frame.pts = 0
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout)
        for converted in resampler.resample(frame):
            for packet in stream.encode(converted):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def encode_tone() -> Callable[..., bytes]:
    """``encode_tone(fmt, codec, rate, layout, seconds=1.0)``: a tone as mp3/adts bytes."""
    return _encode_tone


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """A few random edits of ``data``: flipped bytes, a cut, inserted or repeated runs."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        kind = int(rng.integers(0, 5))
        at = int(rng.integers(0, max(1, len(out))))
        if kind == 0:  # flip bytes
            for i in rng.integers(0, len(out), int(rng.integers(1, 16))):
                out[i] = int(rng.integers(0, 256))
        elif kind == 1:  # truncate
            del out[at:]
        elif kind == 2:  # insert random bytes
            out[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        elif kind == 3:  # repeat a region (nested or repeated structures)
            size = int(rng.integers(1, 4096))
            out[at:at] = out[at : at + size] * int(rng.integers(2, 50))
        else:  # a size field set to an extreme
            out[at : at + 4] = rng.choice([b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\xff"])
        if not out:
            break
    return bytes(out)


@pytest.fixture(scope="session")
def mutate() -> Callable[[bytes, np.random.Generator], bytes]:
    """``mutate(data, rng)``: seeded random edits of a file's bytes (fuzzing)."""
    return _mutate


@pytest.fixture
def unused_port() -> int:
    """A free loopback port."""
    return helpers.free_port()


@pytest.fixture(scope="session")
def features_payload() -> Callable[..., dict[str, Any]]:
    """``features_payload(length, seed, modalities=...)``: a random /v1/predict/features body
    (default-v1)."""
    return helpers.features_payload


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> Iterator[helpers.KernelStandIns]:
    """Stand-in ``causal_conv1d`` and ``mamba_ssm`` modules in ``sys.modules`` for one test;
    they record their calls."""
    fakes = helpers.KernelStandIns()
    fakes.install(monkeypatch)
    yield fakes


# -- PostgreSQL (the job store's shared database) --------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throw-away PostgreSQL server for the session (tests/pg.py); make a database per
    test with ``postgres_server.create_database(name)``."""
    server = PostgresServer.start()
    yield server
    server.stop()
