"""Who uses the device: one thread, which runs whatever is queued whenever the device is free.

Requests are queued with their plans. When the device thread is free it takes the
queue (no wait when idle; with `max_delay_ms` it waits that long for a batch to fill
to `max_examples`), drops what nobody waits for (cancelled: dropped; past its deadline:
refused with DeadlineExceeded, since it has no answer yet), orders the rest by deadline
(earliest first, then arrival) and hands up to `max_examples` examples to `execute`.
While it runs, `execute` takes newcomers between its steps (`join`), up to `max_examples`
in flight; the rest wait. No request is left in the queue: between the steps, `expire`
refuses what nobody waits for any more. The queue is bounded (`max_queued` examples):
past it a newcomer is refused at once with ResourceExhausted.

It also predicts a newcomer's wait (the work in flight, which `execute` reports through
`busy_for`, and the queued work that goes first), which the engine counts as time already
spent when it plans.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Callable, Sequence

from npas_serve.engine.run import Cancelled, DeadlineExceeded, RequestRun, ResourceExhausted

log = logging.getLogger(__name__)

# the default queue bound, in full batches (`max_examples`) waiting beside the work in flight: an
# overloaded server refuses at once instead of answering everyone late
QUEUED_BATCHES = 4


class BatchScheduler:
    def __init__(self, execute: Callable[[list[RequestRun]], None],
                 estimate_ms: Callable[[Sequence[RequestRun]], float],
                 max_examples: int = 256, max_delay_ms: float = 0.0, max_queued: int | None = None):
        max_queued = QUEUED_BATCHES * max_examples if max_queued is None else max_queued
        if max_examples < 1 or max_delay_ms < 0 or max_queued < 1:
            raise ValueError(f"max_examples and max_queued must be >= 1 and max_delay_ms >= 0, got "
                             f"{max_examples}, {max_queued}, {max_delay_ms}")
        self.execute, self.estimate_ms = execute, estimate_ms
        self.max_examples, self.max_delay_ms, self.max_queued = max_examples, max_delay_ms, max_queued
        self._queue: list[RequestRun] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._busy_until = 0.0              # perf_counter() the running batch is predicted to end
        self._in_flight = 0                 # its examples
        self._closed = False
        self.batches = 0                    # batches run so far (tests and benchmarks read it)
        self._thread = threading.Thread(target=self._loop, name="npas-device", daemon=True)
        self._thread.start()

    # --- callers' side ------------------------------------------------------------------------
    def submit(self, runs: Sequence[RequestRun]) -> None:
        """Queue requests together: requests submitted in one call are seen by the same batch. One that
        would take the queue past `max_queued` examples (the call's earlier requests included) is
        refused with ResourceExhausted; an empty queue takes any request."""
        refused = []
        with self._cond:
            if not self.running:
                raise RuntimeError("the engine is closed" if self._closed else "the device thread has stopped")
            queued = sum(r.examples for r in self._queue)
            for run in runs:
                if queued and queued + run.examples > self.max_queued:
                    refused.append(run)
                    continue
                run.seq = next(self._seq)
                self._queue.append(run)
                queued += run.examples
            self._cond.notify()
        for run in refused:                 # callbacks outside the lock; a failing one stops no other
            try:
                run.fail(ResourceExhausted(f"the queue is full ({self.max_queued} examples waiting at most); "
                                           f"nothing was computed, retry later"), "overloaded")
            except Exception:
                log.exception("refusing a request failed")

    def queued_examples(self) -> int:
        with self._cond:
            return sum(r.examples for r in self._queue)

    def ahead_examples(self) -> int:
        """Examples queued or in flight: what a newcomer runs beside (its batch, less itself)."""
        with self._cond:
            return sum(r.examples for r in self._queue) + self._in_flight

    def expected_wait_ms(self, examples: int) -> float:
        """A newcomer's predicted wait before its batch starts: the running batch's remainder, plus
        the queued work when it and the newcomer cannot share one batch."""
        with self._cond:
            wait = max(0.0, self._busy_until - time.perf_counter()) * 1000
            queued = sum(r.examples for r in self._queue)
            if self._queue and queued + examples > self.max_examples:
                wait += self.estimate_ms(self._queue)
            return wait

    @property
    def running(self) -> bool:
        """Taking work: not closed, and the device thread alive."""
        return not self._closed and self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the queued work; later submissions are refused."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    # --- the device thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch: list[RequestRun] = []
            try:
                with self._cond:
                    while not self._queue and not self._closed:
                        self._cond.wait()
                    if not self._queue:
                        return
                    self._fill()
                    batch, dropped = self._take()
                    self._busy_until = time.perf_counter() + (self.estimate_ms(batch) / 1000 if batch else 0.0)
                    self._in_flight = sum(r.examples for r in batch)
                self._refuse(dropped)           # callbacks outside the lock
                if not batch:
                    continue
                self._stamp(batch, 0)
                self.execute(batch)
            except BaseException as err:    # the batch failed as a whole: every request in it says so
                log.exception("a batch of %d requests failed", len(batch))
                for run in batch:
                    try:
                        run.fail(err, "error")
                    except Exception:
                        log.exception("failing a request failed")
            finally:
                self.batches += bool(batch)
                with self._cond:
                    self._busy_until, self._in_flight = 0.0, 0

    def join(self, examples_in_flight: int) -> list[RequestRun]:
        """Queued requests that fit beside the work in flight (deadline order), for `execute` to take
        between its steps; what nobody waits for is refused."""
        with self._cond:
            if not self._queue:
                return []
            batch, dropped = self._take(examples_in_flight)
        self._refuse(dropped)
        self._stamp(batch, examples_in_flight)
        return batch

    @staticmethod
    def _stamp(batch: list[RequestRun], in_flight: int) -> None:
        """Each request's time in the queue, and the examples it starts running beside (its own included)."""
        now, examples = time.perf_counter(), in_flight + sum(r.examples for r in batch)
        for run in batch:
            run.queue_s, run.batch_examples = now - run.started, examples

    def busy_for(self, ms: float, examples: int) -> None:
        """`execute` predicts its work in flight (`examples`) ends in `ms`."""
        with self._cond:
            self._busy_until = time.perf_counter() + ms / 1000
            self._in_flight = examples

    def expire(self) -> None:
        """Refuse what nobody waits for any more without waiting for the device to be free: the batch
        calls it between its steps, so a queued request past its deadline hears so at once."""
        with self._cond:
            dropped, self._queue = self._split(self._queue)
        self._refuse(dropped)

    @staticmethod
    def _split(runs: list[RequestRun]) -> tuple[list[RequestRun], list[RequestRun]]:
        """(dropped: cancelled or past the deadline, the rest)."""
        dropped, kept = [], []
        for run in runs:
            (dropped if run.cancelled or run.deadline_passed() else kept).append(run)
        return dropped, kept

    @staticmethod
    def _refuse(dropped: list[RequestRun]) -> None:
        for run in dropped:                 # a failing callback must not stop the device
            try:
                if run.cancelled:
                    run.fail(Cancelled("the call was cancelled while queued"), "cancelled")
                else:
                    run.fail(DeadlineExceeded("deadline_unix_ms: the deadline passed while the request was "
                                              "queued; nothing was computed"), "deadline")
            except Exception:
                log.exception("dropping a request failed")

    def _fill(self) -> None:
        """With a maximum delay: wait (the lock released) until the batch is full or the oldest
        request has waited that long. Without one, take what is there."""
        if not self.max_delay_ms:
            return
        until = min(r.started for r in self._queue) + self.max_delay_ms / 1000
        while (sum(r.examples for r in self._queue) < self.max_examples and not self._closed
               and (left := until - time.perf_counter()) > 0):
            self._cond.wait(left)

    def _take(self, in_flight: int = 0) -> tuple[list[RequestRun], list[RequestRun]]:
        """The next batch beside `in_flight` examples, in deadline order, and what is dropped; the rest
        stays queued. With nothing in flight the first request is taken whatever its size."""
        dropped, ready = self._split(self._queue)
        ready.sort(key=lambda r: (r.due, r.seq))
        batch, examples = [], in_flight
        for run in ready:
            if (batch or in_flight) and examples + run.examples > self.max_examples:
                break
            batch.append(run)
            examples += run.examples
        self._queue = ready[len(batch):]
        return batch, dropped
