"""The live extractor (preprocessing.live) against the offline extractor on the shared clips,
with the real models: rows in order without gaps, the same grid length, the same visual rows,
audio rows within a measured bound, streaming words close to the offline transcript, frames
(never audio) dropped when ready() is late, and typed errors for bad input."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from preprocessing import Extractor, ExtractorSettings
from preprocessing.errors import LiveInputError, PreprocessingError
from preprocessing.live import FRAME_BACKLOG_S, LiveAsrSettings, LiveExtractor, LiveRows
from preprocessing.media import decode_media
from preprocessing.text import TokenEmbeddings, align_text
from preprocessing.visual import visual_on_grid

SR = 16_000


def play(
    live: LiveExtractor,
    audio: np.ndarray,
    frames: list[np.ndarray] | None = None,
    times: np.ndarray | None = None,
    chunk_s: float = 1.0,
    recogniser_keeps_up: bool = False,
) -> list[LiveRows]:
    """Feed a decoded clip in ``chunk_s`` pieces, frames up to each piece's end, ready() after
    each piece, then finish(). ``recogniser_keeps_up``: after each ready(), wait until the
    stream's recognition thread has passed over the audio handed to it (as it does on a stream
    played at real time when it keeps up), rather than feeding faster than it recognises."""
    out: list[LiveRows] = []
    step = int(chunk_s * SR)
    frames = frames or []
    times = np.zeros(0) if times is None else times
    next_frame = 0
    for start in range(0, len(audio), step):
        live.push_audio(audio[start : start + step])
        now = (start + step) / SR
        while next_frame < len(frames) and times[next_frame] <= now:
            live.push_frame(frames[next_frame], float(times[next_frame]))
            next_frame += 1
        out.append(live.ready())
        if recogniser_keeps_up:
            wait_for(lambda: not live.recognising)
    for i in range(next_frame, len(frames)):
        live.push_frame(frames[i], float(times[i]))
    out.append(live.finish())
    return out


def joined(rows: list[LiveRows], modality: str) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.concatenate([r.features[modality] for r in rows]),
        np.concatenate([r.masks[modality] for r in rows]),
    )


def check_contiguous(rows: list[LiveRows], dims: dict[str, int]) -> int:
    """Rows start where the previous call ended; shapes and dtypes per modality."""
    expected = 0
    for r in rows:
        assert r.start == expected
        n = r.length
        for modality, dim in dims.items():
            assert r.features[modality].shape == (n, dim)
            assert r.features[modality].dtype == np.float32
            assert r.masks[modality].shape == (n,) and r.masks[modality].dtype == bool
        expected += n
    return expected


def word_error_rate(reference: list[str], hypothesis: list[str]) -> float:
    """Levenshtein distance over words, divided by the reference length."""
    ref = [w.lower().strip(".,!?;:") for w in reference]
    hyp = [w.lower().strip(".,!?;:") for w in hypothesis]
    d = np.arange(len(hyp) + 1)
    for i, r in enumerate(ref, 1):
        prev, d[0] = d.copy(), i
        for j, h in enumerate(hyp, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (r != h))
    return float(d[-1]) / max(len(ref), 1)


@pytest.fixture(scope="module")
def decoded(clip: Callable[[str], Path], extractor: Extractor) -> Callable[[str], Any]:
    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = decode_media(clip(name), extractor.settings, audio=True, video=True)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def whisper_extractor(extractor: Extractor) -> Extractor:
    """Text and Whisper-state audio (the multimodal recipe's audio), sharing the loaded
    recogniser and text encoder of the session's extractor."""
    return Extractor(
        ExtractorSettings(audio_features="whisper"),
        modalities=("text", "audio"),
        text_encoder=extractor.text_encoder,
        recognizer=extractor.recognizer,
    )


@pytest.mark.slow
def test_talking_head_rows_match_offline(extractor, bundle_of, decoded) -> None:  # type: ignore[no-untyped-def]
    media = decoded("grid_mp4")
    offline = bundle_of("grid_mp4")
    live = LiveExtractor(extractor, sample_rate=SR)
    rows = play(live, media.audio, media.frames, media.frame_times, chunk_s=0.5)
    total = check_contiguous(rows, extractor.dims)
    assert abs(total - offline.length) <= 1
    n = min(total, offline.length)
    # The same frames through the same face-mesh graph: the same visual rows.
    feats, mask = joined(rows, "visual")
    assert np.array_equal(mask[:n], offline.masks["visual"][:n])
    np.testing.assert_allclose(feats[:n], offline.features["visual"][:n], atol=1e-6)
    assert mask.mean() > 0.9
    # The librosa recipe is local: the rows equal offline up to float rounding.
    feats, mask = joined(rows, "audio")
    assert (mask[:n] == offline.masks["audio"][:n]).mean() >= 0.95
    both = mask[:n] & offline.masks["audio"][:n]
    np.testing.assert_allclose(feats[:n][both], offline.features["audio"][:n][both], atol=1e-3)
    # Text rows exist where words were recognised.
    words = [w.text for r in rows for w in r.words]
    assert words == [w.text for w in live.words]
    assert word_error_rate((offline.summary.transcript or "").split(), words) <= 0.5
    assert joined(rows, "text")[1].any()
    assert live.stream_seconds == pytest.approx(len(media.audio) / SR)


@pytest.mark.slow
def test_speech_states_and_streaming_words_on_a_speech(whisper_extractor, clip, decoded) -> None:  # type: ignore[no-untyped-def]
    offline = whisper_extractor.extract(clip("jfk"))
    audio = decoded("jfk").audio
    live = LiveExtractor(whisper_extractor, sample_rate=SR)
    rows = play(live, audio, chunk_s=1.0, recogniser_keeps_up=True)
    total = check_contiguous(rows, whisper_extractor.dims)
    assert abs(total - offline.length) <= 1
    assert sum(r.length for r in rows[:-1]) > total // 2  # most rows came before the end
    n = min(total, offline.length)
    # Encoder states on a growing window without the audio after it: close, not equal.
    # Measured on this clip: cosine to the offline row min 0.92, median 0.997.
    feats, mask = joined(rows, "audio")
    assert (mask[:n] == offline.masks["audio"][:n]).mean() >= 0.95
    both = mask[:n] & offline.masks["audio"][:n]
    x, y = feats[:n][both], offline.features["audio"][:n][both]
    cosine = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert np.median(cosine) >= 0.98 and cosine.min() >= 0.85
    # Words: in time order, each reported once, close to the offline transcript (measured
    # WER 0.14 with the default settings).
    words = [w for r in rows for w in r.words]
    assert [w.text for w in words] == [w.text for w in live.words]
    assert all(a.start_s <= b.start_s + 1e-6 for a, b in itertools.pairwise(words))
    offline_words = (offline.summary.transcript or "").split()
    assert len(offline_words) >= 15
    assert word_error_rate(offline_words, [w.text for w in words]) <= 0.35
    text_mask = joined(rows, "text")[1]
    assert (text_mask[:n] == offline.masks["text"][:n]).mean() >= 0.7


def test_frames_dropped_never_audio_when_ready_is_late(extractor, decoded) -> None:  # type: ignore[no-untyped-def]
    media = decoded("grid_mp4")
    ex = Extractor(extractor.settings, modalities=("audio", "visual"))
    live = LiveExtractor(ex, sample_rate=SR)
    live.push_audio(media.audio)
    for frame, t in zip(media.frames, media.frame_times, strict=True):
        live.push_frame(frame, float(t))
    late = live.ready()  # every frame queued at once: more than the backlog
    backlog = int(np.ceil(FRAME_BACKLOG_S * ex.settings.frame_rate_hz))
    assert len(media.frames) > backlog
    assert late.dropped_frames == len(media.frames) - backlog
    rest = live.finish()
    assert rest.dropped_frames == 0
    rows = [late, rest]
    check_contiguous(rows, ex.dims)
    audio_mask = joined(rows, "audio")[1]
    # Every audio row is there: audio is never dropped.
    assert len(audio_mask) >= int(len(media.audio) / SR * 10)
    assert audio_mask.mean() > 0.6
    # The first frames were dropped: no face before the first kept frame.
    first_kept = float(media.frame_times[len(media.frames) - backlog])
    visual_mask = joined(rows, "visual")[1]
    assert not visual_mask[: int(first_kept * 10) - 2].any()  # a step borrows 0.15 s away
    assert visual_mask[int(first_kept * 10) + 1 :].mean() > 0.9


def test_bad_input_raises_typed_errors_and_keeps_the_stream(extractor, decoded) -> None:  # type: ignore[no-untyped-def]
    ex = Extractor(extractor.settings, modalities=("audio", "visual"))
    live = LiveExtractor(ex, sample_rate=SR)
    good = decoded("grid_mp4").audio[:SR]
    frame = np.zeros((48, 64, 3), np.uint8)
    bad_audio: list[Any] = [
        np.array([0.0, np.nan], np.float32),
        np.array([np.inf], np.float32),
        np.zeros((10, 2), np.float32),
        np.zeros(10, np.int16),
        np.zeros(10, np.float64),
        [0.0, 0.1],
        b"\x00\x01",
    ]
    for value in bad_audio:
        with pytest.raises(LiveInputError) as err:
            live.push_audio(value)
        assert isinstance(err.value, PreprocessingError) and err.value.message
    live.push_audio(good)
    live.push_frame(frame, 0.5)
    bad_frames: list[tuple[Any, Any]] = [
        (np.zeros((48, 64), np.uint8), 0.6),
        (np.zeros((48, 64, 4), np.uint8), 0.6),
        (np.zeros((48, 64, 3), np.float32), 0.6),
        (np.zeros((0, 64, 3), np.uint8), 0.6),
        ("frame", 0.6),
        (frame, float("nan")),
        (frame, -1.0),
        (frame, "soon"),
        (frame, 0.2),  # before the previous frame
        (frame, 1e9),  # far ahead of the stream
    ]
    for value, t in bad_frames:
        with pytest.raises(LiveInputError):
            live.push_frame(value, t)
    with pytest.raises(LiveInputError):
        LiveExtractor(ex, sample_rate=0)
    # The stream is intact: the good input gives its rows.
    rows = [live.ready(), live.finish()]
    assert check_contiguous(rows, ex.dims) == 10
    assert joined(rows, "audio")[1].any()
    with pytest.raises(LiveInputError):
        live.push_audio(good)
    assert live.ready().length == 0


def test_resampled_audio_gives_the_same_grid(extractor, decoded) -> None:  # type: ignore[no-untyped-def]
    import av

    audio = decoded("grid_mp4").audio
    resampler = av.AudioResampler(format="flt", layout="mono", rate=48_000)
    frame = av.AudioFrame.from_ndarray(audio[None, :], format="flt", layout="mono")
    frame.sample_rate = SR
    upsampled = np.concatenate(
        [
            f.to_ndarray().reshape(-1)
            for f in [*resampler.resample(frame), *resampler.resample(None)]
        ]
    ).astype(np.float32)
    ex = Extractor(extractor.settings, modalities=("audio",))
    direct = play(LiveExtractor(ex, sample_rate=SR), audio)
    live = LiveExtractor(ex, sample_rate=48_000)
    rows = play(live, upsampled, chunk_s=1.0 / 3)  # 16 000 samples a piece at 48 kHz
    assert abs(check_contiguous(rows, ex.dims) - check_contiguous(direct, ex.dims)) <= 1
    a, b = joined(rows, "audio")[1], joined(direct, "audio")[1]
    n = min(len(a), len(b))
    assert (a[:n] == b[:n]).mean() >= 0.9


def test_transcript_hint_places_words_as_offline(extractor, clip, decoded) -> None:  # type: ignore[no-untyped-def]
    ex = Extractor(extractor.settings, modalities=("text",), text_encoder=extractor.text_encoder)
    hint = "bin blue at f two now"
    offline = ex.extract(clip("grid_mp4"), transcript=hint)
    live = LiveExtractor(ex, sample_rate=SR, transcript_hint=hint)
    rows = play(live, decoded("grid_mp4").audio, chunk_s=0.5)
    total = check_contiguous(rows, ex.dims)
    assert abs(total - offline.length) <= 1
    n = min(total, offline.length)
    feats, mask = joined(rows, "text")
    assert np.array_equal(mask[:n], offline.masks["text"][:n])
    np.testing.assert_allclose(feats[:n], offline.features["text"][:n], atol=1e-6)
    assert [w.text for w in live.words] == hint.split()


def test_chunked_grid_helpers_equal_the_whole_grid() -> None:
    rng = np.random.default_rng(1)
    tokens = TokenEmbeddings(
        rng.standard_normal((9, 384)).astype(np.float32),
        np.array([0, 0, 1, 2, 2, 2, 3, 4, 4]),
        ("a", "b", "c", "d", "e"),
    )
    times = np.array([[0.05, 0.43], [0.43, 0.61], [0.9, 1.37], [1.37, 1.4], [2.01, 2.66]])
    whole, whole_mask = align_text(tokens, times, 3.0, 10.0)
    for first, steps in ((0, 7), (7, 9), (16, 14), (29, 5)):
        part, part_mask = align_text(tokens, times, 3.0, 10.0, first_step=first, steps=steps)
        stop = min(first + steps, len(whole))
        np.testing.assert_allclose(part, whole[first:stop], atol=1e-6)
        assert np.array_equal(part_mask, whole_mask[first:stop])
    frame_times = np.arange(0, 3.0, 0.2) + 0.013
    values = rng.standard_normal((len(frame_times), 17)).astype(np.float32)
    found = rng.random(len(frame_times)) > 0.2
    values[:, 0] = found
    vis, vis_mask = visual_on_grid(values, found, frame_times, 30, 10.0, 5.0)
    for first in (0, 6, 13, 25):
        part, part_mask = visual_on_grid(values, found, frame_times, 5, 10.0, 5.0, first_step=first)
        np.testing.assert_allclose(part, vis[first : first + 5], atol=1e-6)
        assert np.array_equal(part_mask, vis_mask[first : first + 5])


def test_large_frames_are_scaled_as_the_decoder_scales_them(extractor, clip) -> None:  # type: ignore[no-untyped-def]
    import av

    with av.open(str(clip("jfk").parent / "obama.jpg")) as image:
        portrait = next(image.decode(video=0)).to_ndarray(format="rgb24")  # 910x1137, a face
    assert max(portrait.shape[:2]) > extractor.settings.frame_max_side
    ex = Extractor(extractor.settings, modalities=("visual",))
    live = LiveExtractor(ex, sample_rate=SR)
    for i in range(10):
        live.push_frame(portrait, i * 0.2)
    rows = [live.ready(), live.finish()]
    assert check_contiguous(rows, ex.dims) == 20
    assert joined(rows, "visual")[1].all()


@pytest.mark.slow
def test_memory_stays_flat_over_a_long_stream(extractor) -> None:  # type: ignore[no-untyped-def]
    """45 s of a voiced tone in 1 s pieces: what the stream holds after 45 s is no more than
    after 15 s (audio, frames and words are dropped once used). Every window the stream keeps
    is a few seconds long (``LIBROSA_CONTEXT_S``, ``FRAME_BACKLOG_S``, ``_KEEP_S``), so 15 s is
    past them all; a leak of the 30 s between would hold 1.9 MB of audio or 1.1 MB of frames,
    far above the allowance (tracing every allocation makes each second cost three)."""
    import tracemalloc

    ex = Extractor(extractor.settings, modalities=("audio", "visual"))
    live = LiveExtractor(ex, sample_rate=SR)
    t = np.arange(SR) / SR
    second = (0.2 * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    frame = np.full((96, 128, 3), 90, np.uint8)
    held: list[int] = []
    rows = 0
    tracemalloc.start()
    try:
        for i in range(45):
            live.push_audio(second)
            live.push_frame(frame, float(i))
            rows += live.ready().length
            if i in (14, 44):
                held.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert rows >= 435  # the rows kept coming (up to the newest frame)
    assert held[1] <= held[0] + 256 * 1024, held


def test_pushing_from_another_thread_while_ready_runs(extractor, decoded) -> None:  # type: ignore[no-untyped-def]
    import threading

    media = decoded("grid_mp4")
    ex = Extractor(extractor.settings, modalities=("audio", "visual"))
    live = LiveExtractor(ex, sample_rate=SR)
    done = threading.Event()
    failures: list[BaseException] = []

    def push() -> None:
        try:
            step = SR // 10
            f = 0
            for start in range(0, len(media.audio), step):
                live.push_audio(media.audio[start : start + step])
                while f < len(media.frames) and media.frame_times[f] <= (start + step) / SR:
                    live.push_frame(media.frames[f], float(media.frame_times[f]))
                    f += 1
        except BaseException as exc:  # reported below
            failures.append(exc)
        finally:
            done.set()

    pusher = threading.Thread(target=push)
    pusher.start()
    rows = []
    while not done.is_set():
        rows.append(live.ready())
    pusher.join()
    rows.append(live.finish())
    assert not failures
    total = check_contiguous(rows, ex.dims)
    assert total == int(np.ceil(len(media.audio) / SR * 10 - 1e-6))
    dropped = sum(r.dropped_frames for r in rows)
    assert joined(rows, "visual")[1].sum() > 0 and dropped < len(media.frames)


def test_a_stream_without_video_is_not_held_back_by_it(extractor, decoded) -> None:  # type: ignore[no-untyped-def]
    ex = Extractor(extractor.settings, modalities=("audio", "visual"))
    live = LiveExtractor(ex, sample_rate=SR)
    rows = play(live, decoded("grid_mp4").audio, chunk_s=1.0)
    check_contiguous(rows, ex.dims)
    assert sum(r.length for r in rows[:-1]) >= 20  # rows before the end, 0.5 s behind the audio
    assert not joined(rows, "visual")[1].any()  # no video: absent, never invented
    assert joined(rows, "audio")[1].any()


def test_whisper_rows_come_a_second_at_a_time(whisper_extractor, decoded) -> None:  # type: ignore[no-untyped-def]
    """One encoder pass costs the same for any new audio: frequent ready() calls release the
    Whisper-state rows a second (10 steps) at a time, not a pass per call."""
    settings, recognizer = whisper_extractor.settings, whisper_extractor.recognizer
    ex = Extractor(settings, modalities=("audio",), recognizer=recognizer)
    live = LiveExtractor(ex, sample_rate=SR)
    rows = play(live, decoded("jfk").audio, chunk_s=0.2)
    check_contiguous(rows, ex.dims)
    sizes = [r.length for r in rows[:-1] if r.length]
    assert len(sizes) >= 5 and min(sizes) >= 10, sizes


def test_provisional_rows_reach_the_audio_received_in_the_same_pass(  # type: ignore[no-untyped-def]
    whisper_extractor, decoded, monkeypatch
) -> None:
    """ready() previews the steps after the final ones up to the audio received, from the
    encoder pass the final steps use (at most one pass per call), close to what those steps
    become once final; finish() previews nothing."""
    import preprocessing.speech_states as speech_states

    settings, recognizer = whisper_extractor.settings, whisper_extractor.recognizer
    ex = Extractor(settings, modalities=("audio",), recognizer=recognizer)
    passes = [0]
    encode = speech_states.encode_windows

    def counted(*args: Any, **kwargs: Any) -> Any:
        passes[0] += 1
        return encode(*args, **kwargs)

    monkeypatch.setattr(speech_states, "encode_windows", counted)
    live = LiveExtractor(ex, sample_rate=SR)
    audio = decoded("jfk").audio
    step = int(0.5 * SR)
    rows: list[LiveRows] = []
    previews: list[LiveRows] = []
    for start in range(0, len(audio), step):
        live.push_audio(audio[start : start + step])
        before = passes[0]
        r = live.ready()
        assert passes[0] - before <= 1  # the preview costs no second pass
        rows.append(r)
        preview = r.provisional
        assert preview is not None
        assert preview.start == r.start + r.length
        assert preview.start + preview.length == int(min(start + step, len(audio)) / SR * 10)
        assert preview.features["audio"].shape == (preview.length, ex.dims["audio"])
        previews.append(preview)
    last = live.finish()
    assert last.provisional is None
    rows.append(last)
    total = check_contiguous(rows, ex.dims)
    feats, mask = joined(rows, "audio")
    # A previewed step against the same step once final (more right context then).
    x, y, both = [], [], []
    for p in previews:
        idx = np.arange(p.start, p.start + p.length)
        idx = idx[idx < total]
        x.append(p.features["audio"][: len(idx)])
        y.append(feats[idx])
        both.append(p.masks["audio"][: len(idx)] & mask[idx])
    xs, ys, ok = np.concatenate(x), np.concatenate(y), np.concatenate(both)
    xs, ys = xs[ok], ys[ok]
    cosine = (xs * ys).sum(1) / np.linalg.norm(xs, axis=1) / np.linalg.norm(ys, axis=1)
    assert len(xs) >= 50
    assert np.median(cosine) >= 0.9, np.median(cosine)


class HeldRecognizer:
    """The real recogniser, its passes held until ``release`` is set (to catch one under way);
    ``active``: passes under way now."""

    def __init__(self, real: Any) -> None:
        import threading

        self._real = real
        self.started = threading.Event()
        self.release = threading.Event()
        self.active = 0

    def transcribe(self, audio: np.ndarray) -> Any:
        self.active += 1
        self.started.set()
        try:
            assert self.release.wait(300), "a recognition pass was never released"
            return self._real.transcribe(audio)
        finally:
            self.active -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def recognition_threads() -> set[Any]:
    import threading

    return {t for t in threading.enumerate() if t.name.startswith("cmamba-live-asr")}


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def held(extractor: Extractor) -> Iterator[tuple[Extractor, HeldRecognizer]]:
    recognizer = HeldRecognizer(extractor.recognizer)
    ex = Extractor(
        extractor.settings,
        modalities=("text", "audio"),
        text_encoder=extractor.text_encoder,
        recognizer=recognizer,  # type: ignore[arg-type]
    )
    yield ex, recognizer
    recognizer.release.set()


@pytest.mark.slow
def test_ready_does_not_wait_for_a_recognition_under_way(held, decoded) -> None:  # type: ignore[no-untyped-def]
    """Recognition runs on the stream's own thread: ready() returns while a pass is held,
    with the audio rows previewed and the text masked there (no words committed yet); the
    words come once the pass is done, and finish() leaves no recognition thread behind."""
    ex, recognizer = held
    audio = decoded("jfk").audio
    before = recognition_threads()
    live = LiveExtractor(ex, sample_rate=SR, asr=LiveAsrSettings(vad=False))
    live.push_audio(audio[: 3 * SR])
    rows = [live.ready()]
    wait_for(recognizer.started.is_set)
    live.push_audio(audio[3 * SR : 6 * SR])
    rows.append(live.ready())
    # ready() came back while the pass it would have waited for is still held.
    assert recognizer.active == 1 and not recognizer.release.is_set()
    preview = rows[-1].provisional
    assert preview is not None and preview.start + preview.length == 60
    assert preview.masks["audio"].any() and not preview.masks["text"].any()
    assert sum(r.length for r in rows) == 0  # text of no step is final yet
    ours = recognition_threads() - before
    assert len(ours) == 1 and all(t.is_alive() for t in ours)
    recognizer.release.set()
    wait_for(lambda: recognizer.active == 0)
    live.push_audio(audio[6 * SR :])
    rows.append(live.ready())
    rows.append(live.finish())
    total = check_contiguous(rows, ex.dims)
    assert total == int(np.ceil(len(audio) / SR * 10 - 1e-6))
    assert len(live.words) >= 15
    assert joined(rows, "text")[1].any()
    assert not any(t.is_alive() for t in ours)  # finish() ended the recogniser


def test_close_stops_the_recogniser_and_leaves_no_thread(held, decoded) -> None:  # type: ignore[no-untyped-def]
    """A stream closed without finish() (the client went away) during a recognition pass:
    close() waits for that pass and ends the thread; the stream takes no more input."""
    import threading

    ex, recognizer = held
    audio = decoded("jfk").audio
    before = recognition_threads()
    live = LiveExtractor(ex, sample_rate=SR, asr=LiveAsrSettings(vad=False))
    live.push_audio(audio[: 3 * SR])
    live.ready()
    wait_for(recognizer.started.is_set)
    ours = recognition_threads() - before
    assert len(ours) == 1
    closer = threading.Thread(target=live.close)
    closer.start()
    recognizer.release.set()
    closer.join(60)
    assert not closer.is_alive()
    assert not any(t.is_alive() for t in ours)
    with pytest.raises(LiveInputError):
        live.push_audio(audio[3 * SR : 4 * SR])
    live.close()  # again: harmless


def test_ready_waits_for_the_recogniser_beyond_the_backlog_bound(held, decoded) -> None:  # type: ignore[no-untyped-def]
    """Memory stays bounded when recognition is slower than the stream: with more than
    ASR_BACKLOG_S of audio handed to a held recogniser, ready() waits for it (no audio is
    dropped); released, it returns and the stream goes on."""
    import threading

    from preprocessing.live import ASR_BACKLOG_S

    ex, recognizer = held
    audio = np.tile(decoded("jfk").audio, 2)
    live = LiveExtractor(ex, sample_rate=SR, asr=LiveAsrSettings(vad=False))
    live.push_audio(audio[: 2 * SR])
    rows = [live.ready()]
    wait_for(recognizer.started.is_set)
    over = 2 * SR + int((ASR_BACKLOG_S + 2) * SR)
    live.push_audio(audio[2 * SR : over])
    waiter = threading.Thread(target=lambda: rows.append(live.ready()))
    waiter.start()
    waiter.join(3.0)
    assert waiter.is_alive()  # waiting for the held pass, not dropping audio
    recognizer.release.set()
    waiter.join(120)
    assert not waiter.is_alive()
    live.push_audio(audio[over:])
    rows.append(live.finish())
    assert check_contiguous(rows, ex.dims) == int(np.ceil(len(audio) / SR * 10 - 1e-6))
