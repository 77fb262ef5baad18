"""Acoustic conditions for training the voice branch: speed, room, channel, noise and level.

RAVDESS, the only voice corpus the default model learns from, is one studio, one microphone
and two sentences. A voice branch fitted to it scores speech recorded elsewhere (another room,
another microphone, a compressed web video) by the recording as much as by the voice. Training
on copies of each clip under drawn conditions teaches it to ignore them. Each condition is one
of the standard perturbations of speech-recognition training:

* speed: resampling by a factor in [0.9, 1.1] (tempo and pitch together, as Kaldi's speed
  perturbation);
* room: convolution with a synthetic impulse response, exponentially decaying noise with a
  reverberation time RT60 in [0.15, 0.7] s, mixed with the direct sound;
* channel: a band limit, high-pass at 50-400 Hz and low-pass at 3-8 kHz (telephone to laptop
  microphones);
* noise: white, pink or brown noise at a signal-to-noise ratio of 10-30 dB;
* level: a gain of -12 to +6 dB (clipped to [-1, 1]).

Every copy draws each perturbation with its own probability from a seeded generator, so a
build is reproducible. Used by ``scripts/build_default_model.py``; see docs/TRAINING.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from preprocessing.media import AUDIO_SAMPLE_RATE


@dataclass(frozen=True)
class Condition:
    """One drawn recording condition; a neutral field leaves that part of the audio as it is."""

    speed: float = 1.0
    rt60_s: float = 0.0  # 0: no room
    highpass_hz: float = 0.0  # 0: no high-pass
    lowpass_hz: float = 0.0  # 0: no low-pass
    snr_db: float = math.inf  # inf: no noise
    noise_slope: int = 0  # power falls as 1 / f**slope: 0 white, 1 pink, 2 brown
    gain_db: float = 0.0

    def describe(self) -> str:
        parts = []
        if self.speed != 1.0:
            parts.append(f"speed {self.speed:.2f}")
        if self.rt60_s > 0:
            parts.append(f"room RT60 {self.rt60_s:.2f} s")
        if self.highpass_hz > 0 or self.lowpass_hz > 0:
            parts.append(f"band {self.highpass_hz:.0f}-{self.lowpass_hz:.0f} Hz")
        if math.isfinite(self.snr_db):
            kind = ("white", "pink", "brown")[self.noise_slope]
            parts.append(f"{kind} noise {self.snr_db:.0f} dB SNR")
        if self.gain_db != 0.0:
            parts.append(f"gain {self.gain_db:+.0f} dB")
        return ", ".join(parts) or "unchanged"


def draw_condition(rng: np.random.Generator) -> Condition:
    """A random condition: speed with probability 0.5, room 0.5, channel 0.5, noise 0.7,
    level always."""
    speed = float(rng.uniform(0.9, 1.1)) if rng.random() < 0.5 else 1.0
    rt60 = float(rng.uniform(0.15, 0.7)) if rng.random() < 0.5 else 0.0
    if rng.random() < 0.5:
        highpass, lowpass = float(rng.uniform(50, 400)), float(rng.uniform(3000, 8000))
    else:
        highpass, lowpass = 0.0, 0.0
    if rng.random() < 0.7:
        snr, slope = float(rng.uniform(10, 30)), int(rng.integers(0, 3))
    else:
        snr, slope = math.inf, 0
    gain = float(rng.uniform(-12, 6))
    return Condition(speed, rt60, highpass, lowpass, snr, slope, gain)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """Play ``audio`` ``factor`` times faster (shorter for factor > 1), by linear resampling."""
    if factor == 1.0 or len(audio) < 2:
        return audio
    length = max(2, round(len(audio) / factor))
    positions = np.linspace(0.0, len(audio) - 1, length)
    return np.interp(positions, np.arange(len(audio)), audio).astype(np.float32)


def room_response(
    rt60_s: float, rng: np.random.Generator, sr: int = AUDIO_SAMPLE_RATE
) -> np.ndarray:
    """A synthetic impulse response: a unit direct path, then noise decaying by 60 dB in
    ``rt60_s`` seconds (starting 2-10 ms later), scaled to a direct-to-reverberant ratio of
    0-10 dB."""
    n = max(1, int(rt60_s * sr))
    delay = int(rng.uniform(0.002, 0.010) * sr)
    t = np.arange(n) / sr
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60_s)  # ln(1000): 60 dB of amplitude
    drr_db = rng.uniform(0.0, 10.0)
    tail *= 10 ** (-drr_db / 20) / max(float(np.sqrt(np.sum(tail**2))), 1e-12)
    response = np.zeros(delay + n)
    response[0] = 1.0
    response[delay:] += tail
    return response


def band_limit(audio: np.ndarray, highpass_hz: float, lowpass_hz: float) -> np.ndarray:
    """Second-order Butterworth high-pass and fourth-order low-pass (either may be 0: off)."""
    from scipy.signal import butter, sosfilt

    out = audio.astype(np.float64)
    nyquist = AUDIO_SAMPLE_RATE / 2
    if highpass_hz > 0:
        out = sosfilt(butter(2, highpass_hz / nyquist, "highpass", output="sos"), out)
    if 0 < lowpass_hz < nyquist:
        out = sosfilt(butter(4, lowpass_hz / nyquist, "lowpass", output="sos"), out)
    return out


def coloured_noise(n: int, slope: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise whose power falls as 1 / f**slope, unit RMS."""
    white = rng.standard_normal(n)
    if slope == 0 or n < 4:
        return white / max(_rms(white), 1e-12)
    spectrum = np.fft.rfft(white)
    freqs = np.fft.rfftfreq(n)
    freqs[0] = freqs[1]
    coloured = np.fft.irfft(spectrum / freqs ** (slope / 2), n)
    return coloured / max(_rms(coloured), 1e-12)


def apply_condition(
    audio: np.ndarray, condition: Condition, rng: np.random.Generator
) -> np.ndarray:
    """``audio`` (16 kHz mono float32) as heard under ``condition``; float32, same loudness
    before the gain (the room and the band limit do not make it quieter or louder)."""
    from scipy.signal import fftconvolve

    x = change_speed(np.asarray(audio, np.float32), condition.speed).astype(np.float64)
    level = _rms(x)
    if condition.rt60_s > 0:
        x = fftconvolve(x, room_response(condition.rt60_s, rng))[: len(x)]
    if condition.highpass_hz > 0 or condition.lowpass_hz > 0:
        x = band_limit(x, condition.highpass_hz, condition.lowpass_hz)
    if level > 0:
        x *= level / max(_rms(x), 1e-12)
    if math.isfinite(condition.snr_db) and level > 0:
        x += (
            coloured_noise(len(x), condition.noise_slope, rng)
            * level
            / 10 ** (condition.snr_db / 20)
        )
    x *= 10 ** (condition.gain_db / 20)
    return np.clip(x, -1.0, 1.0).astype(np.float32)
