"""Fixtures for the preprocessing tests: shared real media, generated bad media, one extractor.

Loading the models takes ~15 s, so one warmed-up extractor (and the bundles of the shared clips)
is shared by the whole session.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

MEDIA = Path(__file__).resolve().parents[2].parent / "shared" / "media"

CLIPS = {
    "jfk": "jfk.flac",
    "grid_mp4": "grid_bbaf2n.mp4",
    "grid_mpg": "grid_bbaf2n.mpg",
    "hap_flv": "cremad_1001_DFA_HAP_XX.flv",
    "hap_mp4": "cremad_1001_DFA_HAP_XX.mp4",
    "ang_flv": "cremad_1001_DFA_ANG_XX.flv",
    "ang_mp4": "cremad_1001_DFA_ANG_XX.mp4",
}


@pytest.fixture(scope="session")
def media_dir() -> Path:
    if not (MEDIA / "jfk.flac").is_file():
        pytest.skip(f"shared test media not found at {MEDIA}")
    return MEDIA


@pytest.fixture(scope="session")
def clip(media_dir: Path) -> Callable[[str], Path]:
    """Path of a shared clip by short name (see CLIPS)."""

    def get(name: str) -> Path:
        return media_dir / CLIPS[name]

    return get


@pytest.fixture(scope="session")
def extractor():  # type: ignore[no-untyped-def]
    """One warmed-up extractor with all three modalities, shared by the session."""
    from preprocessing import Extractor

    ex = Extractor()
    ex.warmup()
    return ex


@pytest.fixture(scope="session")
def bundle_of(extractor, clip):  # type: ignore[no-untyped-def]
    """Bundle of a shared clip (ASR on), computed once per session."""
    cache: dict[str, object] = {}

    def get(name: str):  # type: ignore[no-untyped-def]
        if name not in cache:
            cache[name] = extractor.extract(clip(name))
        return cache[name]

    return get


# -- generated media ------------------------------------------------------------------------------


def write_wav(path: Path, samples: np.ndarray, rate: int = 16_000) -> Path:
    """Encode mono float samples in [-1, 1] as 16-bit PCM WAV with PyAV."""
    import av

    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)[None, :]
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def write_video(path: Path, fmt: str, codec: str, size: int, n_frames: int) -> Path:
    """A small grey video (no audio) encoded with PyAV."""
    import av

    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 25)
        for i in range(n_frames):
            img = np.full((size, size, 3), 128, np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def claim_size(path: Path, demuxer: str, width: int, height: int) -> Path:
    """Rewrite the frame size that the container header declares, in place."""
    data = bytearray(path.read_bytes())
    if demuxer == "avi":
        i = data.find(b"avih")
        struct.pack_into("<II", data, i + 8 + 32, width, height)
        j = data.find(b"strf")
        struct.pack_into("<ii", data, j + 8 + 4, width, height)
    elif demuxer == "mov":
        i = data.find(b"tkhd")
        size = struct.unpack(">I", data[i - 4 : i])[0]
        end = i - 4 + size
        struct.pack_into(">II", data, end - 8, width << 16, height << 16)
    elif demuxer == "matroska":
        # The source is 256x256: PixelWidth (0xB0) and PixelHeight (0xBA) are 2-byte values.
        for tag in (b"\xb0\x82\x01\x00", b"\xba\x82\x01\x00"):
            i = data.find(tag)
            assert i > 0
            data[i + 2 : i + 4] = (width if tag[0] == 0xB0 else height).to_bytes(2, "big")
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="session")
def generated(
    tmp_path_factory: pytest.TempPathFactory, media_dir: Path, remux: Callable[..., Path]
) -> dict[str, Path]:
    """Bad and unusual inputs, generated once per session."""
    root = tmp_path_factory.mktemp("generated")
    rng = np.random.default_rng(0)
    out: dict[str, Path] = {}

    out["zero_bytes"] = root / "empty.mp4"
    out["zero_bytes"].write_bytes(b"")
    out["random_bytes"] = root / "random.mp4"
    out["random_bytes"].write_bytes(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    out["text"] = root / "notes.mp4"
    out["text"].write_text("This is a transcript, not a video.\n" * 50)

    source = (media_dir / "cremad_1001_DFA_HAP_XX.mp4").read_bytes()
    out["truncated"] = root / "truncated.mp4"
    out["truncated"].write_bytes(source[: len(source) // 2])
    out["video_only"] = remux(
        media_dir / "cremad_1001_DFA_HAP_XX.mp4", root / "video_only.mp4", "mp4", ("video",)
    )
    out["audio_only"] = remux(
        media_dir / "cremad_1001_DFA_HAP_XX.mp4", root / "audio_only.mp4", "mp4", ("audio",)
    )

    # 12 s of quiet noise: over a 10 s duration limit.
    out["long"] = write_wav(root / "long.wav", 0.01 * rng.standard_normal(12 * 16_000))
    out["silence"] = write_wav(root / "silence.wav", np.zeros(3 * 16_000))

    out["huge_mkv"] = claim_size(
        write_video(root / "huge.mkv", "matroska", "rawvideo", 256, 2), "matroska", 20000, 20000
    )
    out["huge_avi"] = claim_size(
        write_video(root / "huge.avi", "avi", "mpeg4", 64, 5), "avi", 20000, 20000
    )
    out["huge_mp4"] = claim_size(
        write_video(root / "huge.mp4", "mp4", "mpeg4", 64, 5), "mov", 20000, 20000
    )
    return out


@pytest.fixture(scope="session")
def container_samples(
    tmp_path_factory: pytest.TempPathFactory, media_dir: Path, remux: Callable[..., Path]
) -> dict[str, Path]:
    """One shared clip in each container whose header ``preprocessing.headers`` reads."""
    root = tmp_path_factory.mktemp("containers")
    source = media_dir / "cremad_1001_DFA_HAP_XX.mp4"
    return {
        "mov": source,
        "matroska": remux(source, root / "clip.mkv", "matroska", ("audio", "video")),
        "avi": write_video(root / "clip.avi", "avi", "mpeg4", 64, 5),
    }
