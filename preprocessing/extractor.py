"""The extractor: a media file in, a :class:`FeatureBundle` on the ``default-v1`` grid out."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.asr import SpeechRecognizer, Transcription
from preprocessing.bundle import FeatureBundle, MediaSummary
from preprocessing.errors import ExtractionStoppedError, NoUsableStreamError
from preprocessing.grid import grid_length
from preprocessing.media import SUPPORTED_HINT, MediaInfo, decode_media, probe_media
from preprocessing.profiles import MODALITIES, PROFILES, FeatureProfile
from preprocessing.settings import ExtractorSettings
from preprocessing.text import TextEncoder, align_text, uniform_word_times


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - start) * 1000.0


class _AsrJob:
    """One transcription, run inline or on a helper thread; errors surface in ``result``.

    ``states``: also keep the Whisper encoder states of the audio's 30 s windows
    (``Transcription.windows``), from the same encoder pass as the transcription.
    ``transcribe=False``: only encode (a caller's transcript, or no text requested).
    """

    def __init__(
        self,
        recognizer: SpeechRecognizer,
        audio: np.ndarray | None,
        *,
        states: bool = False,
        transcribe: bool = True,
    ) -> None:
        self._recognizer = recognizer
        self._audio = audio
        self._states = states
        self._transcribe = transcribe
        self._result: Transcription | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.elapsed_ms = 0.0

    def run(self) -> None:
        start = time.perf_counter()
        try:
            if self._audio is None or len(self._audio) == 0:
                self._result = Transcription([], [])
            elif not self._transcribe:
                self._result = Transcription([], [], self._recognizer.encode(self._audio))
            elif self._states:
                self._result = self._recognizer.transcribe_with_states(self._audio)
            else:
                self._result = self._recognizer.transcribe(self._audio)
        except BaseException as exc:  # re-raised in the calling thread by result()
            self._error = exc
        finally:
            self.elapsed_ms = (time.perf_counter() - start) * 1000.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="cmamba-asr", daemon=True)
        self._thread.start()

    def result(self) -> Transcription:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class _StreamingFaces:
    """Face features of frames handed in one at a time while decoding (frames are not kept).

    Without ``encoder`` each frame keeps the 17 landmark features; with a face encoder it keeps
    the 48x48 face crop from the same mesh pass (2.3 KB a frame), and :meth:`result` encodes
    the crops in one batch.
    """

    def __init__(self, min_confidence: float, encoder: Any = None) -> None:
        from preprocessing.visual import VISUAL_DIM, FaceMeshRunner

        self._encoder = encoder
        self._dim = VISUAL_DIM
        self._runner = FaceMeshRunner(min_confidence)
        self._values: list[np.ndarray] = []  # each (17,) float32, or a (48, 48) uint8 crop
        self._found: list[bool] = []
        self.elapsed_ms = 0.0

    def add(self, rgb: np.ndarray, time_s: float) -> None:
        start = time.perf_counter()
        seen = self._runner.observe(rgb, crop=self._encoder is not None)
        self._found.append(seen is not None)
        if seen is not None:
            kept = seen.crop if self._encoder is not None else seen.features
            assert kept is not None
            self._values.append(kept)
        self.elapsed_ms += (time.perf_counter() - start) * 1000.0

    def close(self) -> None:
        self._runner.close()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame features (F, D) float32 and face flags (F,) bool, in decoding order
        (D = 17, or FACE_EMBED_DIM with a face encoder)."""
        found = np.asarray(self._found, dtype=bool)
        if self._encoder is not None:
            from preprocessing.face_expression import FACE_EMBED_DIM

            values = np.zeros((len(found), FACE_EMBED_DIM), np.float32)
            if self._values:
                values[found] = self._encoder.encode_crops(np.stack(self._values))
            return values, found
        values = np.zeros((len(found), self._dim), np.float32)
        if self._values:
            values[found] = np.stack(self._values).astype(np.float32)
        return values, found


class Extractor:
    """Turns a clip into text, audio and visual features on one time grid (profile default-v1).

    Only the requested ``modalities`` are extracted; ASR still decodes the audio when text is
    requested without a transcript. Models load on first use or in :meth:`warmup`.

    Thread safety: one instance may be shared by a pool of threads. The ASR model and the text
    encoder are shared (CTranslate2 runs concurrent calls itself; the tokenizer is behind a lock;
    the MiniLM forward pass needs none), model loading is behind locks, and every ``extract``
    call builds its own face-mesh graph and decoder state. With ``settings.overlap_asr`` (the
    default) each call also runs its ASR on a short-lived helper thread while it computes the
    audio and visual features; ``timings_ms`` then holds each stage's own time, and their sum
    exceeds the call's wall time. For a process pool, send the
    extractor (it pickles without its models) or build one per process; each process loads its
    own models.
    """

    def __init__(
        self,
        settings: ExtractorSettings | None = None,
        modalities: Sequence[str] = MODALITIES,
        *,
        text_encoder: TextEncoder | None = None,
        recognizer: SpeechRecognizer | None = None,
    ) -> None:
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities:
            raise ValueError(
                f"modalities must be a non-empty subset of {MODALITIES}, not {modalities}"
            )
        self.settings = settings or ExtractorSettings()
        self.modalities: tuple[str, ...] = tuple(m for m in MODALITIES if m in modalities)
        self._text_encoder = text_encoder
        self._recognizer = recognizer
        self._lock = threading.Lock()  # guards the lazy creation of the two model holders

    # -- models -------------------------------------------------------------------------------

    @property
    def profile(self) -> FeatureProfile:
        """The feature profile this extractor produces."""
        return PROFILES[self.settings.profile_name]

    @property
    def dims(self) -> dict[str, int]:
        """Feature dimension per requested modality."""
        return {m: self.profile.dims[m] for m in self.modalities}

    @property
    def text_encoder(self) -> TextEncoder:
        """The MiniLM text encoder (created on first access, loaded on first use)."""
        with self._lock:
            if self._text_encoder is None:
                self._text_encoder = TextEncoder(
                    self.settings.text_model_dir,
                    torch_threads=self.settings.torch_threads,
                    tuning=self.settings.text_tuning_path,
                    tuning_sha256=self.settings.text_tuning_sha256,
                )
            return self._text_encoder

    @property
    def recognizer(self) -> SpeechRecognizer:
        """The faster-whisper recogniser (created on first access, loaded on first use)."""
        with self._lock:
            if self._recognizer is None:
                self._recognizer = SpeechRecognizer(self.settings)
            return self._recognizer

    @property
    def face_encoder(self) -> Any:
        """The facial-expression CNN (a ``FaceExpressionEncoder``) when
        ``settings.face_encoder_path`` is set, else None (the 17 landmark features)."""
        path = getattr(self.settings, "face_encoder_path", None)
        if path is None:
            return None
        with self._lock:
            encoder = self.__dict__.get("_face_encoder")
            if encoder is None:
                from preprocessing.face_expression import FaceExpressionEncoder

                encoder = FaceExpressionEncoder(
                    path,
                    sha256=getattr(self.settings, "face_encoder_sha256", None),
                    torch_threads=self.settings.torch_threads,
                )
                self.__dict__["_face_encoder"] = encoder
        return encoder.load()

    def warmup(self) -> dict[str, float]:
        """Load every model the requested modalities need and run each stage once on synthetic
        input (numba compiles librosa's pitch tracker, mediapipe loads its graph).

        Returns the milliseconds each part took. Raises :class:`ModelLoadError` when a bundled
        model is missing or differs from the pinned one.
        """
        timings: dict[str, float] = {}
        with _timed(timings, "decode"):
            import av  # noqa: F401  (the import itself takes ~0.2 s)
        if "text" in self.modalities:
            with _timed(timings, "asr"):
                self.recognizer.load()
                tone = np.sin(np.linspace(0, 2000 * np.pi, 16_000)).astype(np.float32) * 0.1
                self.recognizer.transcribe(tone)
            with _timed(timings, "text"):
                self.text_encoder.load()
                align_text(self.text_encoder.encode("warm up"), None, None, self.settings.rate_hz)
        if "audio" in self.modalities:
            with _timed(timings, "audio"):
                if self.settings.audio_features == "whisper":
                    self.recognizer.load()
                    tone = np.sin(np.linspace(0, 2000 * np.pi, 16_000)).astype(np.float32) * 0.1
                    self.recognizer.encode(tone)
                else:
                    from preprocessing.audio import warmup_audio

                    warmup_audio(self.settings.f0_method)
        if "visual" in self.modalities:
            from preprocessing.visual import warmup_visual

            with _timed(timings, "visual"):
                warmup_visual(self.settings.min_face_confidence)
                if self.face_encoder is not None:
                    self.face_encoder.warmup()
        return timings

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_text_encoder"] = None
        state["_recognizer"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- extraction ---------------------------------------------------------------------------

    def text_features(self, transcript: str) -> tuple[np.ndarray, np.ndarray]:
        """Text features of a transcript with no media: its words at the nominal speaking rate
        (as :meth:`extract` places a caller's transcript), on a grid as long as the words.

        Returns ``features`` (L, 384) float32 and ``mask`` (L,) bool (all False without words).
        Raises ValueError when this extractor does not make text features.
        """
        if "text" not in self.modalities:
            raise ValueError(f"this extractor makes {self.modalities} features, not text")
        tokens = self.text_encoder.encode(transcript)
        return align_text(
            tokens, None, None, self.settings.rate_hz, words_per_s=self.settings.words_per_s
        )

    def probe(self, path: Path | str) -> MediaInfo:
        """Recognise the container and check the limits from its header, decoding nothing."""
        return probe_media(path, self.settings)

    def extract(
        self,
        path: Path | str,
        transcript: str | None = None,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> FeatureBundle:
        """Extract the requested modalities of the media file at ``path``.

        ``transcript``: the caller's transcript; when given (and not blank) ASR is skipped and the
        words are placed at the nominal speaking rate. Raises a
        :class:`preprocessing.errors.PreprocessingError` subclass for media it cannot use.

        ``should_stop``: polled while decoding (each packet) and between stages; when it answers
        True the extraction ends with :class:`preprocessing.errors.ExtractionStoppedError`.
        """

        def check_stop() -> None:
            if should_stop is not None and should_stop():
                raise ExtractionStoppedError("The extraction was stopped: nobody waits for it.")

        settings = self.settings
        rate = settings.rate_hz
        transcript = transcript.strip() if transcript and transcript.strip() else None
        want_text = "text" in self.modalities
        need_asr = want_text and transcript is None
        timings: dict[str, float] = {}

        want_visual = "visual" in self.modalities
        streams: list[_StreamingFaces] = []

        def stream_long_clips(info: MediaInfo) -> Callable[[np.ndarray, float], None] | None:
            # Decided from the header read by decode_media: a long clip (or one of unknown
            # length) has its frames through face mesh as they are decoded.
            header_s = info.duration_s
            if header_s is not None and header_s <= settings.stream_frames_after_s:
                return None
            streams.append(_StreamingFaces(settings.min_face_confidence, self.face_encoder))
            return streams[-1].add

        try:
            with _timed(timings, "decode"):
                decoded = decode_media(
                    path,
                    settings,
                    audio="audio" in self.modalities or need_asr,
                    video=want_visual,
                    frame_handler=stream_long_clips,
                    should_stop=should_stop,
                )
        finally:
            for opened in streams:
                opened.close()
        stream = streams[0] if streams else None
        if stream is not None:  # face mesh ran inside the decoding loop: count it as visual
            timings["decode"] -= stream.elapsed_ms
            timings["visual"] = stream.elapsed_ms
        info = decoded.info
        sources = {
            "text": transcript is not None or info.has_audio,
            "audio": info.has_audio,
            "visual": info.has_video,
        }
        if not any(sources[m] for m in self.modalities):
            wanted = " and ".join(self.modalities)
            raise NoUsableStreamError(
                f"The {info.container.name} file has no stream for the requested {wanted} "
                f"features (audio: {info.has_audio}, video: {info.has_video}). " + SUPPORTED_HINT
            )

        duration = decoded.duration_s
        if duration <= 0 and transcript is not None:
            n_words = len(transcript.split())
            duration = float(uniform_word_times(n_words, None, settings.words_per_s)[-1, 1])
        length = grid_length(duration, rate)
        features: dict[str, np.ndarray] = {}
        masks: dict[str, np.ndarray] = {}
        segments: list[tuple[float, float, str]] = []
        text_out: str | None = transcript

        # ASR runs first; with overlap_asr it runs on a helper thread (CTranslate2 releases the
        # GIL) while the audio and visual features are computed here. With Whisper audio
        # features the same thread keeps the encoder states (or only encodes, without ASR).
        check_stop()
        asr_job = None
        states_job = None  # encoder states without ASR (Whisper audio features)
        want_states = "audio" in self.modalities and settings.audio_features == "whisper"
        if need_asr:
            asr_job = _AsrJob(self.recognizer, decoded.audio, states=want_states)
        elif want_states:
            states_job = _AsrJob(self.recognizer, decoded.audio, transcribe=False)
        for job in (asr_job, states_job):
            if job is None:
                continue
            if settings.overlap_asr:
                job.start()
            else:
                job.run()
        frames_with_face = 0
        if "visual" in self.modalities:
            from preprocessing.visual import frame_embeddings, frame_features, visual_on_grid

            with _timed(timings, "visual"):
                face_encoder = self.face_encoder
                if stream is not None:
                    values, found = stream.result()
                elif face_encoder is not None:
                    values, found = frame_embeddings(
                        decoded.frames, face_encoder, settings.min_face_confidence
                    )
                else:
                    values, found = frame_features(decoded.frames, settings.min_face_confidence)
                frames_with_face = int(found.sum())
                features["visual"], masks["visual"] = visual_on_grid(
                    values, found, decoded.frame_times, length, rate, settings.frame_rate_hz
                )
        check_stop()

        if "audio" in self.modalities:
            windows = None
            if want_states:  # waits for the helper thread (not counted as audio time)
                job = asr_job if asr_job is not None else states_job
                assert job is not None
                windows = job.result().windows or []
            with _timed(timings, "audio"):
                if decoded.audio is None or len(decoded.audio) == 0:
                    dim = self.profile.dims["audio"]
                    features["audio"] = np.zeros((length, dim), np.float32)
                    masks["audio"] = np.zeros((length,), bool)
                elif windows is not None:
                    from preprocessing.speech_states import states_on_grid

                    features["audio"], masks["audio"] = states_on_grid(
                        windows,
                        decoded.audio,
                        length,
                        rate,
                        silence_floor_dbfs=settings.silence_floor_dbfs,
                        silence_range_db=settings.silence_range_db,
                    )
                else:
                    from preprocessing.audio import audio_on_grid

                    features["audio"], masks["audio"] = audio_on_grid(
                        decoded.audio,
                        length,
                        rate,
                        f0_method=settings.f0_method,
                        silence_floor_dbfs=settings.silence_floor_dbfs,
                        silence_range_db=settings.silence_range_db,
                    )
            if states_job is not None:  # the encoder ran on the helper thread for the audio
                timings["audio"] += states_job.elapsed_ms

        check_stop()
        if want_text:
            transcription = None
            if asr_job is not None:
                transcription = asr_job.result()
                timings["asr"] = asr_job.elapsed_ms
            features["text"], masks["text"], segments, text_out = self._text(
                transcription, transcript, duration, length, timings
            )

        features = {m: features[m] for m in self.modalities}  # canonical order
        masks = {m: masks[m] for m in self.modalities}
        summary = MediaSummary(
            transcript=text_out,
            transcript_source=(
                None if text_out is None else ("client" if transcript is not None else "asr")
            ),
            audio_seconds=round(decoded.audio_seconds, 3),
            frames=len(decoded.frame_times),
            frames_with_face=frames_with_face,
            duration_s=round(duration, 3),
            container=info.container.name,
            has_audio=info.has_audio,
            has_video=info.has_video,
            present=tuple(m for m in self.modalities if bool(masks[m].any())),
        )
        return FeatureBundle(
            profile=self.profile.name,
            rate_hz=rate,
            length=length,
            features=features,
            masks=masks,
            summary=summary,
            timings_ms={k: round(v, 2) for k, v in timings.items()},
            segments=segments,
        )

    def _text(
        self,
        transcription: Transcription | None,
        transcript: str | None,
        duration: float,
        length: int,
        timings: dict[str, float],
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float, str]], str | None]:
        rate = self.settings.rate_hz
        segments: list[tuple[float, float, str]] = []
        if transcript is None:
            transcription = transcription or Transcription([], [])
            segments = transcription.segments
            with _timed(timings, "text"):
                words = [w.text for w in transcription.words]
                tokens = self.text_encoder.encode_words(words) if words else None
                times = [(w.start_s, w.end_s) for w in transcription.words]
                text_out = transcription.text or None
        else:
            with _timed(timings, "text"):
                tokens = self.text_encoder.encode(transcript)
                times = None
                text_out = transcript
        with _timed(timings, "text"):
            if tokens is None:
                from preprocessing.profiles import TEXT_DIM

                return (
                    np.zeros((length, TEXT_DIM), np.float32),
                    np.zeros((length,), bool),
                    segments,
                    None,
                )
            feats, mask = align_text(
                tokens, times, duration, rate, words_per_s=self.settings.words_per_s
            )
        assert feats.shape[0] == length
        return feats, mask, segments, text_out
