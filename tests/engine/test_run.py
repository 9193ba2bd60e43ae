"""A request's run: the budget it starts with, and what it reports when it ends."""
from __future__ import annotations

import numpy as np
import pytest

import time

from npas_serve.engine.run import RequestRun, WaysIn, effective_budget_ms, way_back_ms
from npas_serve.engine.stages import StageResult
from npas_serve.protocol import InferenceRequest


def test_the_tighter_of_budget_and_deadline_counts():
    assert effective_budget_ms(None, None, 1000.0) is None
    assert effective_budget_ms(50.0, None, 1000.0) == 50.0
    assert effective_budget_ms(None, 1030.0, 1000.0) == 30.0
    assert effective_budget_ms(50.0, 1030.0, 1000.0) == 30.0
    assert effective_budget_ms(20.0, 1030.0, 1000.0) == 20.0
    assert effective_budget_ms(None, 990.0, 1000.0) == -10.0     # already past: nothing left


def test_a_deadline_keeps_the_way_in_for_the_way_back():
    assert way_back_ms(1100.0, 990.0, 1000.0) == 10.0             # 10 ms on the way in: 10 kept
    assert way_back_ms(1020.0, 950.0, 1000.0) == 10.0             # at most half of what is left
    assert way_back_ms(1100.0, 1005.0, 1000.0) == 0.0             # a client clock ahead: nothing
    assert way_back_ms(None, 990.0, 1000.0) == way_back_ms(1100.0, None, 1000.0) == 0.0
    now = time.time() * 1000
    x = np.zeros((1, 2), np.float32)
    sent = RequestRun.start(InferenceRequest(inputs=x, deadline_unix_ms=now + 100, sent_unix_ms=now - 20))
    plain = RequestRun.start(InferenceRequest(inputs=x, deadline_unix_ms=now + 100))
    assert 15 < plain.budget_ms - sent.budget_ms <= 25 and sent.deadline_at == pytest.approx(plain.deadline_at, abs=0.01)


def test_the_way_back_is_the_slowest_tenth_of_recent_ways_in_when_longer_than_its_own():
    assert way_back_ms(1100.0, 990.0, 1000.0, recent_ms=30.0) == 30.0     # its own 10 ms, recent ones 30
    assert way_back_ms(1100.0, 950.0, 1000.0, recent_ms=30.0) == 50.0     # its own is longer
    assert way_back_ms(1040.0, 990.0, 1000.0, recent_ms=30.0) == 20.0     # at most half of what is left
    assert way_back_ms(None, 990.0, 1000.0, recent_ms=30.0) == 0.0        # no deadline: nothing to keep
    ways = WaysIn()
    for ms in range(1, 161):                     # 1..160 ms: their 90th percentile, 144
        ways.add(float(ms))
    assert 140 <= ways.reserve_ms <= 148
    for _ in range(WaysIn.SIZE):                 # a calm spell replaces a congested one
        ways.add(2.0)
    assert ways.reserve_ms == 2.0
    now = time.time() * 1000
    x = np.zeros((1, 2), np.float32)
    ways = WaysIn()
    for _ in range(20):                          # recent requests took 30 ms to arrive
        RequestRun.start(InferenceRequest(inputs=x, deadline_unix_ms=now + 200, sent_unix_ms=now - 30), ways)
    fast = RequestRun.start(InferenceRequest(inputs=x, deadline_unix_ms=now + 100, sent_unix_ms=now - 1), ways)
    assert 25 <= fast.way_back_ms <= 35 and fast.budget_ms < 75


def test_stage_results_add_up_in_the_observation():
    run = RequestRun.start(InferenceRequest(inputs=np.zeros((1, 2), np.float32), budget_ms=5.0))
    assert run.budget_ms == 5.0
    for hits in (1, 0):
        run.count(StageResult(None, None, 2.0, 0.25, hits))
    run.members_run.append("m0")
    obs = run.observation("ok")
    assert (obs.mode, obs.status, obs.members_run, obs.generation_s, obs.cache_hits) == \
        ("ensemble", "ok", ["m0"], 0.5, 1)
    assert obs.exit_depth is None and obs.budget_missed is False and obs.latency_s >= 0


def test_requests_answered_together_end_when_the_tightest_budget_ends():
    x = np.zeros((1, 1, 40), np.float32)
    runs = [RequestRun.start(InferenceRequest(inputs=x, budget_ms=b)) for b in (50.0, 20.0, None)]
    RequestRun.end_together(runs)
    ends = [r.started * 1000 + r.budget_ms for r in runs[:2]]
    assert ends[0] == pytest.approx(ends[1]) and runs[1].budget_ms == pytest.approx(20.0)
    assert runs[2].budget_ms is None            # no budget: none imposed
