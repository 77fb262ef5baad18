"""Audio whose sample rate or layout changes mid-stream decodes, segment by segment."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from preprocessing import ExtractorSettings
from preprocessing.media import AUDIO_SAMPLE_RATE, decode_media


@pytest.mark.parametrize(
    ("fmt", "codec", "second_rate"),
    [("mp3", "libmp3lame", 22_050), ("adts", "aac", 16_000)],
)
def test_audio_whose_rate_and_layout_change_mid_stream_decodes(
    tmp_path: Path, encode_tone: Callable[..., bytes], fmt: str, codec: str, second_rate: int
) -> None:
    path = tmp_path / f"two-parts.{fmt}"
    first = encode_tone(fmt, codec, 44_100, "mono")
    path.write_bytes(first + encode_tone(fmt, codec, second_rate, "stereo"))
    decoded = decode_media(path, ExtractorSettings(), audio=True, video=False)
    assert decoded.audio is not None
    # Both seconds are there, at 16 kHz (codec delay and padding add a little).
    assert 1.9 < len(decoded.audio) / AUDIO_SAMPLE_RATE < 2.3
    assert np.abs(decoded.audio[-AUDIO_SAMPLE_RATE // 2 :]).max() > 0.1
