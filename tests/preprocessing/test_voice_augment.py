"""Recording conditions for the voice branch's training: each perturbation does what it says."""

from __future__ import annotations

import math

import numpy as np
import pytest

from preprocessing.media import AUDIO_SAMPLE_RATE as SR
from preprocessing.voice_augment import (
    Condition,
    apply_condition,
    band_limit,
    change_speed,
    coloured_noise,
    draw_condition,
    room_response,
)


def _tone(freq: float = 440.0, seconds: float = 1.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def _peak_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x))
    return float(np.fft.rfftfreq(len(x), 1 / SR)[np.argmax(spectrum)])


def test_speed_shortens_the_clip_and_raises_the_pitch_by_the_factor() -> None:
    faster = change_speed(_tone(440.0), 1.1)
    assert len(faster) == round(SR / 1.1)
    assert _peak_hz(faster) == pytest.approx(484.0, abs=2.0)
    tone = _tone()
    assert change_speed(tone, 1.0) is tone


def test_noise_is_added_at_the_drawn_signal_to_noise_ratio() -> None:
    clean = _tone()
    noisy = apply_condition(clean, Condition(snr_db=10.0, noise_slope=1), np.random.default_rng(0))
    noise = noisy.astype(np.float64) - clean
    assert 20 * math.log10(_rms(clean) / _rms(noise)) == pytest.approx(10.0, abs=0.2)


def test_coloured_noise_falls_with_frequency_by_its_slope() -> None:
    rng = np.random.default_rng(1)
    for slope, low_over_high in ((0, (0.7, 1.4)), (1, (5.0, 1e9)), (2, (50.0, 1e12))):
        power = np.abs(np.fft.rfft(coloured_noise(SR * 4, slope, rng))) ** 2
        freqs = np.fft.rfftfreq(SR * 4, 1 / SR)
        ratio = power[(freqs > 100) & (freqs < 200)].mean() / power[freqs > 4000].mean()
        assert low_over_high[0] < ratio < low_over_high[1], (slope, ratio)


def test_the_band_limit_removes_what_is_outside_the_band() -> None:
    low, high, inside = _tone(60.0), _tone(7000.0), _tone(1000.0)
    for tone, kept in ((low, False), (high, False), (inside, True)):
        out = band_limit(tone, 300.0, 3400.0)[SR // 10 :]  # past the filters' onset
        ratio = _rms(out) / _rms(tone[SR // 10 :])
        assert (ratio > 0.9) if kept else (ratio < 0.2), ratio


def test_the_room_tail_decays_by_sixty_decibels_in_rt60() -> None:
    response = room_response(0.5, np.random.default_rng(2))
    assert response[0] == 1.0
    tail = response[1:] ** 2
    early = tail[: SR // 20].mean()  # first 50 ms of the tail
    late = tail[int(0.45 * SR) : int(0.5 * SR)].mean()  # the last 50 ms before RT60
    assert 10 * math.log10(early / late) == pytest.approx(54.0, abs=6.0)


def test_the_room_and_channel_keep_the_level_and_the_gain_sets_it() -> None:
    clean = _tone(500.0)
    rng = np.random.default_rng(3)
    roomy = apply_condition(clean, Condition(rt60_s=0.4, highpass_hz=100, lowpass_hz=4000), rng)
    assert _rms(roomy) == pytest.approx(_rms(clean), rel=0.02)
    quieter = apply_condition(clean, Condition(gain_db=-6.0), rng)
    assert 20 * math.log10(_rms(quieter) / _rms(clean)) == pytest.approx(-6.0, abs=0.01)
    louder = apply_condition(clean, Condition(gain_db=40.0), rng)
    assert np.abs(louder).max() <= 1.0  # clipped, never out of range


def test_conditions_are_drawn_reproducibly_within_their_ranges() -> None:
    first = [draw_condition(np.random.default_rng([7, k])) for k in range(200)]
    again = [draw_condition(np.random.default_rng([7, k])) for k in range(200)]
    assert first == again
    assert all(0.9 <= c.speed <= 1.1 and -12 <= c.gain_db <= 6 for c in first)
    assert all(c.rt60_s == 0 or 0.15 <= c.rt60_s <= 0.7 for c in first)
    assert all(math.isinf(c.snr_db) or 10 <= c.snr_db <= 30 for c in first)
    for used in (lambda c: c.speed != 1.0, lambda c: c.rt60_s > 0, lambda c: c.lowpass_hz > 0):
        assert 0.35 < np.mean([used(c) for c in first]) < 0.65
    assert 0.6 < np.mean([math.isfinite(c.snr_db) for c in first]) < 0.8
    assert Condition().describe() == "unchanged"
    out = apply_condition(_tone(), Condition(), np.random.default_rng(0))
    assert np.allclose(out, _tone(), atol=1e-6)
