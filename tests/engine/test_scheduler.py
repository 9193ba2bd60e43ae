"""The device thread: takes what is queued, drops what nobody waits for, orders by deadline."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from npas_serve.engine.run import Cancelled, DeadlineExceeded, RequestRun, ResourceExhausted
from npas_serve.engine.scheduler import BatchScheduler
from npas_serve.protocol import InferenceRequest


class Device:
    """A fake `execute`: records each batch's requests, optionally held until released."""

    def __init__(self, hold: bool = False):
        self.batches: list[list[str]] = []
        self.entered, self.release = threading.Event(), threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, runs):
        self.batches.append([r.request.request_id for r in runs])
        self.entered.set()
        assert self.release.wait(10)
        for r in runs:
            r.done = True


def run(rid: str, examples: int = 1, **knobs) -> RequestRun:
    got = []
    r = RequestRun.start(InferenceRequest(inputs=np.zeros((examples, 4), np.float32), request_id=rid, **knobs),
                         deliver=got.append)
    r.got = got
    return r


def wait_for(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.002)
    assert cond()


def test_queued_requests_run_together_in_deadline_order_then_arrival():
    device = Device(hold=True)
    s = BatchScheduler(device, lambda runs: 1.0)
    s.submit([run("first")])                     # runs alone at once: no wait when idle
    assert device.entered.wait(10)
    now = time.time() * 1000
    s.submit([run("none-a"), run("late", deadline_unix_ms=now + 6_000), run("soon", budget_ms=3_000),
              run("none-b")])
    device.release.set()
    wait_for(lambda: s.batches == 2)
    assert device.batches == [["first"], ["soon", "late", "none-a", "none-b"]]
    s.close()


def test_a_batch_holds_at_most_max_examples_and_the_rest_waits():
    device = Device(hold=True)
    s = BatchScheduler(device, lambda runs: 1.0, max_examples=4)
    s.submit([run("hold")])
    assert device.entered.wait(10)
    s.submit([run("a", 3), run("b", 2), run("c", 1), run("big", 9)])
    device.release.set()
    wait_for(lambda: s.batches == 4)
    # a larger request than max_examples still runs, alone
    assert device.batches == [["hold"], ["a"], ["b", "c"], ["big"]]
    s.close()


def test_cancelled_and_expired_requests_leave_the_queue_unrun():
    device = Device(hold=True)
    s = BatchScheduler(device, lambda runs: 1.0)
    s.submit([run("hold")])
    assert device.entered.wait(10)
    gone, expired, kept = run("gone"), run("expired", deadline_unix_ms=time.time() * 1000 + 1), run("kept")
    s.submit([gone, expired, kept])
    gone.cancel()
    time.sleep(0.01)                              # the expired one's deadline passes while queued
    device.release.set()
    wait_for(lambda: s.batches == 2)
    assert device.batches == [["hold"], ["kept"]]
    assert isinstance(gone.got[0], Cancelled) and isinstance(expired.got[0], DeadlineExceeded)
    assert gone.done and expired.done and s.queued_examples() == 0
    s.close()


def test_a_failing_batch_fails_each_of_its_requests():
    def broken(runs):
        raise RuntimeError("device lost")

    s = BatchScheduler(broken, lambda runs: 1.0)
    a, b = run("a"), run("b")
    s.submit([a, b])
    wait_for(lambda: a.done and b.done)
    assert [str(x.got[0]) for x in (a, b)] == ["device lost", "device lost"]
    s.close()


def test_max_delay_waits_for_a_fuller_batch_and_no_longer():
    device = Device()
    s = BatchScheduler(device, lambda runs: 1.0, max_examples=3, max_delay_ms=300)
    s.submit([run("a")])
    time.sleep(0.05)
    s.submit([run("b")])
    s.submit([run("c")])                          # full: runs before the delay is over
    wait_for(lambda: s.batches == 1, 2)
    assert device.batches == [["a", "b", "c"]]
    t0 = time.perf_counter()
    s.submit([run("alone")])
    wait_for(lambda: s.batches == 2, 2)
    assert 0.25 <= time.perf_counter() - t0 < 2
    s.close()


