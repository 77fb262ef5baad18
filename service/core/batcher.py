"""The micro-batcher and its single model worker thread.

Clips wait in one bounded FIFO queue. The worker takes the oldest clip and waits up to
``max_batch_delay`` (counted from when that clip arrived) for company, up to
``max_batch_size`` clips; it then groups them by length bucket, so a short clip is not padded
to a long one, and runs each group as one model call. Everything that touches the model runs
on this one thread, including warm-up tasks handed in with :meth:`MicroBatcher.call`.

Background clips (a long recording's job work) wait in a second queue: the worker takes them
only when no online clip is queued, and never puts the two kinds into one model call, so an
online request waits at most for the one background batch already running.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from service.core.trace_context import BatchTracer, RequestTrace, request_trace_var
from service.core.types import ClipFeatures, ClipOutcome
from service.errors import DeadlineExceededError, FatalServiceError, OverCapacityError

logger = logging.getLogger(__name__)

RunBatch = Callable[[Sequence[ClipFeatures], int], Sequence[ClipOutcome]]
"""(clips, padded_length) -> one outcome per clip, in order."""


@dataclass
class _Pending:
    clip: ClipFeatures
    future: Future[ClipOutcome]
    enqueued_at: float  # time.monotonic()
    deadline: float  # time.monotonic()
    trace: RequestTrace | None = None


@dataclass
class _Task:
    fn: Callable[[], Any]
    future: Future[Any]


class MicroBatcher:
    """Bounded queue + batching policy + the one model worker thread.

    Args:
        run_batch: runs one padded batch (called on the worker thread only).
        max_batch_size: most clips per model call (1 = no batching).
        max_batch_delay_s: longest time the oldest queued clip waits for company.
        max_queue_size: most clips waiting; :meth:`submit` refuses beyond it.
        length_buckets: sorted lengths to pad up to; empty = pad each group to its longest.
        on_batch: called with each model call's batch size.
        on_queue_depth: called with the queue depth whenever it changes.
        thread_init: called first thing on the worker thread (e.g. ``torch.set_num_threads``).
        upstream: when given, how many clips are on their way (admitted, not yet queued); the
            worker waits for company only while this is positive, so a lone clip never waits.
        on_death: called (on the dying thread) with what ended the worker thread when an
            error escapes its loop; the clips it held and those queued are failed first.
        tracer: when given, each model call serving traced requests runs in a batch span
            linked to their spans (:mod:`service.core.trace_context`).
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue_size: int,
        length_buckets: Sequence[int] = (),
        on_batch: Callable[[int], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        thread_init: Callable[[], None] | None = None,
        upstream: Callable[[], int] | None = None,
        on_death: Callable[[BaseException], None] | None = None,
        tracer: BatchTracer | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue_size = max_queue_size
        self.length_buckets = tuple(sorted(length_buckets))
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._thread_init = thread_init
        self._upstream = upstream
        self._on_death = on_death
        self._tracer = tracer
        self._failed: FatalServiceError | None = None
        self._holding: list[_Pending] = []
        self._queue: deque[_Pending] = deque()
        self._background: deque[_Pending] = deque()
        self._tasks: deque[_Task] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is not None:
            raise RuntimeError("the batcher is already started")
        self._thread = threading.Thread(target=self._loop, name="cmamba-model-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Run what is queued, then stop the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        """Online clips waiting for the model."""
        return len(self._queue)

    @property
    def background_depth(self) -> int:
        """Background clips waiting for the model."""
        return len(self._background)

    # -- producers ----------------------------------------------------------------------------

    def submit(
        self, clip: ClipFeatures, deadline: float, *, background: bool = False
    ) -> Future[ClipOutcome]:
        """Queue a clip; the future resolves on the worker thread.

        Args:
            clip: the clip's features.
            deadline: ``time.monotonic()`` after which the clip is not run any more.
            background: job work, run only while no online clip waits (its own queue, of the
                same size).

        Raises:
            OverCapacityError: the queue is full (reason ``queue_full``).
        """
        future: Future[ClipOutcome] = Future()
        trace = request_trace_var.get() if self._tracer is not None else None
        queue = self._background if background else self._queue
        with self._cond:
            if self._failed is not None:
                raise FatalServiceError(self._failed.message)
            if self._stopping:
                raise RuntimeError("the batcher is stopped")
            if len(queue) >= self.max_queue_size:
                raise OverCapacityError(
                    f"the model queue is full ({self.max_queue_size} clips waiting)",
                    reason="queue_full",
                )
            queue.append(_Pending(clip, future, time.monotonic(), deadline, trace))
            depth = len(self._queue)
            self._cond.notify_all()
        if not background:
            self._report_depth(depth)
        return future

    def fail(self, error: FatalServiceError) -> None:
        """Fail every queued clip with ``error`` and refuse new ones with it (the instance is
        broken); the batch running now ends as it ends."""
        with self._cond:
            self._failed = error
            dropped = list(self._queue) + list(self._background)
            self._queue.clear()
            self._background.clear()
            self._cond.notify_all()
        for pending in dropped:
            if pending.future.set_running_or_notify_cancel():
                pending.future.set_exception(error)
        self._report_depth(0)

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the worker thread before the next batch (warm-up, inspection)."""
        future: Future[Any] = Future()
        with self._cond:
            self._tasks.append(_Task(fn, future))
            self._cond.notify_all()
        return future

    def bucket_length(self, length: int) -> int:
        """The padded length of a clip of ``length`` steps (itself beyond the last bucket)."""
        index = bisect.bisect_left(self.length_buckets, length)
        return self.length_buckets[index] if index < len(self.length_buckets) else length

    # -- worker -------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            if self._thread_init is not None:
                self._thread_init()
            while True:
                work = self._next_work()
                if work is None:
                    return
                if isinstance(work, _Task):
                    self._run_task(work)
                else:
                    self._run_clips(work)
        except BaseException as exc:  # the thread ends: nobody may wait on it any more
            self._died(exc)

    def _died(self, exc: BaseException) -> None:
        # Reported first, so whoever hears of a failed clip finds the instance failed.
        logger.critical("the model worker thread died: %s: %s", type(exc).__name__, exc)
        try:
            if self._on_death is not None:
                self._on_death(exc)
        finally:
            self._fail_all()

    def _fail_all(self) -> None:
        error = FatalServiceError("the model worker stopped (the instance restarts); retry")
        held, self._holding = self._holding, []
        for pending in held:
            if not pending.future.done():
                pending.future.set_exception(error)
        self.fail(error)
        with self._cond:
            tasks = list(self._tasks)
            self._tasks.clear()
        for task in tasks:
            if task.future.set_running_or_notify_cancel():
                task.future.set_exception(error)

    def _next_work(self) -> _Task | list[_Pending] | None:
        with self._cond:
            while True:
                if self._tasks:
                    return self._tasks.popleft()
                if self._queue:
                    break
                if self._background:  # queued together by one job: no wait for company
                    count = min(self.max_batch_size, len(self._background))
                    return [self._background.popleft() for _ in range(count)]
                if self._stopping:
                    return None
                self._cond.wait()
            # Wait for company: until the batch is full or the oldest clip has waited enough
            # (or, with an upstream count, until no other clip is on its way).
            flush_at = self._queue[0].enqueued_at + self.max_batch_delay_s
            while (
                len(self._queue) < self.max_batch_size
                and not self._stopping
                and not self._tasks
                and (self._upstream is None or self._upstream() > 0)
            ):
                remaining = flush_at - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            taken = [
                self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))
            ]
            depth = len(self._queue)
        self._report_depth(depth)
        return taken

    def _run_task(self, task: _Task) -> None:
        if not task.future.set_running_or_notify_cancel():
            return
        try:
            task.future.set_result(task.fn())
        except BaseException as exc:
            task.future.set_exception(exc)

    def _run_clips(self, taken: list[_Pending]) -> None:
        now = time.monotonic()
        live: list[_Pending] = []
        for pending in taken:
            if not pending.future.set_running_or_notify_cancel():
                continue  # the caller gave up (deadline) while it waited
            if now > pending.deadline:
                pending.future.set_exception(
                    DeadlineExceededError("the request deadline passed while queued")
                )
                continue
            live.append(pending)
        if not live:
            return
        self._holding = live
        for padded_length, group in self._group_by_bucket(live):
            self._run_group(group, padded_length, started=time.monotonic())
        self._holding = []

    def _group_by_bucket(self, pending: list[_Pending]) -> list[tuple[int, list[_Pending]]]:
        if not self.length_buckets:
            return [(max(p.clip.length for p in pending), pending)]
        groups: dict[int, list[_Pending]] = {}
        for p in pending:
            groups.setdefault(self.bucket_length(p.clip.length), []).append(p)
        return sorted(groups.items())

    def _run_group(self, group: list[_Pending], padded_length: int, started: float) -> None:
        if self._on_batch is not None:
            self._on_batch(len(group))
        traces = [p.trace for p in group if p.trace is not None]
        try:
            if traces and self._tracer is not None:
                with self._tracer.batch(traces, len(group), padded_length):
                    outcomes = self._run_batch([p.clip for p in group], padded_length)
            else:
                outcomes = self._run_batch([p.clip for p in group], padded_length)
            if len(outcomes) != len(group):
                raise RuntimeError(f"{len(outcomes)} outcomes for a batch of {len(group)}")
        except Exception as exc:
            logger.exception("model call failed on a batch of %d", len(group))
            for p in group:
                p.future.set_exception(exc)
            return
        for p, outcome in zip(group, outcomes, strict=True):
            queue_ms = (started - p.enqueued_at) * 1000.0
            p.future.set_result(replace(outcome, queue_ms=queue_ms))

    def _report_depth(self, depth: int) -> None:
        if self._on_queue_depth is not None:
            self._on_queue_depth(depth)
