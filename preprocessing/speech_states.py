"""Audio modality from Whisper: the ASR model's encoder states on the time grid.

The audio is cut into Whisper's fixed 30 s windows exactly as faster-whisper's decoder sees them
when it reads the whole clip (the log-Mel spectrogram of the whole clip, window ``k`` starting at
``30 k`` s, the tail window padded); each window goes once through the encoder, which gives 1500
frames of 384 values (tiny.en), one per 20 ms. Frame ``j`` of window ``k`` stands for
``[30 k + 0.02 j, 30 k + 0.02 (j + 1))`` s; frames that start at or after the end of the audio are
dropped. A grid step is the mean of its frames; it is masked (all zeros) when it is silent by the
rule of the librosa features (:func:`preprocessing.audio.sound_mask`) or past the end of the audio.

The windows' encoder output is what :class:`preprocessing.asr.SpeechRecognizer` hands to the
decoder, so transcribing and making these features costs one encoder pass per window.
See docs/FEATURES.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from preprocessing.media import AUDIO_SAMPLE_RATE

SPEECH_STATE_DIM = 384  # tiny.en encoder width
WINDOW_S = 30  # Whisper's fixed input
MEL_HOP = 160  # 10 ms log-Mel frames
MEL_FRAMES_PER_WINDOW = WINDOW_S * AUDIO_SAMPLE_RATE // MEL_HOP  # 3000
ENCODER_STRIDE = 2  # the encoder's second convolution halves the frame rate
FRAME_S = ENCODER_STRIDE * MEL_HOP / AUDIO_SAMPLE_RATE  # 0.02 s per encoder frame


@dataclass(frozen=True)
class EncodedWindow:
    """One 30 s window: where it starts, its encoder input and output.

    ``mel`` (80, 3000) is the window's log-Mel input as faster-whisper's decoder builds it;
    ``output`` is the encoder's output (a ``ctranslate2.StorageView``, handed to the decoder)
    and ``states`` (frames, 384) float32 its frames inside the audio.
    """

    start_s: float
    mel: np.ndarray
    output: Any
    states: np.ndarray


def window_mel(whisper: Any, audio: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """The 30 s windows of ``audio`` as faster-whisper's decoder cuts them (no VAD).

    ``whisper`` is a ``faster_whisper.WhisperModel``. The spectrogram is that of the whole
    clip (its level normalisation is global), window ``k`` its frames ``[3000 k, 3000 (k + 1))``
    padded with zeros to 3000, as ``generate_segments`` pads them at seek ``3000 k``.
    Returns ``[(start_s, mel (80, 3000) float32)]``, at least one window.
    """
    from faster_whisper.audio import pad_or_trim

    features = whisper.feature_extractor(np.asarray(audio, dtype=np.float32))
    content = max(features.shape[-1] - 1, 1)  # generate_segments' content_frames
    windows = []
    for seek in range(0, content, MEL_FRAMES_PER_WINDOW):
        size = min(MEL_FRAMES_PER_WINDOW, content - seek)
        mel = pad_or_trim(features[:, seek : seek + size])
        windows.append((seek * MEL_HOP / AUDIO_SAMPLE_RATE, np.ascontiguousarray(mel)))
    return windows


def storage_to_numpy(output: Any) -> np.ndarray:
    """An encoder output (1, frames, 384) as a float32 numpy array (frames, 384)."""
    array = np.asarray(output)
    return np.asarray(array, dtype=np.float32).reshape(array.shape[-2], array.shape[-1])


def encode_window(whisper: Any, start_s: float, mel: np.ndarray, audio_s: float) -> EncodedWindow:
    """Run the encoder on one window; keep its output and its frames inside the audio."""
    from faster_whisper.transcribe import get_ctranslate2_storage

    storage = get_ctranslate2_storage(mel[None])
    # On a GPU the output is copied to the host (numpy reads it there); the decoder accepts a
    # host encoder output too, as faster-whisper's multi-GPU path passes it.
    on_gpu = getattr(whisper.model, "device", "cpu") == "cuda"
    output = whisper.model.encode(storage, to_cpu=on_gpu)
    states = storage_to_numpy(output)
    inside = int(np.ceil(max(audio_s - start_s, 0.0) / FRAME_S - 1e-9))
    return EncodedWindow(start_s, mel, output, states[: min(inside, len(states))])


def encode_windows(whisper: Any, audio: np.ndarray) -> list[EncodedWindow]:
    """Every 30 s window of ``audio`` through the encoder once (see :func:`window_mel`)."""
    audio_s = len(audio) / AUDIO_SAMPLE_RATE
    windows = window_mel(whisper, audio)
    return [encode_window(whisper, start, mel, audio_s) for start, mel in windows]


def _step_means(
    values: np.ndarray, times_s: np.ndarray, length: int, rate_hz: float
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the time-sorted frames in each grid step (as ``grid.cell_means``, by slices)."""
    cells = np.floor(times_s * rate_hz + 1e-9).astype(np.int64)
    keep = (cells >= 0) & (cells < length)
    cells, values = cells[keep], values[keep]
    counts = np.bincount(cells, minlength=length)
    means = np.zeros((length, values.shape[1]), dtype=np.float32)
    if len(cells):
        starts = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
        sums = np.add.reduceat(values.astype(np.float64), starts, axis=0)
        used = cells[starts]
        means[used] = (sums / counts[used][:, None]).astype(np.float32)
    return means, counts


def states_on_grid(
    windows: list[EncodedWindow] | list[tuple[float, np.ndarray]],
    audio: np.ndarray,
    length: int,
    rate_hz: float,
    *,
    silence_floor_dbfs: float = -55.0,
    silence_range_db: float = 45.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Encoder frames averaged into ``length`` grid steps at ``rate_hz``.

    ``windows``: :class:`EncodedWindow` objects or ``(start_s, states (frames, 384))`` pairs.
    A step is the mean of the frames that start inside it; it is masked, and zero, when it is
    silent (:func:`preprocessing.audio.sound_mask` with the two silence settings) or holds no
    frame (past the end of the audio). Returns ``features`` (length, 384) float32 and ``mask``
    (length,) bool.
    """
    from preprocessing.audio import audio_sound_mask

    features = np.zeros((length, SPEECH_STATE_DIM), dtype=np.float32)
    mask = np.zeros((length,), dtype=bool)
    if audio is None or len(audio) == 0:
        return features, mask
    audio_s = len(audio) / AUDIO_SAMPLE_RATE
    values: list[np.ndarray] = []
    times: list[np.ndarray] = []
    for window in windows:
        start, states = (
            (window.start_s, window.states) if isinstance(window, EncodedWindow) else window
        )
        t = start + np.arange(len(states)) * FRAME_S
        keep = t < audio_s - 1e-9
        values.append(np.asarray(states, dtype=np.float32)[keep])
        times.append(t[keep])
    if values:
        means, counts = _step_means(np.concatenate(values), np.concatenate(times), length, rate_hz)
        sound = audio_sound_mask(
            audio,
            length,
            rate_hz,
            silence_floor_dbfs=silence_floor_dbfs,
            silence_range_db=silence_range_db,
        )
        mask = sound & (counts > 0)
        features[mask] = means[mask]
    return features, mask
