"""Container detection, header checks and single-pass decoding with PyAV.

``sniff_container`` reads the first bytes of a file (magic numbers), never its name.
``probe_media`` opens the container and checks the configured limits from its header before
anything is decoded. ``decode_media`` then demuxes the file once, decoding audio to 16 kHz mono
float32 and sampling video frames at a fixed rate as RGB arrays. Nothing is written to disk.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.errors import (
    CorruptMediaError,
    ExtractionStoppedError,
    MediaTooLargeError,
    MediaTooLongError,
    NoUsableStreamError,
    UnsupportedMediaError,
)
from preprocessing.headers import declared_frame_sizes
from preprocessing.settings import ExtractorSettings

AUDIO_SAMPLE_RATE = 16_000

SUPPORTED_HINT = (
    "Send a video (mp4, mov, mkv, webm, avi, flv, mpg) or an audio file (wav, flac, mp3, m4a, ogg)."
)

# A decoded stream shorter than this fraction of its header duration is treated as truncated.
_TRUNCATION_RATIO = 0.9
_TRUNCATION_SLACK_S = 0.5


@dataclass(frozen=True)
class Container:
    """A container recognised from its first bytes: a short name and the FFmpeg demuxer."""

    name: str
    demuxer: str


def _syncsafe(b: bytes) -> int:
    return (b[0] << 21) | (b[1] << 14) | (b[2] << 7) | b[3]


def _sniff_bytes(head: bytes) -> Container | None:
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        brand = head[8:12] if head[4:8] == b"ftyp" else b""
        if brand == b"qt  ":
            return Container("mov", "mov")
        if brand in (b"M4A ", b"M4B "):
            return Container("m4a", "mov")
        return Container("mp4", "mov")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return Container("webm" if b"webm" in head[:64] else "matroska", "matroska")
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return Container("wav", "wav")
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return Container("avi", "avi")
    if head.startswith(b"FLV\x01"):
        return Container("flv", "flv")
    if head.startswith(b"\x00\x00\x01\xba"):
        return Container("mpg", "mpeg")
    if head.startswith(b"\x00\x00\x01\xb3"):
        return Container("mpg", "mpegvideo")
    if len(head) > 376 and head[0] == 0x47 and head[188] == 0x47 and head[376] == 0x47:
        return Container("mpegts", "mpegts")
    if head.startswith(b"fLaC"):
        return Container("flac", "flac")
    if head.startswith(b"OggS"):
        return Container("ogg", "ogg")
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xF6) == 0xF0:
        return Container("aac", "aac")  # ADTS: sync 0xFFF, layer 00
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0 and (head[1] & 0x06):
        return Container("mp3", "mp3")  # MPEG audio frame sync with a layer
    return None


_IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
)


def sniff_container(path: Path | str) -> Container:
    """Recognise the container from the file's first bytes.

    Raises :class:`CorruptMediaError` for an empty file and :class:`UnsupportedMediaError` for
    anything that is not a supported audio or video container.
    """
    with open(path, "rb") as handle:
        head = handle.read(4096)
        if not head:
            raise CorruptMediaError("The file is empty. " + SUPPORTED_HINT)
        found = _sniff_bytes(head)
        if found is None and head.startswith(b"ID3") and len(head) >= 10:
            # An ID3v2 tag precedes MP3 (and sometimes FLAC or AAC) data: look behind it.
            handle.seek(10 + _syncsafe(head[6:10]))
            inner = handle.read(4096)
            found = _sniff_bytes(inner) or (Container("mp3", "mp3") if inner else None)
            if found is not None and found.demuxer not in ("mp3", "flac", "aac"):
                found = Container("mp3", "mp3")
    if found is not None:
        return found
    for magic, what in _IMAGE_MAGIC:
        if head.startswith(magic):
            raise UnsupportedMediaError(
                f"The file is {what}; still images are not supported. " + SUPPORTED_HINT
            )
    if _looks_like_text(head):
        raise UnsupportedMediaError(
            "The file is text, not audio or video. Send the transcript in the 'transcript' "
            "field and the recording as the file. " + SUPPORTED_HINT
        )
    raise UnsupportedMediaError(
        "The file is not a recognised audio or video container. " + SUPPORTED_HINT
    )


def _looks_like_text(head: bytes) -> bool:
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in decoded)
    return printable >= 0.95 * len(decoded)


@dataclass(frozen=True)
class MediaInfo:
    """What the container header says, checked against the limits."""

    container: Container
    file_bytes: int
    duration_s: float | None  # None when the header does not say
    has_audio: bool
    has_video: bool
    width: int | None = None
    height: int | None = None
    frame_rate: float | None = None
    frame_count: int | None = None
    audio_sample_rate: int | None = None
    audio_channels: int | None = None


@dataclass
class DecodedMedia:
    """Decoded streams of one clip; times are seconds from the start of the clip."""

    info: MediaInfo
    duration_s: float  # extent of what was decoded (or the header duration when nothing was)
    audio: np.ndarray | None = None  # (N,) float32 at AUDIO_SAMPLE_RATE, mono
    frames: list[np.ndarray] = field(default_factory=list)  # each (H, W, 3) uint8 RGB
    frame_times: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float64))  # (F,)

    @property
    def audio_seconds(self) -> float:
        """Seconds of decoded audio (0 without audio)."""
        return 0.0 if self.audio is None else len(self.audio) / AUDIO_SAMPLE_RATE


def _video_stream(container: Any) -> Any | None:
    import av

    for stream in container.streams.video:
        if stream.disposition & av.stream.Disposition.attached_pic:
            continue  # cover art in an audio file, not a video
        return stream
    return None


def _audio_stream(container: Any) -> Any | None:
    return container.streams.audio[0] if container.streams.audio else None


def _seconds(value: int | None, time_base: Any) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


@contextmanager
def open_container(path: Path | str, container: Container) -> Iterator[Any]:
    """Open ``path`` with the demuxer chosen from its bytes; FFmpeg errors become typed errors."""
    import av

    try:
        handle = av.open(str(path), mode="r", format=container.demuxer, metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptMediaError(
            f"The file looks like {container.name} but could not be opened ({_reason(exc)}); "
            "it may be damaged or truncated."
        ) from None
    try:
        yield handle
    finally:
        handle.close()


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split(":")[-1].strip() or type(exc).__name__


def _checked_size(path: Path | str, settings: ExtractorSettings) -> int:
    size = os.path.getsize(path)
    if size > settings.max_file_bytes:
        raise MediaTooLargeError(
            f"The file is {size / 1e6:.1f} MB; the limit is {settings.max_file_bytes / 1e6:.1f} MB."
        )
    return size


def probe_media(path: Path | str, settings: ExtractorSettings) -> MediaInfo:
    """Recognise the container and check every limit from its header, decoding nothing."""
    size = _checked_size(path, settings)
    container = sniff_container(path)
    with open_container(path, container) as handle:
        return _header_info(handle, container, size, settings, str(path))


def _header_info(
    handle: Any, container: Container, size: int, settings: ExtractorSettings, path: str
) -> MediaInfo:
    video = _video_stream(handle)
    audio = _audio_stream(handle)
    if video is None and audio is None:
        raise NoUsableStreamError(
            "The file has neither an audio nor a video stream. " + SUPPORTED_HINT
        )
    durations = []
    if handle.duration is not None and handle.duration > 0:
        durations.append(handle.duration / 1_000_000)
    for stream in (video, audio):
        if stream is not None:
            seconds = _seconds(stream.duration, stream.time_base)
            if seconds is not None and seconds > 0:
                durations.append(seconds)
    duration = max(durations) if durations else None
    if duration is not None and duration > settings.max_duration_s:
        raise MediaTooLongError(
            f"The clip is {duration:.1f} s long; the limit is {settings.max_duration_s:.0f} s. "
            "Send a shorter clip."
        )
    width = height = frame_count = None
    frame_rate = None
    if video is not None:
        width = int(video.codec_context.width or 0) or None
        height = int(video.codec_context.height or 0) or None
        # FFmpeg reports an oversized frame as 0x0: also look at what the header declares.
        for declared_w, declared_h in declared_frame_sizes(path, container.demuxer):
            if declared_w * declared_h > (width or 0) * (height or 0):
                width, height = declared_w, declared_h
        if (width or 0) > settings.max_width or (height or 0) > settings.max_height:
            raise MediaTooLargeError(
                f"The video is {width}x{height} pixels; the limit is "
                f"{settings.max_width}x{settings.max_height}. Send a smaller video."
            )
        rate = video.average_rate or video.guessed_rate or video.base_rate
        frame_rate = float(rate) if rate else None
        frame_count = int(video.frames or 0) or None
        if frame_count is None and frame_rate and duration:
            frame_count = math.ceil(frame_rate * duration)
        if frame_count is not None and frame_count > settings.max_frames:
            raise MediaTooLargeError(
                f"The video has {frame_count} frames; the limit is {settings.max_frames}. "
                "Send a shorter clip or one with a lower frame rate."
            )
    if audio is not None:
        _check_audio_rate(
            int(audio.codec_context.sample_rate or 0), int(audio.codec_context.channels or 0),
            settings,
        )  # fmt: skip
    return MediaInfo(
        container=container,
        file_bytes=size,
        duration_s=duration,
        has_audio=audio is not None,
        has_video=video is not None,
        width=width,
        height=height,
        frame_rate=frame_rate,
        frame_count=frame_count,
        audio_sample_rate=int(audio.codec_context.sample_rate or 0) or None if audio else None,
        audio_channels=int(audio.codec_context.channels or 0) or None if audio else None,
    )


def _check_audio_rate(rate: int, channels: int, settings: ExtractorSettings) -> None:
    if rate * channels > settings.max_audio_rate_channels:
        raise MediaTooLargeError(
            f"The audio has {rate} Hz x {channels} channels; the limit is "
            f"{settings.max_audio_rate_channels} samples per second over all channels. Send "
            "audio at a usual sample rate (16-48 kHz, mono or stereo)."
        )


def next_frame_sample_s(time_s: float, period_s: float) -> float:
    """When the next video frame is sampled after one kept at ``time_s``: the next multiple of
    the sampling period (frames earlier than that, less 1 us, are skipped)."""
    return (math.floor(max(time_s, 0.0) / period_s + 1e-6) + 1) * period_s


def scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """A frame's size scaled down so its longer side fits ``max_side`` (even sizes)."""
    return _scaled_size(width, height, max_side)


