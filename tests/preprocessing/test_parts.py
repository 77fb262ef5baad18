"""Long recordings in parts: cut points at video keyframes, and each part a file of its own
that decodes from its first frame, on the recording's clock shifted to zero."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from helpers import write_av_clip
from jobmedia import write_tone_wav

from preprocessing.errors import UnsupportedMediaError
from preprocessing.parts import plan_parts, probe_duration, write_part

FPS = 5
GOP = 12  # a keyframe every 2.4 s


def write_video(path: Path, seconds: float) -> Path:
    """H.264 (keyframe every GOP frames, B-frames allowed) + AAC in MP4, 64x48 with a 220 Hz
    tone; the frame number is painted into the picture's brightness."""
    rate = 16_000
    t = np.arange(int(seconds * rate)) / rate
    return write_av_clip(
        path,
        seconds,
        lambda i: np.full((48, 64, 3), (i * 3) % 256, np.uint8),
        (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32),
        fps=FPS,
        rate=rate,
        video_options={"preset": "ultrafast", "g": str(GOP), "keyint_min": str(GOP)},
    )


def keyframe_times(path: Path) -> list[float]:
    import av

    with av.open(str(path)) as handle:
        stream = handle.streams.video[0]
        return sorted(
            float(p.pts * p.time_base)
            for p in handle.demux(stream)
            if p.pts is not None and p.is_keyframe
        )


def decoded(path: Path) -> tuple[list[float], list[float], float]:
    """(video frame times, first-frame brightness per frame, audio seconds) of a part."""
    import av

    times, levels, samples = [], [], 0
    with av.open(str(path)) as handle:
        for frame in handle.decode(*handle.streams):
            if isinstance(frame, av.VideoFrame):
                times.append(float(frame.time))
                levels.append(float(frame.to_ndarray(format="gray").mean()))
            else:
                samples += frame.samples
    return times, levels, samples / 16_000


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("parts") / "talk.mp4", 30.0)


def test_video_is_cut_at_keyframes_into_parts_that_cover_it(video: Path) -> None:
    plan = plan_parts(video, 10.0)
    assert plan.has_video and plan.has_audio
    assert plan.duration_s == pytest.approx(30.0, abs=0.1)
    bounds = plan.bounds
    assert bounds[0][0] == 0.0 and bounds[-1][1] == plan.duration_s
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    keyframes = keyframe_times(video)
    for start, _ in bounds[1:]:
        assert any(abs(start - k) < 1e-6 for k in keyframes), start
    # The first keyframe at or after each multiple of 10 s.
    assert [round(b[0], 3) for b in bounds] == [0.0, 12.0, 21.6]
    assert probe_duration(video) == ("mp4", pytest.approx(30.0, abs=0.1))


def test_each_part_decodes_from_its_first_frame_on_its_own_clock(
    video: Path, tmp_path: Path
) -> None:
    plan = plan_parts(video, 10.0)
    total_frames = 0
    for index, (start, end) in enumerate(plan.bounds):
        out = tmp_path / f"part{index}.mkv"
        write_part(video, start, end, out)
        times, levels, audio_s = decoded(out)
        assert times[0] == pytest.approx(0.0, abs=1e-3)  # the part's own clock
        first_frame = round(start * FPS)
        assert levels[0] == pytest.approx((first_frame * 3) % 256, abs=4)  # the right frame
        assert len(times) == round((end - start) * FPS)
        assert audio_s == pytest.approx(end - start, abs=0.15)
        total_frames += len(times)
    assert total_frames == 30 * FPS  # no frame lost or repeated at the cuts


def test_audio_is_cut_at_the_nominal_times(tmp_path: Path) -> None:
    wav = write_tone_wav(tmp_path / "a.wav", 25.0)
    plan = plan_parts(wav, 10.0)
    assert not plan.has_video
    assert [(round(a, 3), round(b, 3)) for a, b in plan.bounds] == [
        (0.0, 10.0), (10.0, 20.0), (20.0, 25.0)
    ]  # fmt: skip
    write_part(wav, 10.0, 20.0, tmp_path / "p.mkv")
    _, _, seconds = decoded(tmp_path / "p.mkv")
    assert seconds == pytest.approx(10.0, abs=0.6)


def test_what_is_not_media_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not media at all\n" * 10)
    with pytest.raises(UnsupportedMediaError):
        plan_parts(text, 10.0)
    with pytest.raises(ValueError, match="positive"):
        plan_parts(text, 0.0)