def test_the_expected_wait_counts_the_running_batch_and_a_full_queue():
    device = Device(hold=True)
    s = BatchScheduler(device, lambda runs: 10_000.0 * len(runs), max_examples=2)
    s.submit([run("hold")])
    assert device.entered.wait(10)
    assert 0 < s.expected_wait_ms(1) <= 10_000
    s.submit([run("q1"), run("q2")])
    assert s.expected_wait_ms(1) > 10_000          # the queue fills the next batch: one more batch first
    device.release.set()
    s.close()
    with pytest.raises(RuntimeError):
        s.submit([run("late")])


def test_a_delivery_that_fails_does_not_stop_the_device():
    device = Device(hold=True)
    s = BatchScheduler(device, lambda runs: 1.0)
    s.submit([run("hold")])
    assert device.entered.wait(10)
    broken = run("broken", deadline_unix_ms=time.time() * 1000 + 1)

    def explode(item):
        raise RuntimeError("the caller's queue is gone")

    broken.deliver = explode
    s.submit([broken])
    time.sleep(0.01)                              # it expires while queued; refusing it raises
    device.release.set()
    wait_for(lambda: broken.done)
    s.submit([run("after")])
    wait_for(lambda: s.batches == 2)
    assert device.batches[-1] == ["after"]
    s.close()


def test_the_queue_is_bounded_in_examples_and_refuses_past_it_at_once():
    device = Device(hold=True)
    s = BatchScheduler(device, lambda runs: 1.0, max_examples=2, max_queued=3)
    assert BatchScheduler(device, lambda runs: 1.0, max_examples=5).max_queued == 20   # default: 4 batches
    s.submit([run("hold")])
    assert device.entered.wait(10)
    a, b, c = run("a", 2), run("b", 2), run("c", 1)
    s.submit([a, b, c])                            # b would make 4 > 3 waiting: refused; c still fits
    assert b.done and isinstance(b.got[0], ResourceExhausted) and "queue is full" in str(b.got[0])
    assert not a.got and not c.got and s.queued_examples() == 3
    device.release.set()
    wait_for(lambda: s.batches == 3)
    assert device.batches == [["hold"], ["a"], ["c"]]
    big = run("big", 9)                            # an empty queue takes any request
    s.submit([big])
    wait_for(lambda: s.batches == 4)
    assert device.batches[-1] == ["big"]
    s.close()


def test_newcomers_join_the_work_in_flight_up_to_max_examples():
    joined, entered, queued = [], threading.Event(), threading.Event()

    def device(runs):
        entered.set()
        assert queued.wait(10)                    # the newcomers arrive while the first runs
        more = s.join(sum(r.examples for r in runs))
        joined.append([r.request.request_id for r in more])
        for r in runs + more:
            r.done = True

    s = BatchScheduler(device, lambda runs: 1.0, max_examples=3)
    s.submit([run("first")])
    assert entered.wait(10)
    s.submit([run("late"), run("soon", budget_ms=3_000), run("big", 2)])
    queued.set()
    wait_for(lambda: s.batches == 2)
    assert joined[0] == ["soon", "late"]          # deadline order, up to 3 examples in flight
    assert joined[1] == []                        # "big" did not fit: it started a run of its own
    s.close()


def test_a_request_without_a_budget_is_not_starved_by_budgeted_ones(monkeypatch):
    """Without a budget it goes behind budgeted requests, until it has waited NO_BUDGET_DUE_S."""
    monkeypatch.setattr("npas_serve.engine.run.NO_BUDGET_DUE_S", 0.2)
    device = Device(hold=True)
    s = BatchScheduler(device, lambda runs: 1.0, max_examples=1)
    s.submit([run("hold")])
    assert device.entered.wait(10)
    s.submit([run("patient")])
    time.sleep(0.25)                              # it has now waited past its due time
    s.submit([run("budgeted", budget_ms=1_000)])
    device.release.set()
    wait_for(lambda: s.batches == 3)
    assert device.batches == [["hold"], ["patient"], ["budgeted"]]
    s.close()