def _scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    # Even sizes keep swscale's chroma handling exact.
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def decode_media(
    path: Path | str,
    settings: ExtractorSettings,
    *,
    audio: bool,
    video: bool,
    on_frame: Callable[[np.ndarray, float], None] | None = None,
    frame_handler: Callable[[MediaInfo], Callable[[np.ndarray, float], None] | None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DecodedMedia:
    """Probe, check limits, then decode the requested streams in one pass over the file.

    ``audio``: decode the audio stream to 16 kHz mono float32. ``video``: sample frames at
    ``settings.frame_rate_hz`` as RGB, scaled so the longer side is at most
    ``settings.frame_max_side``. A stream that the file lacks is simply absent from the result.
    Limits are enforced again while decoding, for headers that under-report.

    ``on_frame``: streaming. Each sampled frame is handed to ``on_frame(rgb, time_s)`` as it is
    decoded and then dropped, so ``frames`` stays empty (``frame_times`` is still filled) and
    memory does not grow with the clip's length.

    ``frame_handler``: the streaming decision made from the header, without opening the file
    twice. It is called once with the header's :class:`MediaInfo` (before any frame is
    decoded, and only when a video stream is decoded); what it returns, when not None, is used
    as ``on_frame``.

    ``should_stop``: polled before each packet; when it answers True the decoding stops with
    :class:`ExtractionStoppedError` (the caller gave up: a deadline, a client gone).
    """

    size = _checked_size(path, settings)
    container = sniff_container(path)
    with open_container(path, container) as handle:
        info = _header_info(handle, container, size, settings, str(path))
        video_stream = _video_stream(handle) if video else None
        audio_stream = _audio_stream(handle) if audio else None
        if video_stream is None and audio_stream is None:
            return DecodedMedia(info=info, duration_s=info.duration_s or 0.0)

        if video_stream is not None and frame_handler is not None:
            on_frame = frame_handler(info) or on_frame
        origin = _origin_seconds(handle)
        streams = [s for s in (video_stream, audio_stream) if s is not None]
        for stream in streams:
            stream.codec_context.thread_count = settings.decode_threads
            stream.thread_type = "AUTO" if settings.decode_threads != 1 else "SLICE"
        audio_sink = (
            _AudioSink(audio_stream, origin, settings) if audio_stream is not None else None
        )
        frame_sink = (
            _FrameSink(video_stream, origin, settings, on_frame)
            if video_stream is not None
            else None
        )
        try:
            return _decode_streams(
                handle, container, info, streams, audio_sink, frame_sink, settings, should_stop
            )
        finally:
            # The resampler's filter graph owns native threads: release it now, not whenever
            # the garbage collector frees a traceback that still refers to it.
            if audio_sink is not None:
                audio_sink.close()


def _decode_streams(
    handle: Any,
    container: Container,
    info: MediaInfo,
    streams: list[Any],
    audio_sink: _AudioSink | None,
    frame_sink: _FrameSink | None,
    settings: ExtractorSettings,
    should_stop: Callable[[], bool] | None,
) -> DecodedMedia:
    import av

    audio_stream = audio_sink.stream if audio_sink is not None else None
    video_stream = frame_sink.stream if frame_sink is not None else None
    errors = 0
    decoded_any = False
    try:
        for packet in handle.demux(*streams):
            if should_stop is not None and should_stop():
                raise ExtractionStoppedError("The extraction was stopped: nobody waits for it.")
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                errors += 1
                continue
            for frame in frames:
                decoded_any = True
                if packet.stream is audio_stream and audio_sink is not None:
                    audio_sink.add(frame)
                    end = audio_sink.end_s
                elif frame_sink is not None:
                    frame_sink.add(frame)
                    end = frame_sink.last_time_s
                else:
                    continue
                if end > settings.max_duration_s + 1.0:
                    raise MediaTooLongError(
                        "The clip is longer than the limit of "
                        f"{settings.max_duration_s:.0f} s. Send a shorter clip."
                    )
        # Flush decoders (B-frames and resampler delay).
        for stream in streams:
            try:
                for frame in stream.codec_context.decode(None):
                    decoded_any = True
                    if stream is audio_stream and audio_sink is not None:
                        audio_sink.add(frame)
                    elif frame_sink is not None:
                        frame_sink.add(frame)
            except av.error.FFmpegError:
                errors += 1
    except (av.error.FFmpegError, ValueError, IndexError) as exc:
        # ValueError: PyAV's refusal of a frame it cannot convert (a resampler or scaler
        # setup the stream's frames do not match); IndexError: a packet of a stream that
        # appeared after the header (FLV), which PyAV's demuxer cannot look up.
        raise CorruptMediaError(
            f"The {container.name} file could not be decoded ({_reason(exc)}); it may be "
            "damaged or truncated."
        ) from None

    if not decoded_any:
        raise CorruptMediaError(
            f"No audio or video could be decoded from the {container.name} file; it is "
            "damaged or truncated."
        )
    result = DecodedMedia(info=info, duration_s=0.0)
    extents = []
    if audio_sink is not None:
        result.audio = audio_sink.finish()
        extents.append(len(result.audio) / AUDIO_SAMPLE_RATE)
        _check_truncated(container, "audio", extents[-1], audio_stream)
    if frame_sink is not None:
        result.frames = frame_sink.frames
        result.frame_times = np.asarray(frame_sink.times, dtype=np.float64)
        extents.append(frame_sink.last_time_s + frame_sink.frame_period_s)
        _check_truncated(container, "video", extents[-1], video_stream)
    # The grid covers the header's duration when it has one (a stream may legitimately end
    # early); otherwise what was decoded.
    result.duration_s = info.duration_s or max(extents, default=0.0)
    return result


def _origin_seconds(handle: Any) -> float:
    if handle.start_time is not None:
        return float(handle.start_time) / 1_000_000
    starts = [
        _seconds(s.start_time, s.time_base) for s in handle.streams if s.start_time is not None
    ]
    return min((s for s in starts if s is not None), default=0.0)


def _check_truncated(container: Container, kind: str, decoded_s: float, stream: Any) -> None:
    declared = _seconds(stream.duration, stream.time_base) if stream is not None else None
    if declared is None or declared <= 0:
        return
    if decoded_s < declared * _TRUNCATION_RATIO - _TRUNCATION_SLACK_S:
        raise CorruptMediaError(
            f"The {container.name} file is truncated: its header declares {declared:.1f} s of "
            f"{kind} but only {decoded_s:.1f} s could be decoded. Send the complete file."
        )


class _AudioSink:
    """Resamples decoded audio frames to 16 kHz mono float32 and places them in time.

    A stream whose sample rate, layout or sample format changes mid-way (concatenated MP3 or
    ADTS files, chained Ogg) is resampled segment by segment: a resampler takes one input
    setup only, so a change flushes the current one and starts a new one.
    """

    def __init__(self, stream: Any, origin_s: float, settings: ExtractorSettings) -> None:
        self._settings = settings
        self._resampler: Any = None
        self._setup: tuple[str, str, int] | None = None
        self._chunks: list[np.ndarray] = []
        self._samples = 0
        self._start_s: float | None = None
        self._origin_s = origin_s
        self.stream = stream

    @property
    def end_s(self) -> float:
        return (self._start_s or 0.0) + self._samples / AUDIO_SAMPLE_RATE

    def add(self, frame: Any) -> None:
        import av

        if self._start_s is None:
            t = frame.time if frame.time is not None else self._origin_s
            self._start_s = max(0.0, float(t) - self._origin_s)
        setup = (frame.format.name, frame.layout.name, int(frame.sample_rate))
        if setup != self._setup:
            # Checked per segment too: a header may under-report what the frames carry.
            _check_audio_rate(setup[2], frame.layout.nb_channels, self._settings)
            self._flush()
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_SAMPLE_RATE)
            self._setup = setup
        self._keep(self._resampler.resample(frame))

    def _keep(self, frames: list[Any]) -> None:
        for out in frames:
            chunk = out.to_ndarray().reshape(-1)
            self._chunks.append(chunk)
            self._samples += len(chunk)

    def _flush(self) -> None:
        if self._resampler is not None:
            self._keep(self._resampler.resample(None))
            self._resampler = None

    def close(self) -> None:
        """Drop the resampler (and the native threads of its filter graph)."""
        self._resampler = None

    def finish(self) -> np.ndarray:
        self._flush()
        pad = round((self._start_s or 0.0) * AUDIO_SAMPLE_RATE)
        parts = [np.zeros(pad, np.float32)] if pad else []
        audio = np.concatenate([*parts, *self._chunks]) if (parts or self._chunks) else None
        return np.zeros(0, np.float32) if audio is None else audio.astype(np.float32, copy=False)


class _FrameSink:
    """Keeps one decoded frame per sampling period, converted to a small RGB array."""

    def __init__(
        self,
        stream: Any,
        origin_s: float,
        settings: ExtractorSettings,
        on_frame: Callable[[np.ndarray, float], None] | None = None,
    ) -> None:
        self._on_frame = on_frame
        self.stream = stream
        self._origin_s = origin_s
        self._period = 1.0 / settings.frame_rate_hz
        self._next_s = 0.0
        self._max_side = settings.frame_max_side
        self._max_frames = settings.max_frames
        self._decoded = 0
        rate = stream.average_rate or stream.guessed_rate
        self.frame_period_s = 1.0 / float(rate) if rate else 0.04
        self.frames: list[np.ndarray] = []
        self.times: list[float] = []
        self.last_time_s = 0.0

    def add(self, frame: Any) -> None:
        self._decoded += 1
        if self._decoded > self._max_frames:
            raise MediaTooLargeError(
                f"The video has more than {self._max_frames} frames. Send a shorter clip or one "
                "with a lower frame rate."
            )
        t = float(frame.time) - self._origin_s if frame.time is not None else self.last_time_s
        self.last_time_s = max(self.last_time_s, t)
        if t + 1e-6 < self._next_s:
            return
        width, height = _scaled_size(frame.width, frame.height, self._max_side)
        rgb = frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
        if self._on_frame is not None:
            self._on_frame(rgb, max(t, 0.0))
        else:
            self.frames.append(rgb)
        self.times.append(max(t, 0.0))
        self._next_s = next_frame_sample_s(t, self._period)
