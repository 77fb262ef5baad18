"""Live features: one stream's audio and video handed in pieces, features on the extractor's grid.

:class:`LiveExtractor` makes the same modalities, dimensions and grid as the offline
:class:`preprocessing.Extractor` (the same profile), for a stream that arrives while it is
processed. ``push_audio`` and ``push_frame`` only queue their input (cheap, safe to call from an
event loop while another thread computes); ``ready`` does the work and returns the grid steps
whose features are final; ``finish`` ends the stream. Rows come in order, without gaps or overlap.

How each modality is made, and how it differs from the offline extractor on the same clip:

- **Audio** (either recipe of the profile) is computed on a window of the audio received so far
  and only for steps at least ``AUDIO_LOOKAHEAD_S`` before the end of that audio (with Whisper
  states, by ``WHISPER_MIN_STEP_S`` of steps at least: one encoder pass each). Whisper
  encoder states use a window of at most 30 s ending at the newest audio (the first 30 s of a
  stream are one window from 0, as offline); the encoder attends over the whole window, so a
  step's state misses the audio after the window's end, and the log-Mel level normalisation
  and the relative silence rule see the window instead of the whole clip. The librosa recipe
  is local (64 ms frames): a window with ``LIBROSA_CONTEXT_S`` of context each side suffices;
  only the relative silence rule differs. tests/preprocessing/test_live.py bounds the
  difference on the shared clips; docs/STREAMING.md gives the numbers.
- **Visual**: frames are sampled at ``frame_rate_hz`` by the offline rule, each goes through the
  same face-mesh graph in tracking mode (one per stream) and the same crop and face encoder, and
  steps are made by the offline ``visual_on_grid``: a step equals the offline one when the same
  frames are used. When ``ready`` falls behind, queued frames beyond ``FRAME_BACKLOG_S`` of
  video are dropped (oldest first, counted in ``dropped_frames``); audio is never dropped.
- **Text**: speech is recognised with the offline recogniser on the audio not yet committed
  (see :class:`LiveAsrSettings`), on a thread of the stream's own: ``ready`` hands it the new
  audio and takes the words it committed meanwhile, never waiting for a pass (``finish`` waits
  for the last one; ``close`` stops the thread). An utterance is committed when Silero VAD
  (bundled with faster-whisper) finds a pause after it, and a long utterance in a sliding
  window whose words are committed once they end ``guard_s`` before the window's end.
  Committed words are embedded once per commit (MiniLM sees the words of that commit, not the
  whole transcript) and placed by the offline ``align_text``. A text step is final once the
  audio up to its end is committed, so text delays the final rows by the recognition delay
  (the provisional rows mask text there). A ``transcript_hint`` replaces
  recognition: its words are placed at the nominal speaking rate from t = 0, as offline (not
  squeezed into the clip, whose length is unknown while it streams).

**Provisional steps.** ``ready`` also returns, in ``LiveRows.provisional``, the steps after the
final ones up to the audio received, made from what there is so far: audio from the same
encoder pass as the final steps (a Whisper window ends at the newest audio anyway; with less
than ``WHISPER_MIN_STEP_S`` of final steps it is the one pass of the call), visual from the
frames processed, text from the committed words (masked where speech is not recognised yet).
They are not final: the next call makes them again. A caller scores them from a COPY of its
model state, to answer on everything received without waiting for the recognition delay.

Memory per stream stays bounded: audio older than what the windows and recognition still need
is dropped, and so are frames and words before the next row; ``ready`` waits for the
recognition thread when more than ``ASR_BACKLOG_S`` of audio waits for it (recognition slower
than the stream), so the audio it holds is bounded too.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from preprocessing.asr import Word
from preprocessing.errors import LiveInputError
from preprocessing.extractor import Extractor
from preprocessing.grid import grid_length
from preprocessing.media import AUDIO_SAMPLE_RATE, next_frame_sample_s, scaled_size
from preprocessing.text import TokenEmbeddings, align_text, split_words, uniform_word_times

SR = AUDIO_SAMPLE_RATE
WHISPER_WINDOW_S = 30.0  # the encoder's fixed input
AUDIO_LOOKAHEAD_S = 0.5  # audio after a step before its audio features are final
# Whisper states cost one encoder pass over a padded 30 s window whatever the new audio: rows
# are released by at least this much at a time (one pass per second of stream at most).
WHISPER_MIN_STEP_S = 1.0
LIBROSA_CONTEXT_S = 2.5  # audio each side of the steps computed with the librosa recipe
FRAME_BACKLOG_S = 2.0  # video queued for ready() beyond this is dropped (oldest first)
FRAME_AHEAD_S = 10.0  # a frame may not be further ahead of the stream (audio or last frame)
# Audio handed to the recognition thread and not passed over yet beyond this makes ready() wait
# for it (memory stays bounded when recognition is slower than the stream; never dropped).
ASR_BACKLOG_S = 10.0
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
_KEEP_S = 1.0  # frames and words kept before the next row (a frame may be borrowed back)


@dataclass(frozen=True)
class LiveAsrSettings:
    """Streaming speech recognition: when a pass runs and which of its words are final.

    ``step_s``: new audio between two recognition passes. ``vad``: cut utterances at pauses of
    at least ``min_silence_s`` found by Silero VAD and commit each whole. An utterance still
    open after ``window_s`` (or every pass, without ``vad``) is read in a sliding window: its
    words that end ``guard_s`` or more before the window's end are committed and the window
    moves to the last one's end.
    """

    window_s: float = 8.0
    step_s: float = 1.0
    guard_s: float = 1.0
    vad: bool = True
    min_silence_s: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.guard_s < self.window_s <= WHISPER_WINDOW_S:
            raise ValueError("LiveAsrSettings needs 0 < guard_s < window_s <= 30")
        if self.step_s <= 0 or self.min_silence_s <= 0:
            raise ValueError("LiveAsrSettings needs step_s > 0 and min_silence_s > 0")


@dataclass(frozen=True)
class LiveRows:
    """Grid steps ``[start, start + n)`` whose features are final (``n`` may be 0)."""

    start: int
    features: dict[str, np.ndarray]  # modality -> (n, dim) float32
    masks: dict[str, np.ndarray]  # modality -> (n,) bool (False = modality absent there)
    words: list[Word]  # words that became final in this call
    dropped_frames: int  # video frames dropped since the last call (ready() fell behind)
    provisional: LiveRows | None = None
    """``ready()`` only: the steps after these up to the audio received, NOT final (audio and
    visual from what there is so far, text from the words committed so far: masked where speech
    is not recognised yet). A preview to score from a copy of the model state; the next call
    returns these steps again, final or provisional."""

    @property
    def length(self) -> int:
        """Number of steps."""
        return len(next(iter(self.masks.values()))) if self.masks else 0


class _AudioBuffer:
    """16 kHz audio of a stream, from sample ``origin`` on (older audio is trimmed)."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._data = np.zeros(0, np.float32)
        self.origin = 0
        self.total = 0

    def append(self, chunk: np.ndarray) -> None:
        if len(chunk):
            self._chunks.append(chunk)
            self.total += len(chunk)

    def _joined(self) -> np.ndarray:
        if self._chunks:
            self._data = np.concatenate([self._data, *self._chunks])
            self._chunks = []
        return self._data

    def seconds(self, start_s: float, end_s: float) -> np.ndarray:
        """Samples ``[start_s, end_s)`` (absolute seconds; clipped to what is kept)."""
        data = self._joined()
        a = max(round(start_s * SR) - self.origin, 0)
        b = max(min(round(end_s * SR) - self.origin, len(data)), a)
        return data[a:b]

    def trim(self, keep_from_s: float) -> None:
        cut = round(keep_from_s * SR) - self.origin
        if cut > 0:
            data = self._joined()
            cut = min(cut, len(data))
            self._data = data[cut:].copy()
            self.origin += cut

    @property
    def end_s(self) -> float:
        return self.total / SR


