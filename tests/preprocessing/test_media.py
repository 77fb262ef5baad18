"""Container detection, header limits and decoding (PyAV only, no models)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from preprocessing import Extractor, ExtractorSettings
from preprocessing.errors import (
    CorruptMediaError,
    MediaTooLargeError,
    MediaTooLongError,
    PreprocessingError,
    UnsupportedMediaError,
)
from preprocessing.media import (
    AUDIO_SAMPLE_RATE,
    _AudioSink,
    _FrameSink,
    decode_media,
    probe_media,
    sniff_container,
)

SETTINGS = ExtractorSettings()


@pytest.mark.parametrize(
    ("name", "container", "demuxer"),
    [
        ("jfk", "flac", "flac"),
        ("grid_mp4", "mp4", "mov"),
        ("grid_mpg", "mpg", "mpeg"),
        ("hap_flv", "flv", "flv"),
    ],
)
def test_sniff_recognises_shared_clips(clip, name: str, container: str, demuxer: str) -> None:
    found = sniff_container(clip(name))
    assert (found.name, found.demuxer) == (container, demuxer)


def test_sniff_ignores_the_file_name(clip, tmp_path: Path) -> None:
    # A FLAC file named .mp4 is still FLAC; an mp4 named .wav is still mp4.
    flac_as_mp4 = tmp_path / "speech.mp4"
    flac_as_mp4.write_bytes(clip("jfk").read_bytes())
    mp4_as_wav = tmp_path / "clip.wav"
    mp4_as_wav.write_bytes(clip("grid_mp4").read_bytes())
    assert sniff_container(flac_as_mp4).name == "flac"
    assert sniff_container(mp4_as_wav).name == "mp4"
    decoded = decode_media(flac_as_mp4, SETTINGS, audio=True, video=False)
    assert decoded.audio is not None and decoded.audio_seconds == pytest.approx(11.0, abs=0.05)


def test_images_and_text_are_unsupported(media_dir: Path, generated) -> None:
    with pytest.raises(UnsupportedMediaError, match="image"):
        sniff_container(media_dir / "obama.jpg")
    with pytest.raises(UnsupportedMediaError, match="text"):
        sniff_container(generated["text"])
    with pytest.raises(UnsupportedMediaError, match="not a recognised"):
        sniff_container(generated["random_bytes"])
    with pytest.raises(CorruptMediaError, match="empty"):
        sniff_container(generated["zero_bytes"])


def test_probe_reads_the_header(clip) -> None:
    info = probe_media(clip("grid_mp4"), SETTINGS)
    assert info.has_audio and info.has_video
    assert (info.width, info.height) == (360, 288)
    assert info.duration_s == pytest.approx(3.0, abs=0.05)
    assert info.frame_count == 75
    audio_only = probe_media(clip("jfk"), SETTINGS)
    assert audio_only.has_audio and not audio_only.has_video and audio_only.width is None


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"max_duration_s": 2.0}, MediaTooLongError, "3.0 s long"),
        ({"max_width": 320}, MediaTooLargeError, "360x288"),
        ({"max_frames": 50}, MediaTooLargeError, "75 frames"),
        ({"max_file_bytes": 1000}, MediaTooLargeError, "MB"),
    ],
)
def test_header_limits(clip, overrides: dict, error: type, match: str) -> None:
    settings = ExtractorSettings(**overrides)
    with pytest.raises(error, match=match):
        probe_media(clip("grid_mp4"), settings)


@pytest.mark.parametrize("name", ["huge_mkv", "huge_avi", "huge_mp4"])
def test_header_claiming_20000x20000_is_too_large(generated, name: str, monkeypatch) -> None:
    # Refused from the header: no frame is decoded.
    monkeypatch.setattr(_FrameSink, "add", _fail_if_called)
    with pytest.raises(MediaTooLargeError, match="20000x20000"):
        decode_media(generated[name], SETTINGS, audio=True, video=True)


def _fail_if_called(*args: object) -> None:
    raise AssertionError("decoded a frame before the limits were checked")


def test_over_duration_limit_is_refused_before_decoding(generated, monkeypatch) -> None:
    monkeypatch.setattr(_AudioSink, "add", _fail_if_called)
    with pytest.raises(MediaTooLongError, match="limit is 10 s"):
        decode_media(
            generated["long"], ExtractorSettings(max_duration_s=10), audio=True, video=True
        )
    # Under a higher limit the same file decodes.
    monkeypatch.undo()
    decoded = decode_media(
        generated["long"], ExtractorSettings(max_duration_s=20), audio=True, video=True
    )
    assert decoded.audio_seconds == pytest.approx(12.0, abs=0.01)


def test_truncated_mp4_is_corrupt(generated) -> None:
    with pytest.raises(CorruptMediaError, match=r"truncated|damaged"):
        decode_media(generated["truncated"], SETTINGS, audio=True, video=True)


def test_decode_audio_is_16k_mono_float(clip) -> None:
    decoded = decode_media(clip("jfk"), SETTINGS, audio=True, video=True)
    assert decoded.audio is not None
    assert decoded.audio.dtype == np.float32 and decoded.audio.ndim == 1
    assert len(decoded.audio) == pytest.approx(
        11.0 * AUDIO_SAMPLE_RATE, abs=AUDIO_SAMPLE_RATE * 0.02
    )
    assert 0.05 < np.abs(decoded.audio).max() < 1.5  # resampling may overshoot full scale a little
    assert decoded.frames == [] and decoded.duration_s == pytest.approx(11.0, abs=0.01)


@pytest.mark.parametrize("name", ["grid_mp4", "grid_mpg"])
def test_decode_samples_frames_at_the_configured_rate(clip, name: str) -> None:
    settings = ExtractorSettings(frame_rate_hz=5.0, frame_max_side=200)
    decoded = decode_media(clip(name), settings, audio=False, video=True)
    assert decoded.audio is None
    assert len(decoded.frames) == 15  # 3 s at 5 frames per second
    assert np.allclose(np.diff(decoded.frame_times), 0.2, atol=0.021)
    assert decoded.frame_times[0] < 0.05
    h, w, c = decoded.frames[0].shape
    assert c == 3 and max(h, w) <= 200 and abs(w / h - 360 / 288) < 0.05
    # A higher rate keeps more frames; the source has 25 per second.
    dense = decode_media(clip(name), ExtractorSettings(frame_rate_hz=25.0), audio=False, video=True)
    assert len(dense.frames) == 75


def test_mp4_and_mpg_of_the_same_clip_decode_to_the_same_audio(clip) -> None:
    a = decode_media(clip("grid_mp4"), SETTINGS, audio=True, video=False).audio
    b = decode_media(clip("grid_mpg"), SETTINGS, audio=True, video=False).audio
    assert a is not None and b is not None
    n = min(len(a), len(b))
    # The mp4 is an AAC transcode of the mpg: different codecs, same signal (allow a small lag).
    best = max(np.corrcoef(a[lag : n - 200 + lag], b[: n - 200])[0, 1] for lag in range(0, 200, 4))
    assert best > 0.9


BAD_INPUTS = [
    ("zero_bytes", CorruptMediaError),
    ("random_bytes", UnsupportedMediaError),
    ("text", UnsupportedMediaError),
    ("truncated", CorruptMediaError),
    ("long", MediaTooLongError),
    ("huge_mkv", MediaTooLargeError),
    ("huge_mp4", MediaTooLargeError),
]


def test_bad_inputs_are_typed_errors_and_leave_no_temporary_files(
    generated, tmp_path: Path, monkeypatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = sorted(os.listdir(generated["text"].parent))
    # Through the public API; every refusal comes before a model would load.
    extractor = Extractor(ExtractorSettings(max_duration_s=10))
    for name, error in BAD_INPUTS:
        with pytest.raises(error) as info:
            extractor.extract(generated[name])
        assert isinstance(info.value, PreprocessingError)
        assert len(info.value.message) > 20
    assert extractor._text_encoder is None and extractor._recognizer is None
    assert os.listdir(scratch) == []
    assert sorted(os.listdir(generated["text"].parent)) == before
