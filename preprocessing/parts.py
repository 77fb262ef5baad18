"""Long recordings in parts: cut points at video keyframes, and each part copied to a file.

A recording of an hour is not decoded at once: it is cut into parts of about ``part_s``
seconds, each copied (packets as they are, nothing re-encoded) into a Matroska file of its own
that the :class:`~preprocessing.extractor.Extractor` reads like any clip. Cuts fall on video
keyframes, so every part starts with a frame that decodes on its own; audio-only media is cut
at the nominal times. Timestamps in a part start at zero (the part's own clock).

Planning reads the packets' headers only (no decoding): the plan of an hour of video takes
well under a second of demuxing per few minutes of media.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from preprocessing.errors import CorruptMediaError, NoUsableStreamError, UnsupportedMediaError
from preprocessing.media import SUPPORTED_HINT, open_container, sniff_container


@dataclass(frozen=True)
class PartPlan:
    """Where a recording is cut: ``bounds[i] = (start_s, end_s)`` of part ``i``."""

    duration_s: float
    bounds: tuple[tuple[float, float], ...]
    has_video: bool
    has_audio: bool


def _time(value: int | None, time_base: Fraction | None) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def plan_parts(
    path: Path | str,
    part_s: float,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> PartPlan:
    """Read ``path``'s packet headers and choose cut points about ``part_s`` seconds apart.

    Raises :class:`UnsupportedMediaError` for a container it does not know,
    :class:`NoUsableStreamError` when it has neither audio nor video and
    :class:`CorruptMediaError` when it cannot be read.
    """
    import av

    if part_s <= 0:
        raise ValueError("part_s must be positive")
    container = sniff_container(path)
    with open_container(path, container) as handle:
        video = next(iter(handle.streams.video), None)
        audio = next(iter(handle.streams.audio), None)
        if video is None and audio is None:
            raise NoUsableStreamError(
                f"The {container.name} file has neither audio nor video. {SUPPORTED_HINT}"
            )
        origin = _origin(handle)
        keyframes: list[float] = []
        end = 0.0
        try:
            for packet in handle.demux(*[s for s in (video, audio) if s is not None]):
                if should_stop is not None and should_stop():
                    raise CorruptMediaError("The reading of the file was stopped.")
                start = _time(packet.pts, packet.time_base)
                if start is None:
                    continue
                start -= origin
                length = _time(packet.duration, packet.time_base) or 0.0
                end = max(end, start + length)
                if packet.stream is video and packet.is_keyframe:
                    keyframes.append(start)
        except (av.error.FFmpegError, ValueError, IndexError) as exc:
            raise CorruptMediaError(
                f"The {container.name} file could not be read ({type(exc).__name__})."
            ) from None
    if end <= 0:
        raise CorruptMediaError(
            f"No audio or video packets were found in the {container.name} file."
        )
    cuts = _cut_points(end, part_s, sorted(keyframes) if video is not None else None)
    bounds = tuple(itertools.pairwise(cuts))
    return PartPlan(
        duration_s=end, bounds=bounds, has_video=video is not None, has_audio=audio is not None
    )


def probe_duration(path: Path | str) -> tuple[str, float | None]:
    """The container's name and the duration its header gives (None when it gives none),
    decoding nothing. Raises the typed errors of :func:`plan_parts`."""
    container = sniff_container(path)
    with open_container(path, container) as handle:
        if not handle.streams.video and not handle.streams.audio:
            raise NoUsableStreamError(
                f"The {container.name} file has neither audio nor video. {SUPPORTED_HINT}"
            )
        duration = float(handle.duration) / 1_000_000 if handle.duration else None
    return container.name, duration


def _cut_points(duration_s: float, part_s: float, keyframes: list[float] | None) -> list[float]:
    """``[0, c1, ..., duration_s]``: nominal multiples of ``part_s``, each moved to the first
    keyframe at or after it when there is video."""
    cuts = [0.0]
    nominal = part_s
    while nominal < duration_s - 1e-3:
        cut = nominal
        if keyframes is not None:
            later = [k for k in keyframes if k >= nominal - 1e-6]
            if not later:
                break
            cut = later[0]
        if cut > cuts[-1] + 1e-3 and cut < duration_s - 1e-3:
            cuts.append(cut)
        nominal = max(nominal + part_s, cut + 1e-3)
    cuts.append(duration_s)
    return cuts


def write_part(path: Path | str, start_s: float, end_s: float, out: Path | str) -> None:
    """Copy the packets of ``[start_s, end_s)`` of ``path`` into a Matroska file ``out``, its
    timestamps moved to start at zero (see :func:`plan_parts` for the cut points)."""
    import av

    container = sniff_container(path)
    with open_container(path, container) as handle:
        origin = _origin(handle)
        video = next(iter(handle.streams.video), None)
        audio = next(iter(handle.streams.audio), None)
        sources = [s for s in (video, audio) if s is not None]
        try:
            with av.open(str(out), "w", format="matroska") as sink:
                targets: dict[int, Any] = {
                    s.index: sink.add_stream_from_template(s) for s in sources
                }
                if start_s > 0:
                    handle.seek(int((start_s + origin) * 1_000_000), backward=True, any_frame=False)
                done: set[int] = set()
                for packet in handle.demux(*sources):
                    if packet.dts is None or packet.pts is None:
                        continue  # the demuxer's flush packets
                    tb = packet.time_base
                    at = float(packet.pts * tb) - origin
                    if at >= end_s - 1e-6:
                        done.add(packet.stream.index)
                        if len(done) == len(sources):
                            break
                        continue
                    if at < start_s - 1e-6:
                        continue
                    shift = round((start_s + origin) / tb)
                    packet.pts -= shift
                    packet.dts -= shift
                    if packet.dts < 0:  # B-frame reordering at the cut
                        continue
                    packet.stream = targets[packet.stream.index]
                    sink.mux(packet)
        except (av.error.FFmpegError, ValueError, IndexError) as exc:
            raise CorruptMediaError(
                f"A part of the {container.name} file could not be copied ({type(exc).__name__})."
            ) from None


def _origin(handle: Any) -> float:
    if handle.start_time is not None:
        return float(handle.start_time) / 1_000_000
    return 0.0


__all__ = ["PartPlan", "UnsupportedMediaError", "plan_parts", "probe_duration", "write_part"]
