"""The micro-batcher on its own: a real ``MicroBatcher`` and its worker thread, with a small
recording model in place of the model runner (no HTTP, no torch).

Waits are bounded by futures' timeouts; the only sleeps are the short ones that let a deadline
pass or that check something has not happened yet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import pytest

from service.core.batcher import MicroBatcher
from service.core.types import ClipFeatures, ClipOutcome, ClipResult, MemorySnapshot
from service.errors import DeadlineExceededError, OverCapacityError

WAIT_S = 10.0  # longest wait for something that should happen (a loaded CI machine)
LONG_DELAY_S = 60.0  # a batch delay no test may wait out


def clip(length: int) -> ClipFeatures:
    """A clip whose only feature is its length (the fake model echoes it back)."""
    return ClipFeatures(
        features={"text": np.full((length, 1), float(length), np.float32)},
        masks={"text": np.ones(length, bool)},
        length=length,
    )


class RecordingModel:
    """Stands in for the model runner: records each call and answers each clip with its length
    as the score. ``hold`` (when set) makes a call wait until it is released."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], int]] = []  # (clip lengths, padded length)
        self.threads: set[str] = set()
        self.fail_with: Exception | None = None
        self.answer_count: Callable[[int], int] = lambda n: n

    def __call__(self, clips: Sequence[ClipFeatures], padded_length: int) -> list[ClipOutcome]:
        self.calls.append(([c.length for c in clips], padded_length))
        self.threads.add(threading.current_thread().name)
        if self.fail_with is not None:
            raise self.fail_with
        return [
            ClipOutcome(
                result=ClipResult(score=float(c.length), probabilities=(1.0, 0.0, 0.0)),
                error=None,
                model_ms=1.0,
                batch_size=len(clips),
                padded_length=padded_length,
                memory=MemorySnapshot(device="cpu"),
            )
            for c in clips[: self.answer_count(len(clips))]
        ]


