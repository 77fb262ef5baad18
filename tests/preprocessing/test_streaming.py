"""Streaming extraction of long clips: frames through face mesh while decoding, audio in blocks.

Both paths must give the same features as the one-pass extraction of short clips.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from preprocessing import Extractor, ExtractorSettings
from preprocessing.audio import AUDIO_SAMPLE_RATE, acoustic_frames, acoustic_frames_blocked
from preprocessing.media import decode_media


def test_streamed_frames_give_the_same_bundle(
    extractor: Extractor, clip: Callable[[str], Path]
) -> None:
    path = clip("hap_mp4")
    transcript = "Don't forget a jacket"
    whole = extractor.extract(path, transcript=transcript)
    streaming = Extractor(
        ExtractorSettings(stream_frames_after_s=0.0),
        text_encoder=extractor.text_encoder,
        recognizer=extractor.recognizer,
    )
    streamed = streaming.extract(path, transcript=transcript)
    assert streamed.summary.frames == whole.summary.frames > 0
    assert streamed.summary.frames_with_face == whole.summary.frames_with_face > 0
    for m in ("text", "audio", "visual"):
        np.testing.assert_array_equal(streamed.masks[m], whole.masks[m])
        np.testing.assert_allclose(streamed.features[m], whole.features[m], atol=1e-6)
    assert streamed.timings_ms["visual"] > 0


def test_streaming_keeps_no_frames(clip: Callable[[str], Path]) -> None:
    seen: list[tuple[tuple[int, ...], float]] = []
    decoded = decode_media(
        clip("grid_mp4"),
        ExtractorSettings(),
        audio=False,
        video=True,
        on_frame=lambda rgb, t: seen.append((rgb.shape, t)),
    )
    assert decoded.frames == []
    assert len(seen) == len(decoded.frame_times) >= 14  # 3 s at 5 fps
    np.testing.assert_allclose([t for _, t in seen], decoded.frame_times)
    assert all(shape[2] == 3 for shape, _ in seen)


def test_blocked_audio_analysis_matches_one_pass() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(75 * AUDIO_SAMPLE_RATE) / AUDIO_SAMPLE_RATE  # 2.5 blocks
    voice = np.sin(2 * np.pi * (150 + 30 * np.sin(t)) * t) * (np.sin(2 * np.pi * 0.3 * t) > 0)
    y = (0.2 * voice + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
    whole = acoustic_frames(y)
    blocked = acoustic_frames_blocked(y)
    assert blocked.values.shape == whole.values.shape
    np.testing.assert_allclose(blocked.times_s, whole.times_s, atol=1e-9)
    np.testing.assert_allclose(blocked.values, whole.values, atol=1e-3)
    np.testing.assert_array_equal(blocked.voiced, whole.voiced)
    np.testing.assert_allclose(blocked.power, whole.power, rtol=1e-6)


def test_frame_handler_decides_from_the_header(clip: Callable[[str], Path]) -> None:
    infos: list[float | None] = []
    seen: list[float] = []

    def stream_all(info):  # type: ignore[no-untyped-def]
        infos.append(info.duration_s)
        return lambda rgb, t: seen.append(t)

    streamed = decode_media(
        clip("grid_mp4"), ExtractorSettings(), audio=False, video=True, frame_handler=stream_all
    )
    assert len(infos) == 1 and infos[0] is not None and infos[0] > 2.5
    assert streamed.frames == []
    np.testing.assert_allclose(seen, streamed.frame_times)

    kept = decode_media(
        clip("grid_mp4"),
        ExtractorSettings(),
        audio=False,
        video=True,
        frame_handler=lambda info: None,
    )
    assert len(kept.frames) == len(kept.frame_times) == len(seen)


def test_extraction_opens_the_clip_once(
    extractor: Extractor, clip: Callable[[str], Path], monkeypatch
) -> None:
    import preprocessing.media as media

    opened: list[str] = []
    real = media.open_container

    def counting(path, container):  # type: ignore[no-untyped-def]
        opened.append(str(path))
        return real(path, container)

    monkeypatch.setattr(media, "open_container", counting)
    for after_s in (0.0, 600.0):  # streamed, then kept frames
        opened.clear()
        Extractor(
            ExtractorSettings(stream_frames_after_s=after_s),
            text_encoder=extractor.text_encoder,
            recognizer=extractor.recognizer,
        ).extract(clip("hap_mp4"), transcript="Don't forget a jacket")
        assert len(opened) == 1, (after_s, opened)
