"""Turns on the device are granted in arrival order."""
from __future__ import annotations

import threading
import time

from npas_serve.engine.scheduler import FifoScheduler


def take(scheduler: FifoScheduler, order: list[int], i: int) -> None:
    with scheduler.turn():
        order.append(i)


def test_turns_follow_arrival_order_and_the_wait_is_expected():
    scheduler = FifoScheduler()
    order: list[int] = []
    started: list[threading.Thread] = []
    with scheduler.turn():                      # hold the device while five requests queue up
        for i in range(5):
            t = threading.Thread(target=take, args=(scheduler, order, i), daemon=True)
            t.start()
            started.append(t)
            deadline = time.monotonic() + 5
            while scheduler._lock._next != i + 2 and time.monotonic() < deadline:
                time.sleep(0.001)               # the thread holds its ticket before the next one starts
        time.sleep(0.02)
    for t in started:
        t.join(5)
    assert order == [0, 1, 2, 3, 4]
    assert scheduler.expected_wait_ms > 0


def test_a_waiter_that_gives_up_does_not_block_the_next():
    scheduler = FifoScheduler()
    lock = scheduler._lock
    lock._abandoned.add(1)                      # ticket 1's waiter left while waiting
    lock._next = 3
    with lock._cond:
        lock._advance(1)                        # ticket 0 releases
    assert lock._serving == 2