class _Resampler:
    """Mono float32 at the stream's rate to 16 kHz, keeping filter state across pieces."""

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._av: Any = None

    def __call__(self, samples: np.ndarray | None) -> np.ndarray:
        if self._rate == SR:
            return np.zeros(0, np.float32) if samples is None else samples
        import av

        if self._av is None:
            self._av = av.AudioResampler(format="flt", layout="mono", rate=SR)
        frame = None
        if samples is not None:
            if not len(samples):
                return np.zeros(0, np.float32)
            frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
            frame.sample_rate = self._rate
        out = [f.to_ndarray().reshape(-1) for f in self._av.resample(frame)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


class _LiveAsr:
    """Streaming recognition over an :class:`_AudioBuffer`; words committed in time order."""

    def __init__(self, recognizer: Any, settings: LiveAsrSettings) -> None:
        self._recognizer = recognizer
        self._settings = settings
        self.commit_s = 0.0  # audio before this is recognised and its words final
        self._last_pass_s = -math.inf

    def _recognise(self, audio: _AudioBuffer, start_s: float, end_s: float) -> list[Word]:
        result = self._recognizer.transcribe(audio.seconds(start_s, end_s))
        return [
            Word(w.text, start_s + w.start_s, min(start_s + w.end_s, end_s)) for w in result.words
        ]

    def _slide(self, audio: _AudioBuffer, end_s: float) -> list[Word]:
        """One sliding-window pass from the commit point; commits the words that end early
        enough, or gives up on the window's start when it is full without any."""
        cfg = self._settings
        stop = min(end_s, self.commit_s + cfg.window_s)
        words = [w for w in self._recognise(audio, self.commit_s, stop) if w.end_s <= stop]
        kept = [w for w in words if w.end_s <= stop - cfg.guard_s]
        if kept:
            self.commit_s = max(self.commit_s, kept[-1].end_s)
        elif stop - self.commit_s >= cfg.window_s:
            self.commit_s = stop - cfg.guard_s
        return kept

    def step(self, audio: _AudioBuffer, final: bool) -> list[Word]:
        """Run a pass when ``step_s`` of new audio arrived (always when ``final``)."""
        cfg = self._settings
        end_s = audio.end_s
        if not final and end_s - self._last_pass_s < cfg.step_s:
            return []
        self._last_pass_s = end_s
        if end_s - self.commit_s < 0.1:  # under 0.1 s: nothing to recognise yet
            if final:
                self.commit_s = end_s
            return []
        if final:
            last = self._recognise(audio, self.commit_s, end_s)
            self.commit_s = end_s
            return last
        if not cfg.vad:
            return self._slide(audio, end_s)
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        pending = audio.seconds(self.commit_s, end_s)
        options = VadOptions(
            min_silence_duration_ms=int(cfg.min_silence_s * 1000), speech_pad_ms=200
        )
        chunks = get_speech_timestamps(pending, options)
        words: list[Word] = []
        if not chunks:  # nothing said: keep only the tail open (speech may be starting)
            self.commit_s = max(self.commit_s, end_s - cfg.guard_s)
            return words
        # A chunk that ends before the end of the audio was followed by a pause.
        closed = [c for c in chunks if c["end"] < len(pending) - SR // 10]
        if closed:
            cut = self.commit_s + closed[-1]["end"] / SR
            words = self._recognise(audio, self.commit_s, cut)
            self.commit_s = cut
        elif chunks[0]["start"] / SR > cfg.guard_s:  # silence before the open utterance
            self.commit_s += chunks[0]["start"] / SR - cfg.guard_s / 2
        if end_s - self.commit_s >= cfg.window_s:  # a long utterance: slide
            words += self._slide(audio, end_s)
        return words


class _AsrWorker:
    """A stream's speech recognition on its own thread, off the path of ``ready``.

    ``feed`` hands it the stream's 16 kHz audio (and the end of the stream); the thread runs
    :class:`_LiveAsr` passes on its own copy of the audio that is not committed yet, embeds
    the words of each commit and keeps them until ``collect`` takes them with the commit
    point. ``join`` waits for the last pass after the end; ``stop`` ends the thread after the
    pass under way (if any) without running another.
    """

    _count = 0
    _count_lock = threading.Lock()

    def __init__(self, recognizer: Any, text_encoder: Any, settings: LiveAsrSettings) -> None:
        self._asr = _LiveAsr(recognizer, settings)
        self._encoder = text_encoder
        self._audio = _AudioBuffer()
        self._cond = threading.Condition()
        # Each feed is passed over on its own, in order (chunks, final, samples fed by its
        # end): the passes cut the audio where the feeds do, however late the thread runs.
        self._incoming: deque[tuple[list[np.ndarray], bool, int]] = deque()
        self._final = False  # the end of the stream was fed
        self._stopped = False
        self._committed: list[tuple[list[Word], TokenEmbeddings | None]] = []
        self._commit_s = 0.0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._passing = False  # the thread is over audio taken from _incoming
        self._fed = 0  # samples handed over
        self._passed = 0  # samples the thread has passed over

    @property
    def busy(self) -> bool:
        """Audio handed over is not passed over yet (a pass under way or to come)."""
        with self._cond:
            running = self._thread is not None and self._thread.is_alive()
            return running and (self._passing or bool(self._incoming))

    def feed(self, chunks: list[np.ndarray], final: bool) -> None:
        """Queue audio for recognition (``final``: the stream ends after it)."""
        with self._cond:
            if self._stopped or self._final:
                return
            chunks = [c for c in chunks if len(c)]
            if not chunks and not final:
                return
            self._fed += sum(len(c) for c in chunks)
            self._final = final
            self._incoming.append((chunks, final, self._fed))
            if self._thread is None:
                with _AsrWorker._count_lock:
                    _AsrWorker._count += 1
                    name = f"cmamba-live-asr-{_AsrWorker._count}"
                self._thread = threading.Thread(target=self._run, name=name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def wait_backlog(self, limit_s: float) -> None:
        """Wait until at most ``limit_s`` of the audio handed over is not passed over yet."""
        with self._cond:
            while (
                self._fed - self._passed > limit_s * SR
                and self._error is None
                and not self._stopped
                and self._thread is not None
                and self._thread.is_alive()
            ):
                self._cond.wait(0.1)

    def collect(self) -> tuple[list[tuple[list[Word], TokenEmbeddings | None]], float]:
        """The commits made since the last call and the commit point (audio before it is
        recognised); re-raises a failure of the recognition thread."""
        with self._cond:
            if self._error is not None:
                raise self._error
            committed, self._committed = self._committed, []
            return committed, self._commit_s

    def join(self) -> None:
        """Wait until the thread has ended (after the final pass, or after ``stop``)."""
        thread = self._thread
        if thread is not None:
            thread.join()

    def stop(self, wait: bool = True) -> None:
        """End the thread after the pass under way (``wait``: wait for that); later audio is
        ignored."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._incoming or self._stopped):
                        self._cond.wait()
                    if self._stopped:
                        return
                    chunks, final, taken = self._incoming.popleft()
                    self._passing = True
                for chunk in chunks:
                    self._audio.append(chunk)
                words = self._asr.step(self._audio, final) if self._audio.total else []
                tokens = None
                if words:
                    tokens = self._encoder.encode_words([w.text for w in words])
                self._audio.trim(max(0.0, self._asr.commit_s - 0.1))
                with self._cond:
                    if words:
                        self._committed.append((words, tokens))
                    self._commit_s = self._asr.commit_s
                    self._passing = False
                    self._passed = taken
                    self._cond.notify_all()
                    if final:
                        return
        except BaseException as exc:  # handed to the stream's next ready() / finish()
            with self._cond:
                self._error = exc
                self._cond.notify_all()


class _TextRows:
    """Final words with their piece embeddings, placed on the grid step range asked for."""

    def __init__(self) -> None:
        self._words: deque[tuple[float, float, str, np.ndarray]] = deque()

    def add(self, tokens: TokenEmbeddings, times: np.ndarray) -> None:
        for i, word in enumerate(tokens.words):
            pieces = tokens.embeddings[tokens.word_index == i]
            self._words.append((float(times[i, 0]), float(times[i, 1]), word, pieces))

    def rows(
        self, first: int, steps: int, duration_s: float, rate: float, words_per_s: float
    ) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = first / rate - _KEEP_S, (first + steps) / rate + _KEEP_S
        near = [w for w in self._words if w[1] >= lo and w[0] < hi]
        if near:
            tokens = TokenEmbeddings(
                embeddings=np.concatenate([w[3] for w in near]).astype(np.float32),
                word_index=np.concatenate(
                    [np.full(len(w[3]), i, np.int64) for i, w in enumerate(near)]
                ),
                words=tuple(w[2] for w in near),
            )
            times: np.ndarray | None = np.array([(w[0], w[1]) for w in near], np.float64)
        else:
            tokens, times = TokenEmbeddings.empty(), None
        return align_text(
            tokens,
            times,
            duration_s,
            rate,
            words_per_s=words_per_s,
            first_step=first,
            steps=steps,
        )

    def forget_before(self, time_s: float) -> None:
        while self._words and self._words[0][1] < time_s - _KEEP_S:
            self._words.popleft()


class _LiveFaces:
    """Sampled frames of a stream through one face-mesh graph; per-frame values kept briefly."""

    def __init__(self, extractor: Extractor) -> None:
        settings = extractor.settings
        self._extractor = extractor
        self._min_confidence = settings.min_face_confidence
        self._period = 1.0 / settings.frame_rate_hz
        self._max_side = settings.frame_max_side
        self._backlog = max(1, math.ceil(FRAME_BACKLOG_S * settings.frame_rate_hz))
        self._runner: Any = None
        self._next_s = 0.0
        self.pending: deque[tuple[np.ndarray, float]] = deque()
        self.dropped = 0
        self.last_time_s: float | None = None  # newest frame pushed (sampled or not)
        self._times: deque[float] = deque()
        self._values: deque[np.ndarray] = deque()
        self._found: deque[bool] = deque()

    def push(self, rgb: np.ndarray, time_s: float) -> None:
        """Queue a frame if the sampling rule keeps it (called under the stream's lock)."""
        self.last_time_s = time_s
        if time_s + 1e-6 < self._next_s:
            return
        self._next_s = next_frame_sample_s(time_s, self._period)
        self.pending.append((rgb, time_s))
        while len(self.pending) > self._backlog:
            self.pending.popleft()
            self.dropped += 1

    def process(self, frames: list[tuple[np.ndarray, float]]) -> None:
        if not frames:
            return
        encoder = self._extractor.face_encoder
        if self._runner is None:
            from preprocessing.visual import FaceMeshRunner

            self._runner = FaceMeshRunner(self._min_confidence)
        crops: list[np.ndarray] = []
        rows: list[np.ndarray | None] = []
        for rgb, time_s in frames:
            image = _fit(rgb, self._max_side)
            seen = self._runner.observe(image, crop=encoder is not None)
            value = None
            if seen is not None:
                if encoder is not None and seen.crop is not None:
                    crops.append(seen.crop)
                    value = np.zeros(0, np.float32)  # filled from the batch below
                elif encoder is None:
                    value = seen.features.astype(np.float32)
            rows.append(value)
            self._times.append(time_s)
        embedded = iter(encoder.encode_crops(np.stack(crops)) if crops else [])
        dim = _visual_dim(self._extractor)
        for value in rows:
            if value is not None and value.size == 0:
                value = np.asarray(next(embedded), np.float32)
            self._found.append(value is not None)
            self._values.append(value if value is not None else np.zeros(dim, np.float32))

    def rows(self, first: int, steps: int, rate: float, frame_rate: float) -> tuple[Any, Any]:
        from preprocessing.visual import visual_on_grid

        dim = _visual_dim(self._extractor)
        lo, hi = first / rate - _KEEP_S, (first + steps) / rate + _KEEP_S
        pick = [i for i, t in enumerate(self._times) if lo <= t < hi]
        if not pick:
            return np.zeros((steps, dim), np.float32), np.zeros((steps,), bool)
        values = np.stack([self._values[i] for i in pick])
        found = np.array([self._found[i] for i in pick], bool)
        times = np.array([self._times[i] for i in pick], np.float64)
        return visual_on_grid(values, found, times, steps, rate, frame_rate, first_step=first)

    def forget_before(self, time_s: float) -> None:
        while self._times and self._times[0] < time_s - _KEEP_S:
            self._times.popleft()
            self._values.popleft()
            self._found.popleft()

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None


def _visual_dim(extractor: Extractor) -> int:
    """Width of the visual rows: the face encoder's embedding, or the 17 face-mesh features."""
    if extractor.settings.face_encoder_path is not None:
        from preprocessing.face_expression import FACE_EMBED_DIM

        return FACE_EMBED_DIM
    from preprocessing.visual import VISUAL_DIM

    return VISUAL_DIM


def _fit(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Scale a frame down so its longer side fits ``max_side``, as the decoder does."""
    height, width = rgb.shape[:2]
    size = scaled_size(width, height, max_side)
    if max(width, height) <= max_side:
        return rgb
    import av

    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    return np.asarray(frame.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray())


class LiveExtractor:
    """Incremental features of ONE stream on the grid and profile of ``extractor``.

    ``sample_rate``: the rate of the audio handed to :meth:`push_audio` (resampled to 16 kHz).
    ``transcript_hint``: the stream's words, when known (no speech recognition then).
    ``asr``: the streaming recognition settings (default :class:`LiveAsrSettings`).

    ``push_audio`` / ``push_frame`` may be called from one thread while another calls
    ``ready`` / ``finish``; ``ready`` and ``finish`` must not run at the same time as each
    other. Bad input raises :class:`preprocessing.errors.LiveInputError` and changes nothing.
    """

    def __init__(
        self,
        extractor: Extractor,
        *,
        sample_rate: int,
        transcript_hint: str | None = None,
        asr: LiveAsrSettings | None = None,
    ) -> None:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
            raise LiveInputError(f"The sample rate must be an integer, not {sample_rate!r}.")
        if not MIN_SAMPLE_RATE <= int(sample_rate) <= MAX_SAMPLE_RATE:
            raise LiveInputError(
                f"The sample rate {sample_rate} Hz is outside {MIN_SAMPLE_RATE}-"
                f"{MAX_SAMPLE_RATE} Hz."
            )
        self._extractor = extractor
        settings = extractor.settings
        self._settings = settings
        self._rate = settings.rate_hz
        self._modalities = extractor.modalities
        self._dims = dict(extractor.dims)
        if "visual" in self._dims:  # what the offline extractor makes with these settings
            self._dims["visual"] = _visual_dim(extractor)
        self._sample_rate = int(sample_rate)
        self._lock = threading.Lock()  # guards the queues below, shared with the push methods
        self._pending_audio: list[np.ndarray] = []
        self._received_samples = 0
        self._finished = False
        self._closed = False
        self._resampler = _Resampler(self._sample_rate)
        self._audio = _AudioBuffer()
        self._faces = _LiveFaces(extractor) if "visual" in self._modalities else None
        self._last_frame_s: float | None = None  # newest frame pushed
        self._taken_frame_s: float | None = None  # newest frame pushed before the last take
        self._next_row = 0
        # Whisper states of the windows computed in this ready(): the provisional steps read the
        # same window as the final ones (it ends at the newest audio), so no second pass.
        self._window_cache: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._all_words: list[Word] = []
        self._text = _TextRows() if "text" in self._modalities else None
        self._asr: _AsrWorker | None = None
        self._commit_s = 0.0  # audio before this is recognised (what the recogniser reported)
        self._hint: list[Word] = []
        hint = transcript_hint.strip() if transcript_hint and transcript_hint.strip() else None
        if self._text is not None and hint is not None:
            tokens = extractor.text_encoder.encode(hint)
            times = uniform_word_times(len(tokens.words), None, settings.words_per_s)
            self._text.add(tokens, times)
            self._hint = [
                Word(w, float(t[0]), float(t[1]))
                for w, t in zip(split_words(hint), times, strict=True)
            ]
        elif self._text is not None:
            self._asr = _AsrWorker(
                extractor.recognizer, extractor.text_encoder, asr or LiveAsrSettings()
            )
            # A stream dropped without finish() or close() stops its recogniser too (without
            # waiting: the collector may run on any thread).
            weakref.finalize(self, self._asr.stop, False).atexit = False

    # -- input (cheap; any thread) --------------------------------------------------------------

    def push_audio(self, samples: np.ndarray) -> None:
        """Queue mono float32 samples (full scale [-1, 1]) at the stream's sample rate. Values
        past full scale are kept as they are, as decoded media keeps them."""
        if not isinstance(samples, np.ndarray):
            raise LiveInputError(f"Audio must be a numpy array, not {type(samples).__name__}.")
        if samples.dtype != np.float32:
            raise LiveInputError(f"Audio must be float32 samples, not {samples.dtype}.")
        if samples.ndim != 1:
            raise LiveInputError(f"Audio must be mono (one dimension), not {samples.shape}.")
        if not np.isfinite(samples).all():
            raise LiveInputError("Audio samples must be finite (NaN or infinity received).")
        chunk = samples.copy()
        with self._lock:
            self._check_open()
            self._pending_audio.append(chunk)
            self._received_samples += len(chunk)

    def push_frame(self, rgb: np.ndarray, time_s: float) -> None:
        """Queue a (h, w, 3) uint8 RGB video frame at ``time_s`` seconds of the stream; frames
        are sampled at the extractor's frame rate and must come in time order."""
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
            kind = rgb.dtype if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise LiveInputError(f"A frame must be a uint8 RGB array, not {kind}.")
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 2 or rgb.shape[1] < 2:
            raise LiveInputError(f"A frame must be (height, width, 3) RGB, not {rgb.shape}.")
        s = self._settings
        if rgb.shape[0] > s.max_height or rgb.shape[1] > s.max_width:
            raise LiveInputError(
                f"A frame of {rgb.shape[1]}x{rgb.shape[0]} is over the "
                f"{s.max_width}x{s.max_height} limit."
            )
        try:
            t = float(time_s)
        except (TypeError, ValueError):
            raise LiveInputError(f"A frame's time must be a number, not {time_s!r}.") from None
        if not math.isfinite(t) or t < 0:
            raise LiveInputError(f"A frame's time must be a finite number >= 0, not {time_s!r}.")
        with self._lock:
            self._check_open()
            if self._faces is None:
                return
            last = self._last_frame_s
            if last is not None and t < last:
                raise LiveInputError(
                    f"Frame times must not go backwards ({t:.3f} s after {last:.3f} s)."
                )
            ahead = max(last or 0.0, self._received_samples / self._sample_rate)
            if t > ahead + FRAME_AHEAD_S:
                raise LiveInputError(
                    f"A frame at {t:.3f} s is more than {FRAME_AHEAD_S:.0f} s ahead of the "
                    f"stream ({ahead:.3f} s)."
                )
            self._last_frame_s = t
            self._faces.push(np.ascontiguousarray(rgb), t)

    def _check_open(self) -> None:
        if self._finished:
            raise LiveInputError("The stream has finished; it takes no more input.")

    # -- state -----------------------------------------------------------------------------------

    @property
    def words(self) -> list[Word]:
        """Every word final so far, in time order."""
        return list(self._all_words)

    @property
    def recognising(self) -> bool:
        """The recogniser has audio handed to it by ``ready`` that it has not passed over yet
        (its words come in a later call)."""
        return self._asr is not None and self._asr.busy

    @property
    def stream_seconds(self) -> float:
        """Seconds of audio received."""
        return self._received_samples / self._sample_rate

    # -- compute (a worker thread) ---------------------------------------------------------------

    def ready(self) -> LiveRows:
        """Compute what the queued input allows; returns the steps now final (maybe none)."""
        return self._advance(final=False)

    def finish(self) -> LiveRows:
        """End of stream: every remaining step, all final. Later calls return no rows."""
        with self._lock:
            self._finished = True
        return self._advance(final=True)

    def close(self) -> None:
        """End the stream without its last rows (the client went away, the server stops):
        refuse more input and stop the recognition thread, waiting for a pass under way.
        ``finish`` needs no ``close`` (its recogniser has ended); calling both is harmless."""
        with self._lock:
            self._finished = True
        if self._asr is not None:
            self._asr.stop()

    def _take_input(self) -> tuple[list[np.ndarray], list[tuple[np.ndarray, float]], int]:
        with self._lock:
            audio, self._pending_audio = self._pending_audio, []
            self._taken_frame_s = self._last_frame_s
            frames: list[tuple[np.ndarray, float]] = []
            dropped = 0
            if self._faces is not None:
                frames = list(self._faces.pending)
                self._faces.pending.clear()
                dropped, self._faces.dropped = self._faces.dropped, 0
            return audio, frames, dropped

    def _advance(self, final: bool) -> LiveRows:
        if self._closed:
            return self._rows(self._next_row, self._next_row, [], 0)
        audio, frames, dropped = self._take_input()
        resampled = [self._resampler(chunk) for chunk in audio]
        if final:
            resampled.append(self._resampler(None))
        for chunk in resampled:
            self._audio.append(chunk)
        new_words: list[Word] = []
        if self._asr is not None:
            # Recognition runs on its own thread while this call makes the other features;
            # this call takes the words committed meanwhile (at the end: all of them).
            self._asr.feed(resampled, final)
        if self._faces is not None:
            self._faces.process(frames)
        if self._asr is not None:
            if final:
                self._asr.join()
            else:
                self._asr.wait_backlog(ASR_BACKLOG_S)
            committed, self._commit_s = self._asr.collect()
            assert self._text is not None
            for words, tokens in committed:
                times = np.array([(w.start_s, w.end_s) for w in words], np.float64)
                if tokens is not None and len(tokens.words) == len(words):
                    self._text.add(tokens, times)
                new_words += words
        self._window_cache = {}  # one Whisper pass per window in this call, final and tail
        stop = self._final_rows(final)
        if final and self._hint:
            new_words += self._hint
            self._hint = []
        elif self._hint:
            done = stop / self._rate
            new_words += [w for w in self._hint if w.end_s <= done]
            self._hint = [w for w in self._hint if w.end_s > done]
        self._all_words += new_words
        rows = self._rows(self._next_row, stop, new_words, dropped)
        if not final:
            tail = self._provisional_stop(stop)
            if tail > stop:
                preview = self._rows(stop, tail, [], 0)
                rows = dataclasses.replace(rows, provisional=preview)
        self._window_cache = {}
        self._next_row = max(self._next_row, stop)
        self._forget()
        if final:
            if self._faces is not None:
                self._faces.close()
            self._closed = True
        return rows

    def _clock_s(self) -> float:
        """Stream time: the audio received (the newest frame for a stream without audio)."""
        if self._audio.total or self._taken_frame_s is None:
            return self._audio.end_s
        return self._taken_frame_s

    def _final_rows(self, final: bool) -> int:
        rate = self._rate
        if final:
            end = self._clock_s()
            if not self._audio.total and self._taken_frame_s is not None:
                end += 1.0 / self._settings.frame_rate_hz
            return max(grid_length(end, rate), self._next_row)
        stop = math.floor((self._clock_s() - AUDIO_LOOKAHEAD_S) * rate + 1e-9)
        if self._asr is not None:
            stop = min(stop, math.floor(self._commit_s * rate + 1e-9))
        last = self._taken_frame_s  # frames pushed since are not processed yet
        if self._faces is not None and last is not None and last > self._clock_s() - 2.0:
            # A step may still take a frame within the borrowing reach after its centre.
            reach = 0.5 / self._settings.frame_rate_hz + 0.5 / rate
            stop = min(stop, math.floor((last - reach) * rate - 0.5 + 1e-9) + 1)
        if (
            "audio" in self._modalities
            and self._settings.audio_features == "whisper"
            and self._audio.total
            and stop - self._next_row < round(WHISPER_MIN_STEP_S * rate)
        ):
            return self._next_row  # too few new rows for an encoder pass yet
        return max(stop, self._next_row)

    def _provisional_stop(self, stop: int) -> int:
        """End of the provisional steps after ``stop``: every step that starts in the audio
        received (the newest frame for a stream without audio)."""
        return max(stop, math.floor(self._clock_s() * self._rate + 1e-9))

    def _rows(self, first: int, stop: int, words: list[Word], dropped: int) -> LiveRows:
        steps = stop - first
        features: dict[str, np.ndarray] = {}
        masks: dict[str, np.ndarray] = {}
        for modality in self._modalities:
            dim = self._dims[modality]
            feats, mask = np.zeros((steps, dim), np.float32), np.zeros((steps,), bool)
            if steps > 0:
                if modality == "audio" and self._audio.total:
                    feats, mask = self._audio_rows(first, stop)
                elif modality == "visual" and self._faces is not None:
                    feats, mask = self._faces.rows(
                        first, steps, self._rate, self._settings.frame_rate_hz
                    )
                elif modality == "text" and self._text is not None:
                    duration = max(self._clock_s(), stop / self._rate)
                    feats, mask = self._text.rows(
                        first, steps, duration, self._rate, self._settings.words_per_s
                    )
            features[modality], masks[modality] = feats, mask
        return LiveRows(first, features, masks, list(words), dropped)

    def _audio_rows(self, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Audio features of steps ``[first, stop)``, one window at a time."""
        rate = self._rate
        end_s = self._audio.end_s
        whisper = self._settings.audio_features == "whisper"
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        row = first
        while row < stop:
            if whisper:
                w0 = min(row, math.floor(max(0.0, end_s - WHISPER_WINDOW_S) * rate))
                w1_s = min(end_s, w0 / rate + WHISPER_WINDOW_S)
                upto = min(stop, w0 + math.floor(WHISPER_WINDOW_S * rate))
            else:
                w0 = max(0, row - math.ceil(LIBROSA_CONTEXT_S * rate))
                upto = min(stop, row + math.floor(10.0 * rate))
                w1_s = min(end_s, upto / rate + LIBROSA_CONTEXT_S)
            window = self._audio.seconds(w0 / rate, w1_s)
            length = max(grid_length(len(window) / SR, rate), upto - w0)
            key = (w0, len(window), length)
            cached = self._window_cache.get(key) if whisper else None
            if cached is None:
                cached = self._audio_recipe(window, length)
                if whisper:
                    self._window_cache[key] = cached
            feats, mask = cached
            parts.append((feats[row - w0 : upto - w0], mask[row - w0 : upto - w0]))
            row = upto
        return (
            np.concatenate([p[0] for p in parts]).astype(np.float32),
            np.concatenate([p[1] for p in parts]),
        )

    def _audio_recipe(self, audio: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        s = self._settings
        if s.audio_features == "whisper":
            from preprocessing.speech_states import encode_windows, states_on_grid

            return states_on_grid(
                encode_windows(self._extractor.recognizer.whisper, audio),
                audio,
                length,
                self._rate,
                silence_floor_dbfs=s.silence_floor_dbfs,
                silence_range_db=s.silence_range_db,
            )
        from preprocessing.audio import audio_on_grid

        return audio_on_grid(
            audio,
            length,
            self._rate,
            f0_method=s.f0_method,
            silence_floor_dbfs=s.silence_floor_dbfs,
            silence_range_db=s.silence_range_db,
        )

    def _forget(self) -> None:
        """Drop audio, frames and words nothing will read again."""
        next_s = self._next_row / self._rate
        keep = next_s
        if self._settings.audio_features == "whisper":
            keep = min(keep, max(0.0, self._audio.end_s - WHISPER_WINDOW_S))
        else:
            keep = next_s - LIBROSA_CONTEXT_S
        self._audio.trim(max(0.0, keep - 0.1))
        if self._faces is not None:
            self._faces.forget_before(next_s)
        if self._text is not None:
            self._text.forget_before(next_s)
