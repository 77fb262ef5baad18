"""Fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

# The shared folder beside the repository (CI clones the repo with shared/ next to it).
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


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
