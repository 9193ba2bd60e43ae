"""Who uses the device next: requests take turns in arrival order.

A request takes one turn per member (or exit), so concurrent requests
interleave. The scheduler also keeps the expected wait for a turn, which the
engine counts as time already spent when it decides whether more work still
fits a request's budget.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

WAIT_EMA = 0.2        # weight of a new wait in the expected wait


class FifoLock:
    """A lock granted in arrival order.

    With a plain lock the thread that just released it usually wins it back, so a
    request waits for whole other requests, by luck; in arrival order it waits for
    the work queued ahead of it, which the expected wait can then predict.
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._next = 0                    # next ticket to hand out
        self._serving = 0                 # ticket that holds the lock
        self._abandoned: set[int] = set() # tickets whose waiter gave up (an exception while waiting)

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            try:
                while ticket != self._serving:
                    self._cond.wait()
            except BaseException:
                self._abandoned.add(ticket)
                self._advance(0)
                raise

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._advance(1)

    def _advance(self, step: int) -> None:
        self._serving += step
        while self._serving in self._abandoned:
            self._abandoned.remove(self._serving)
            self._serving += 1
        self._cond.notify_all()


class FifoScheduler:
    """One turn on the device at a time (torch already uses every core), first come first served."""

    def __init__(self):
        self._lock = FifoLock()
        self.expected_wait_ms = 0.0       # moving average of the wait for a turn: other requests' work

    @contextmanager
    def turn(self) -> Iterator[None]:
        t0 = time.perf_counter()
        with self._lock:
            waited = (time.perf_counter() - t0) * 1000
            self.expected_wait_ms = (1 - WAIT_EMA) * self.expected_wait_ms + WAIT_EMA * waited
            yield
