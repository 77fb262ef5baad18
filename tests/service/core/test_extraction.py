"""The extraction pool on its own: a real ``ExtractionPool`` and its threads, with small
extractors in place of ``preprocessing.Extractor`` (no HTTP, no media models)."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from service.core.extraction import ExtractionPool, release_frames
from service.errors import DeadlineExceededError

WAIT_S = 10.0


class PlainExtractor:
    """Answers at once with a bundle naming the file; records the calls and their threads.
    Its ``extract`` has no ``should_stop`` keyword."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.calls: list[tuple[Path, str | None]] = []
        self.threads: set[str] = set()
        self.warmed_on: str | None = None
        self.fail_with = fail_with

    def warmup(self) -> None:
        self.warmed_on = threading.current_thread().name

    def extract(self, path: Path, transcript: str | None = None) -> Any:
        self.calls.append((path, transcript))
        self.threads.add(threading.current_thread().name)
        if self.fail_with is not None:
            raise self.fail_with
        return SimpleNamespace(path=path, exists=path.exists(), transcript=transcript)


class Stopped(Exception):
    pass


class StoppableExtractor:
    """Works until ``should_stop()`` says so (as ``preprocessing.Extractor`` does between
    stages), then raises ``Stopped``. ``running`` is set once a call is under way."""

    def __init__(self) -> None:
        self.running = threading.Event()
        self.polls = 0

    def warmup(self) -> None:
        pass

    def extract(
        self, path: Path, transcript: str | None = None, should_stop: Callable[[], bool] = bool
    ) -> Any:
        self.running.set()
        give_up = time.monotonic() + WAIT_S
        while time.monotonic() < give_up:
            self.polls += 1
            if should_stop():
                raise Stopped
            time.sleep(0.005)
        return SimpleNamespace(path=path)


