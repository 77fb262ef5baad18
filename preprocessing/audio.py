"""Audio modality: the CH-SIMS acoustic recipe (log F0, 20 MFCC, 12 chroma) on the time grid.

Frame features are computed with librosa on 16 kHz mono audio, one frame every 20 ms, then
averaged into the grid's cells. Cells that are silent are masked. See docs/FEATURES.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from preprocessing.grid import cell_means
from preprocessing.media import AUDIO_SAMPLE_RATE
from preprocessing.profiles import AUDIO_FEATURE_NAMES

AUDIO_DIM = len(AUDIO_FEATURE_NAMES)  # 33
HOP = 320  # 20 ms at 16 kHz
F0_FRAME = 1024  # 64 ms analysis window for the pitch trackers
FMIN_HZ = 65.0
FMAX_HZ = 600.0
N_FFT = 512  # 32 ms MFCC window
N_MELS = 40
# librosa's CQT analyses its lowest octave after 6 halvings of the sample rate with 512-sample
# windows: shorter input is zero-padded to this many samples (the padding is masked as silence).
MIN_SAMPLES = 512 * 2**6 + HOP
# A frame whose YIN aperiodicity is below this is voiced. 0.4 agreed best with librosa's pyin
# voicing on the shared speech clips (84-89 % of loud frames); clean speech sits near 0.1.
APERIODICITY_THRESHOLD = 0.4


@dataclass(frozen=True)
class AcousticFrames:
    """Frame-level features: ``values`` (N, 33), ``times_s`` (N,), ``power`` (N,) mean square."""

    values: np.ndarray
    times_s: np.ndarray
    power: np.ndarray
    voiced: np.ndarray  # (N,) bool


def _yin_with_voicing(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """YIN (de Cheveigné & Kawahara 2002): F0 per frame and a voicing decision.

    Frames are centred like ``librosa.yin`` (1024 samples every 320). The cumulative mean
    normalised difference d'(tau) is computed once; the period is the first trough of d' under
    0.1 (else the global minimum), refined by parabolic interpolation, as librosa.yin does; the
    frame is voiced when the minimum of d' (YIN's aperiodicity) is below
    ``APERIODICITY_THRESHOLD``. Returns f0 (N,) in Hz and voiced (N,) bool.
    """
    import librosa

    half = F0_FRAME // 2
    frames = librosa.util.frame(np.pad(y, (half, half)), frame_length=F0_FRAME, hop_length=HOP)
    import scipy.fft

    frames = np.ascontiguousarray(frames, dtype=np.float32)  # (1024, N)
    min_period = int(np.floor(AUDIO_SAMPLE_RATE / FMAX_HZ))
    max_period = min(int(np.ceil(AUDIO_SAMPLE_RATE / FMIN_HZ)), F0_FRAME - 1)
    # Autocorrelation by FFT in float32 (scipy keeps single precision), the rest in float64.
    spectrum = scipy.fft.rfft(frames, n=2 * F0_FRAME, axis=0)
    power = spectrum.real**2 + spectrum.imag**2
    acf = scipy.fft.irfft(power, n=2 * F0_FRAME, axis=0)[: max_period + 1].astype(np.float64)
    energy = np.cumsum(frames[:max_period].astype(np.float64) ** 2, axis=0)  # (P, N)
    diff = 2.0 * (acf[:1] - acf[1:]) - energy  # d(tau), tau = 1..P
    cumulative_mean = np.cumsum(diff, axis=0) / np.arange(1, max_period + 1)[:, None]
    cmndf = diff[min_period - 1 :] / (cumulative_mean[min_period - 1 :] + 1e-12)  # (K, N)

    # Period: first local minimum under 0.1, else the global minimum.
    trough = np.zeros_like(cmndf, dtype=bool)
    trough[1:-1] = (cmndf[1:-1] < cmndf[:-2]) & (cmndf[1:-1] <= cmndf[2:])
    trough[0] = cmndf[0] < cmndf[1]
    below = trough & (cmndf < 0.1)
    index = np.where(below.any(axis=0), np.argmax(below, axis=0), np.argmin(cmndf, axis=0))
    # Parabolic interpolation around the chosen lag.
    cols = np.arange(cmndf.shape[1])
    left = cmndf[np.maximum(index - 1, 0), cols]
    centre = cmndf[index, cols]
    right = cmndf[np.minimum(index + 1, len(cmndf) - 1), cols]
    curvature = left - 2 * centre + right
    shift = np.divide(
        0.5 * (left - right),
        curvature,
        out=np.zeros_like(curvature),
        where=np.abs(curvature) > 1e-12,
    )
    shift = np.where((index > 0) & (index < len(cmndf) - 1), np.clip(shift, -1, 1), 0.0)
    period = min_period + index + shift
    f0 = AUDIO_SAMPLE_RATE / period
    voiced = cmndf.min(axis=0) < APERIODICITY_THRESHOLD
    return f0, voiced


def _pyin(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import librosa

    f0, voiced, _ = librosa.pyin(
        y, fmin=FMIN_HZ, fmax=FMAX_HZ, sr=AUDIO_SAMPLE_RATE, frame_length=F0_FRAME, hop_length=HOP
    )
    return np.nan_to_num(f0, nan=FMIN_HZ), voiced.astype(bool)


def frame_power(y: np.ndarray) -> np.ndarray:
    """Mean square of 40 ms frames centred every 20 ms (frame ``i`` at ``i * HOP`` samples).

    ``1 + len(y) // HOP`` frames (float64); the signal is zero-padded by one hop on each side.
    Computed in blocks, so memory does not grow with the signal beyond the result.
    """
    import librosa

    padded = np.pad(np.asarray(y, dtype=np.float32), (HOP, HOP))
    total = 1 + len(y) // HOP
    out = np.empty((total,), dtype=np.float64)
    for first in range(0, total, BLOCK_FRAMES):
        stop = min(total, first + BLOCK_FRAMES)
        frames = librosa.util.frame(
            padded[first * HOP : (stop + 1) * HOP], frame_length=2 * HOP, hop_length=HOP
        )  # (640, stop - first)
        out[first:stop] = np.mean(frames.astype(np.float64) ** 2, axis=0)
    return out


def sound_mask(
    power: np.ndarray,
    times_s: np.ndarray,
    audio_s: float,
    length: int,
    rate_hz: float,
    *,
    silence_floor_dbfs: float,
    silence_range_db: float,
) -> np.ndarray:
    """The grid steps that hold sound: the silence rule shared by every audio feature.

    ``power`` (N,) is the mean square of frames at ``times_s`` (:func:`frame_power`); frames at
    or past ``audio_s`` (the end of the decoded audio) are ignored. A step is silent when its
    mean frame power is below ``silence_floor_dbfs`` or more than ``silence_range_db`` below
    the loudest step; a step without frames (past the end) is silent too. Returns (length,) bool.
    """
    inside = np.asarray(times_s) < audio_s
    means, counts = cell_means(
        np.asarray(power)[inside, None], np.asarray(times_s)[inside], length, rate_hz
    )
    db = 10.0 * np.log10(np.maximum(means[:, 0].astype(np.float64), 1e-12))
    has_audio = counts > 0
    if not has_audio.any():
        return np.zeros((length,), dtype=bool)
    loudest = db[has_audio].max()
    return has_audio & (db >= silence_floor_dbfs) & (db >= loudest - silence_range_db)


def audio_sound_mask(
    audio: np.ndarray,
    length: int,
    rate_hz: float,
    *,
    silence_floor_dbfs: float = -55.0,
    silence_range_db: float = 45.0,
) -> np.ndarray:
    """:func:`sound_mask` of 16 kHz mono ``audio`` on a grid of ``length`` steps."""
    y = np.asarray(audio, dtype=np.float32)
    if len(y) == 0:
        return np.zeros((length,), dtype=bool)
    power = frame_power(y)
    times = np.arange(len(power)) * HOP / AUDIO_SAMPLE_RATE
    return sound_mask(
        power,
        times,
        len(y) / AUDIO_SAMPLE_RATE,
        length,
        rate_hz,
        silence_floor_dbfs=silence_floor_dbfs,
        silence_range_db=silence_range_db,
    )


def acoustic_frames(audio: np.ndarray, f0_method: str = "yin") -> AcousticFrames:
    """Frame-level CH-SIMS features of 16 kHz mono audio (one frame per 20 ms, centred)."""
    import librosa

    y = np.asarray(audio, dtype=np.float32)
    if len(y) < MIN_SAMPLES:  # the CQT's lowest octave needs a few windows; zeros are silence
        y = np.pad(y, (0, MIN_SAMPLES - len(y)))
    if f0_method == "pyin":
        f0, voiced = _pyin(y)
    else:
        f0, voiced = _yin_with_voicing(y)
    mfcc = librosa.feature.mfcc(
        y=y, sr=AUDIO_SAMPLE_RATE, n_mfcc=20, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS
    )  # (20, N)
    # tuning=0: A4 = 440 Hz assumed (estimating it costs an extra STFT and varies per clip).
    chroma = librosa.feature.chroma_cqt(
        y=y, sr=AUDIO_SAMPLE_RATE, hop_length=HOP, tuning=0.0
    )  # (12, N)
    power = frame_power(y)
    n = min(len(f0), mfcc.shape[1], chroma.shape[1], len(power))
    log_f0 = np.where(voiced[:n], np.log(np.maximum(f0[:n], 1.0)), 0.0)
    values = np.concatenate([log_f0[None, :], mfcc[:, :n], chroma[:, :n]], axis=0).T  # (N, 33)
    times = np.arange(n) * HOP / AUDIO_SAMPLE_RATE
    return AcousticFrames(
        values=values.astype(np.float32), times_s=times, power=power[:n], voiced=voiced[:n]
    )


# Long audio is analysed in blocks so memory does not grow with the clip (librosa's frame
# matrices of a 10-minute clip peak near 1 GB). Each block is analysed with a margin on both
# sides, wider than the CQT's longest window (MIN_SAMPLES, ~2.1 s), and only its own frames are
# kept, so block edges see the same context as the whole signal gives them.
BLOCK_FRAMES = 1500  # 30 s of frames per block
MARGIN_FRAMES = 150  # 3 s on each side
BLOCKED_AFTER_SAMPLES = 60 * AUDIO_SAMPLE_RATE  # audio longer than a minute is analysed in blocks


def acoustic_frames_blocked(audio: np.ndarray, f0_method: str = "yin") -> AcousticFrames:
    """:func:`acoustic_frames` of long audio, computed block by block in bounded memory.

    Frames are the same ones (one per 20 ms, centred), and so are their values: the margins
    give every kept frame the context the one-pass analysis gives it (a test compares the two).
    """
    y = np.asarray(audio, dtype=np.float32)
    total = 1 + len(y) // HOP  # centred frames of the whole signal
    parts: list[AcousticFrames] = []
    for first in range(0, total, BLOCK_FRAMES):
        stop = min(total, first + BLOCK_FRAMES)
        lo = max(0, first - MARGIN_FRAMES)
        hi = min(total, stop + MARGIN_FRAMES)
        block = acoustic_frames(y[lo * HOP : hi * HOP], f0_method)
        keep = slice(first - lo, stop - lo)
        parts.append(
            AcousticFrames(
                values=block.values[keep],
                times_s=block.times_s[keep] + lo * HOP / AUDIO_SAMPLE_RATE,
                power=block.power[keep],
                voiced=block.voiced[keep],
            )
        )
    return AcousticFrames(
        values=np.concatenate([p.values for p in parts]),
        times_s=np.concatenate([p.times_s for p in parts]),
        power=np.concatenate([p.power for p in parts]),
        voiced=np.concatenate([p.voiced for p in parts]),
    )


def audio_on_grid(
    audio: np.ndarray,
    length: int,
    rate_hz: float,
    *,
    f0_method: str = "yin",
    silence_floor_dbfs: float = -55.0,
    silence_range_db: float = 45.0,
) -> tuple[np.ndarray, np.ndarray]:
    """CH-SIMS features averaged into ``length`` grid cells at ``rate_hz``.

    log F0 of a cell is the mean over its voiced frames (0 when none is voiced); MFCC and chroma
    are plain means. A cell is silent, and masked, when its mean power is below
    ``silence_floor_dbfs`` or more than ``silence_range_db`` below the loudest cell.
    Returns ``features`` (length, 33) float32 and ``mask`` (length,) bool.
    """
    features = np.zeros((length, AUDIO_DIM), dtype=np.float32)
    mask = np.zeros((length,), dtype=bool)
    if audio is None or len(audio) == 0:
        return features, mask
    if len(audio) > BLOCKED_AFTER_SAMPLES:
        frames = acoustic_frames_blocked(audio, f0_method)
    else:
        frames = acoustic_frames(audio, f0_method)
    # Everything but log F0 is a plain mean.
    means, counts = cell_means(frames.values, frames.times_s, length, rate_hz)
    features[:] = means
    # log F0: mean over voiced frames only.
    voiced_idx = np.flatnonzero(frames.voiced)
    f0_means, f0_counts = cell_means(
        frames.values[voiced_idx, :1], frames.times_s[voiced_idx], length, rate_hz
    )
    features[:, 0] = np.where(f0_counts > 0, f0_means[:, 0], 0.0)
    # Silence from cell power, frames past the decoded audio excluded.
    mask = sound_mask(
        frames.power,
        frames.times_s,
        len(audio) / AUDIO_SAMPLE_RATE,
        length,
        rate_hz,
        silence_floor_dbfs=silence_floor_dbfs,
        silence_range_db=silence_range_db,
    )
    features[~mask] = 0.0  # masked steps are zeros in every modality
    del counts
    return features, mask


def warmup_audio(f0_method: str = "yin") -> None:
    """Run the recipe once on a short synthetic tone so numba compiles before the first clip."""
    t = np.arange(2 * AUDIO_SAMPLE_RATE) / AUDIO_SAMPLE_RATE
    tone = (0.1 * np.sin(2 * np.pi * 150.0 * t)).astype(np.float32)
    audio_on_grid(tone, 20, 10.0, f0_method=f0_method)