class Gate:
    """Keeps the worker thread busy (a task handed in with ``call``) until opened, so that
    clips pile up in the queue meanwhile."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self._open = threading.Event()
        entered = threading.Event()

        def hold() -> None:
            entered.set()
            assert self._open.wait(WAIT_S), "the gate was never opened"

        self.done = batcher.call(hold)
        assert entered.wait(WAIT_S), "the worker did not pick up the gate task"

    def open(self) -> None:
        self._open.set()
        self.done.result(WAIT_S)


@pytest.fixture
def model() -> RecordingModel:
    return RecordingModel()


@pytest.fixture
def make_batcher(model: RecordingModel) -> Iterator[Callable[..., MicroBatcher]]:
    """``make_batcher(**options)``: a started batcher on ``model``, stopped after the test."""
    started: list[MicroBatcher] = []

    def make(**options: object) -> MicroBatcher:
        values: dict[str, object] = {
            "max_batch_size": 4,
            "max_batch_delay_s": LONG_DELAY_S,
            "max_queue_size": 16,
        }
        values.update(options)
        batcher = MicroBatcher(model, **values)  # type: ignore[arg-type]
        batcher.start()
        started.append(batcher)
        return batcher

    yield make
    for batcher in started:
        batcher.stop(timeout=WAIT_S)


def far() -> float:
    """A deadline no test reaches."""
    return time.monotonic() + 3600.0


def results(futures: Sequence[Future[ClipOutcome]]) -> list[ClipOutcome]:
    return [f.result(WAIT_S) for f in futures]


# -- when a batch is flushed -----------------------------------------------------------------------


def test_a_full_batch_runs_without_waiting_out_the_delay(make_batcher, model) -> None:
    batcher = make_batcher(max_batch_size=3, max_batch_delay_s=LONG_DELAY_S)
    outcomes = results([batcher.submit(clip(n), far()) for n in (5, 6, 7)])
    assert model.calls == [([5, 6, 7], 7)]
    assert [o.batch_size for o in outcomes] == [3, 3, 3]
    assert [o.result.score for o in outcomes if o.result] == [5.0, 6.0, 7.0]


def test_a_batch_takes_at_most_max_batch_size_clips(make_batcher, model) -> None:
    batcher = make_batcher(max_batch_size=2, max_batch_delay_s=0.0)
    gate = Gate(batcher)
    futures = [batcher.submit(clip(n), far()) for n in (1, 2, 3, 4, 5)]
    gate.open()
    results(futures)
    assert [lengths for lengths, _ in model.calls] == [[1, 2], [3, 4], [5]]


def test_a_partial_batch_runs_once_the_oldest_clip_has_waited_the_delay(
    make_batcher, model
) -> None:
    delay = 0.3
    batcher = make_batcher(max_batch_size=8, max_batch_delay_s=delay)
    submitted = time.monotonic()
    futures = [batcher.submit(clip(n), far()) for n in (3, 4)]
    outcomes = results(futures)
    waited = time.monotonic() - submitted
    assert model.calls == [([3, 4], 4)]  # together, although the batch was not full
    assert waited >= delay
    assert outcomes[0].queue_ms >= delay * 1000.0 * 0.95  # the oldest waited the delay
    assert waited < LONG_DELAY_S


def test_a_lone_clip_with_nothing_upstream_does_not_wait(make_batcher, model) -> None:
    batcher = make_batcher(max_batch_size=8, max_batch_delay_s=LONG_DELAY_S, upstream=lambda: 0)
    outcome = batcher.submit(clip(4), far()).result(WAIT_S)
    assert model.calls == [([4], 4)]
    assert outcome.queue_ms < WAIT_S * 1000.0


def test_the_worker_waits_for_clips_on_their_way(make_batcher, model) -> None:
    on_the_way = [1]
    batcher = make_batcher(
        max_batch_size=8, max_batch_delay_s=LONG_DELAY_S, upstream=lambda: on_the_way[0]
    )
    first = batcher.submit(clip(2), far())
    with pytest.raises(FutureTimeout):
        first.result(0.3)  # one more clip is coming: the worker waits for it
    assert model.calls == []
    on_the_way[0] = 0
    second = batcher.submit(clip(3), far())
    results([first, second])
    assert model.calls == [([2, 3], 3)]  # one call for both


def test_the_delay_still_bounds_the_wait_for_clips_on_their_way(make_batcher, model) -> None:
    delay = 0.2
    batcher = make_batcher(max_batch_size=8, max_batch_delay_s=delay, upstream=lambda: 5)
    started = time.monotonic()
    outcome = batcher.submit(clip(2), far()).result(WAIT_S)
    assert time.monotonic() - started >= delay
    assert outcome.batch_size == 1
    assert model.calls == [([2], 2)]


def test_without_an_upstream_count_a_lone_clip_waits_the_delay(make_batcher, model) -> None:
    delay = 0.2
    batcher = make_batcher(max_batch_size=8, max_batch_delay_s=delay)
    outcome = batcher.submit(clip(2), far()).result(WAIT_S)
    assert outcome.queue_ms >= delay * 1000.0 * 0.95


# -- padding and length buckets --------------------------------------------------------------------


def test_without_buckets_a_batch_is_padded_to_its_longest_clip(make_batcher, model) -> None:
    batcher = make_batcher(max_batch_size=3)
    outcomes = results([batcher.submit(clip(n), far()) for n in (9, 30, 4)])
    assert model.calls == [([9, 30, 4], 30)]
    assert {o.padded_length for o in outcomes} == {30}


def test_clips_are_grouped_by_length_bucket(make_batcher, model) -> None:
    batcher = make_batcher(max_batch_size=4, length_buckets=(64, 16))
    futures = [batcher.submit(clip(n), far()) for n in (40, 10, 50, 16)]
    outcomes = results(futures)
    assert sorted(model.calls) == [([10, 16], 16), ([40, 50], 64)]
    assert [(o.batch_size, o.padded_length) for o in outcomes] == [(2, 64), (2, 16)] * 2


def test_bucket_length(make_batcher) -> None:
    batcher = make_batcher(length_buckets=(32, 8, 16))
    assert [batcher.bucket_length(n) for n in (1, 8, 9, 16, 17, 32)] == [8, 8, 16, 16, 32, 32]
    assert batcher.bucket_length(33) == 33  # beyond the last bucket: its own length
    assert make_batcher().bucket_length(5) == 5


# -- admission: the bounded queue ------------------------------------------------------------------


def test_a_full_queue_refuses_clips_and_accepts_again_once_drained(make_batcher, model) -> None:
    depths: list[int] = []
    batcher = make_batcher(
        max_batch_size=2, max_batch_delay_s=0.0, max_queue_size=3, on_queue_depth=depths.append
    )
    gate = Gate(batcher)
    queued = [batcher.submit(clip(n), far()) for n in (1, 2, 3)]
    assert batcher.depth == 3
    with pytest.raises(OverCapacityError) as refused:
        batcher.submit(clip(4), far())
    assert refused.value.reject_reason == "queue_full"
    assert batcher.depth == 3  # the refused clip was not queued
    gate.open()
    results(queued)
    assert sorted(n for lengths, _ in model.calls for n in lengths) == [1, 2, 3]
    assert batcher.submit(clip(5), far()).result(WAIT_S).result is not None
    assert depths[:3] == [1, 2, 3]
    assert depths[-1] == 0


# -- deadlines and cancellation --------------------------------------------------------------------


def test_a_clip_whose_deadline_passed_in_the_queue_is_not_run(make_batcher, model) -> None:
    batcher = make_batcher(max_batch_size=4, max_batch_delay_s=0.0)
    gate = Gate(batcher)
    late = batcher.submit(clip(7), time.monotonic() + 0.05)
    in_time = batcher.submit(clip(8), far())
    time.sleep(0.1)
    gate.open()
    with pytest.raises(DeadlineExceededError):
        late.result(WAIT_S)
    assert in_time.result(WAIT_S).batch_size == 1
    assert model.calls == [([8], 8)]


def test_a_cancelled_clip_is_not_run(make_batcher, model) -> None:
    batcher = make_batcher(max_batch_size=4, max_batch_delay_s=0.0)
    gate = Gate(batcher)
    dropped = batcher.submit(clip(5), far())
    kept = batcher.submit(clip(6), far())
    assert dropped.cancel()
    gate.open()
    assert kept.result(WAIT_S).batch_size == 1
    assert model.calls == [([6], 6)]
    with pytest.raises(CancelledError):
        dropped.result(0)


def test_a_batch_of_only_cancelled_or_late_clips_never_calls_the_model(make_batcher, model) -> None:
    batcher = make_batcher(max_batch_size=4, max_batch_delay_s=0.0)
    gate = Gate(batcher)
    cancelled = batcher.submit(clip(5), far())
    late = batcher.submit(clip(6), time.monotonic() + 0.01)
    cancelled.cancel()
    time.sleep(0.05)
    gate.open()
    with pytest.raises(DeadlineExceededError):
        late.result(WAIT_S)
    assert batcher.call(lambda: "idle").result(WAIT_S) == "idle"
    assert model.calls == []


# -- model failures --------------------------------------------------------------------------------


def test_a_failing_model_call_fails_every_clip_of_its_batch(make_batcher, model) -> None:
    model.fail_with = ValueError("boom")
    batcher = make_batcher(max_batch_size=2, max_batch_delay_s=0.0)
    gate = Gate(batcher)
    futures = [batcher.submit(clip(n), far()) for n in (3, 4)]
    gate.open()
    for future in futures:
        with pytest.raises(ValueError, match="boom"):
            future.result(WAIT_S)
    assert model.calls == [([3, 4], 4)]
    model.fail_with = None
    assert batcher.submit(clip(2), far()).result(WAIT_S).result is not None  # worker lives on
    assert batcher.alive


def test_a_model_answering_the_wrong_number_of_clips_fails_the_batch(make_batcher, model) -> None:
    model.answer_count = lambda n: n - 1
    batcher = make_batcher(max_batch_size=2)
    futures = [batcher.submit(clip(n), far()) for n in (3, 4)]
    for future in futures:
        with pytest.raises(RuntimeError, match="1 outcomes for a batch of 2"):
            future.result(WAIT_S)


# -- the worker thread -----------------------------------------------------------------------------


def test_everything_runs_on_the_one_worker_thread(model) -> None:
    seen: list[str] = []
    batcher = MicroBatcher(
        model,
        max_batch_size=2,
        max_batch_delay_s=0.0,
        max_queue_size=8,
        thread_init=lambda: seen.append(threading.current_thread().name),
    )
    batcher.start()
    try:
        task = batcher.call(lambda: threading.current_thread().name)
        batcher.submit(clip(3), far()).result(WAIT_S)
        assert task.result(WAIT_S) == seen[0] == "cmamba-model-worker"
        assert model.threads == {"cmamba-model-worker"}
        with pytest.raises(RuntimeError, match="already started"):
            batcher.start()
    finally:
        batcher.stop(WAIT_S)


def test_a_task_runs_before_the_queued_clips(make_batcher, model) -> None:
    order: list[str] = []
    batcher = make_batcher(max_batch_size=8, max_batch_delay_s=0.0)
    gate = Gate(batcher)
    clips = [batcher.submit(clip(3), far())]
    task = batcher.call(lambda: order.append(f"task after {len(model.calls)} calls"))
    gate.open()
    task.result(WAIT_S)
    results(clips)
    assert order == ["task after 0 calls"]


def test_a_failing_task_reports_its_error_and_the_worker_lives_on(make_batcher) -> None:
    batcher = make_batcher()

    def fail() -> None:
        raise KeyError("nope")

    with pytest.raises(KeyError):
        batcher.call(fail).result(WAIT_S)
    assert batcher.call(lambda: 42).result(WAIT_S) == 42


def test_on_batch_sees_each_model_calls_size(make_batcher, model) -> None:
    sizes: list[int] = []
    batcher = make_batcher(max_batch_size=3, on_batch=sizes.append, length_buckets=(8, 64))
    results([batcher.submit(clip(n), far()) for n in (4, 40, 5)])
    assert sorted(sizes) == [1, 2]
    assert len(sizes) == len(model.calls)


def test_stop_runs_what_is_queued_then_refuses_new_clips(model) -> None:
    batcher = MicroBatcher(
        model, max_batch_size=2, max_batch_delay_s=LONG_DELAY_S, max_queue_size=8
    )
    batcher.start()
    gate = Gate(batcher)
    queued = [batcher.submit(clip(n), far()) for n in (1, 2, 3)]
    stopping = threading.Thread(target=batcher.stop, args=(WAIT_S,))
    stopping.start()
    gate.open()
    stopping.join(WAIT_S)
    assert not stopping.is_alive() and not batcher.alive
    assert [o.result.score for o in results(queued) if o.result] == [1.0, 2.0, 3.0]
    with pytest.raises(RuntimeError, match="stopped"):
        batcher.submit(clip(4), far())


# -- background work (jobs) -------------------------------------------------------------------


def test_background_clips_wait_while_online_clips_are_queued(
    make_batcher: Callable[..., MicroBatcher], model: RecordingModel
) -> None:
    batcher = make_batcher(max_batch_size=2, max_batch_delay_s=0.0)
    gate = Gate(batcher)
    deadline = time.monotonic() + WAIT_S
    background = [batcher.submit(clip(n), deadline, background=True) for n in (31, 32, 33)]
    online = [batcher.submit(clip(n), deadline) for n in (11, 12, 13)]
    assert batcher.depth == 3 and batcher.background_depth == 3
    gate.open()
    for future in [*online, *background]:
        assert future.result(WAIT_S).result is not None
    lengths = [sorted(call[0]) for call in model.calls]
    # Every online clip ran before any background one, and no call mixed the two.
    assert lengths == [[11, 12], [13], [31, 32], [33]]


def test_a_background_queue_of_its_own_size(
    make_batcher: Callable[..., MicroBatcher], model: RecordingModel
) -> None:
    batcher = make_batcher(max_queue_size=2, max_batch_delay_s=0.0)
    gate = Gate(batcher)
    deadline = time.monotonic() + WAIT_S
    queued = [batcher.submit(clip(5), deadline, background=True) for _ in range(2)]
    with pytest.raises(OverCapacityError):
        batcher.submit(clip(5), deadline, background=True)
    online = [batcher.submit(clip(7), deadline) for _ in range(2)]  # online room is its own
    gate.open()
    for future in [*queued, *online]:
        assert future.result(WAIT_S).result is not None