class BlockingExtractor(PlainExtractor):
    """Holds each call until ``release`` is set; ``entered`` counts the calls under way."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0

    def extract(self, path: Path, transcript: str | None = None) -> Any:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            assert self.release.wait(WAIT_S), "never released"
            return super().extract(path, transcript)
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def make_pool() -> Iterator[Callable[..., ExtractionPool]]:
    pools: list[ExtractionPool] = []

    def make(extractor: Any, workers: int = 1) -> ExtractionPool:
        pool = ExtractionPool(extractor, workers)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown()


@pytest.fixture
def upload(tmp_path: Path) -> Callable[[str], Path]:
    def write(name: str = "clip.wav") -> Path:
        path = tmp_path / name
        path.write_bytes(b"RIFF....")
        return path

    return write


def far() -> float:
    return time.monotonic() + 3600.0


def test_a_pool_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        ExtractionPool(PlainExtractor(), 0)


def test_a_job_extracts_on_a_pool_thread(make_pool, upload) -> None:
    extractor = PlainExtractor()
    pool = make_pool(extractor)
    path = upload()
    done = pool.submit(path, "hello there", deadline=far(), remove_after=False).result(WAIT_S)
    assert done.bundle.path == path and done.bundle.transcript == "hello there"
    assert done.wait_ms >= 0.0
    assert extractor.calls == [(path, "hello there")]
    assert all(name.startswith("cmamba-extract") for name in extractor.threads)
    assert path.exists()  # not the job's to remove


def test_warmup_runs_on_a_pool_thread(make_pool) -> None:
    extractor = PlainExtractor()
    make_pool(extractor).warmup()
    assert extractor.warmed_on is not None and extractor.warmed_on.startswith("cmamba-extract")


def test_the_job_removes_its_file_after_extracting(make_pool, upload) -> None:
    pool = make_pool(PlainExtractor())
    path = upload()
    done = pool.submit(path, None, deadline=far(), remove_after=True).result(WAIT_S)
    assert done.bundle.exists  # the file was there while extracting
    assert not path.exists()


def test_the_job_removes_its_file_when_extraction_fails(make_pool, upload) -> None:
    pool = make_pool(PlainExtractor(fail_with=OSError("bad media")))
    path = upload()
    job = pool.submit(path, None, deadline=far(), remove_after=True)
    with pytest.raises(OSError, match="bad media"):
        job.result(WAIT_S)
    assert not path.exists()


def test_a_job_past_its_deadline_skips_the_work_and_still_removes_its_file(
    make_pool, upload
) -> None:
    extractor = PlainExtractor()
    pool = make_pool(extractor)
    path = upload()
    job = pool.submit(path, None, deadline=time.monotonic() - 1.0, remove_after=True)
    with pytest.raises(DeadlineExceededError):
        job.result(WAIT_S)
    assert extractor.calls == []
    assert not path.exists()


def test_a_queued_job_whose_deadline_passes_while_it_waits_is_skipped(make_pool, upload) -> None:
    extractor = BlockingExtractor()
    pool = make_pool(extractor, workers=1)
    first = pool.submit(upload("a.wav"), None, deadline=far(), remove_after=False)
    queued_path = upload("b.wav")
    queued = pool.submit(queued_path, None, deadline=time.monotonic() + 0.05, remove_after=True)
    time.sleep(0.1)
    extractor.release.set()
    first.result(WAIT_S)
    with pytest.raises(DeadlineExceededError):
        queued.result(WAIT_S)
    assert [p.name for p, _ in extractor.calls] == ["a.wav"]
    assert not queued_path.exists()


def test_wait_ms_counts_the_wait_for_a_free_thread(make_pool, upload) -> None:
    extractor = BlockingExtractor()
    pool = make_pool(extractor, workers=1)
    first = pool.submit(upload("a.wav"), None, deadline=far(), remove_after=False)
    second = pool.submit(upload("b.wav"), None, deadline=far(), remove_after=False)
    time.sleep(0.2)
    extractor.release.set()
    assert first.result(WAIT_S).wait_ms < 200.0
    assert second.result(WAIT_S).wait_ms >= 200.0 * 0.95


def test_workers_extract_at_the_same_time(make_pool, upload) -> None:
    extractor = BlockingExtractor()
    pool = make_pool(extractor, workers=3)
    jobs = [
        pool.submit(upload(f"{i}.wav"), None, deadline=far(), remove_after=False) for i in range(3)
    ]
    give_up = time.monotonic() + WAIT_S
    while extractor.running < 3 and time.monotonic() < give_up:
        time.sleep(0.01)
    extractor.release.set()
    for job in jobs:
        job.result(WAIT_S)
    assert extractor.most_at_once == 3


def test_a_stoppable_extractor_stops_when_asked(make_pool, upload) -> None:
    extractor = StoppableExtractor()
    pool = make_pool(extractor)
    stop = threading.Event()
    job = pool.submit(upload(), None, deadline=far(), remove_after=False, stop=stop)
    assert extractor.running.wait(WAIT_S)
    assert not job.done()  # it keeps working while nobody asks it to stop
    stop.set()
    with pytest.raises(Stopped):
        job.result(WAIT_S)


def test_a_stoppable_extractor_stops_at_the_deadline(make_pool, upload) -> None:
    extractor = StoppableExtractor()
    pool = make_pool(extractor)
    started = time.monotonic()
    job = pool.submit(upload(), None, deadline=started + 0.2, remove_after=True)
    with pytest.raises(Stopped):
        job.result(WAIT_S)
    assert time.monotonic() - started >= 0.2
    assert extractor.polls > 1  # it started before the deadline and ran until it passed


def test_shutdown_finishes_the_queued_jobs(upload) -> None:
    extractor = PlainExtractor()
    pool = ExtractionPool(extractor, workers=1)
    jobs = [
        pool.submit(upload(f"{i}.wav"), None, deadline=far(), remove_after=True) for i in range(4)
    ]
    pool.shutdown()
    assert all(job.done() for job in jobs)
    assert len(extractor.calls) == 4


# -- release_frames --------------------------------------------------------------------------------


class Decoder:
    """Something heavy a failing frame holds on to."""


def _fail_holding(decoder: Decoder) -> None:
    held = decoder  # noqa: F841 - a local of the frame that fails
    raise ValueError("decode failed")


def _fail_with_cause(decoder: Decoder) -> None:
    try:
        _fail_holding(decoder)
    except ValueError as exc:
        raise RuntimeError("extraction failed") from exc


@pytest.mark.parametrize("fail", [_fail_holding, _fail_with_cause], ids=["direct", "chained"])
def test_release_frames_frees_what_the_failed_frames_held(fail: Callable[[Decoder], None]) -> None:
    gc.disable()  # only reference counting may free the decoder here
    try:
        decoder = Decoder()
        alive = weakref.ref(decoder)
        try:
            fail(decoder)
        except Exception as exc:
            caught = exc
        del decoder
        assert alive() is not None  # the traceback's frames keep it
        release_frames(caught)
        assert alive() is None
        assert isinstance(caught, ValueError | RuntimeError)  # the exception itself is kept
    finally:
        gc.enable()


def test_a_background_pool_runs_at_a_lower_priority() -> None:
    """Job parts are extracted on threads whose nice value is raised (Linux: per thread), and
    the threads they start (speech recognition's helper) inherit it; the caller's is left."""
    import os
    import threading

    from service.core.extraction import ExtractionPool

    class Probe:
        def warmup(self) -> None:
            pass

        def extract(self, path: object, transcript: object = None) -> object:
            return None

    def nice_of_this_thread() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def nice_of_a_child() -> int:
        seen: list[int] = []
        child = threading.Thread(target=lambda: seen.append(nice_of_this_thread()))
        child.start()
        child.join()
        return seen[0]

    own = nice_of_this_thread()
    background = ExtractionPool(Probe(), 1, niceness=5)
    online = ExtractionPool(Probe(), 1)
    try:
        expected = min(19, own + 5)
        assert background._executor.submit(nice_of_this_thread).result(10) == expected
        assert background._executor.submit(nice_of_a_child).result(10) == expected
        assert online._executor.submit(nice_of_this_thread).result(10) == own
        assert nice_of_this_thread() == own
    finally:
        background.shutdown()
        online.shutdown()
