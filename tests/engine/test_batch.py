"""Requests run together: each member once per batch, each request its own answers, leaving when it is done."""
from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest

from npas_serve.engine.planner import SAFETY
from npas_serve.engine import Cancelled, DeadlineExceeded, Engine, EngineConfig, ResourceExhausted
from npas_serve.protocol import InferenceRequest
from tests.support.wait import wait_until


@pytest.fixture(scope="module")
def engine(served_checkpoint):
    engine = Engine.load(served_checkpoint, EngineConfig(warmup_batch_sizes=(1, 4)))
    yield engine
    engine.close()


def mixed(names: list[str]) -> list[tuple[InferenceRequest, bool]]:
    """(request, streamed): ensemble sizes, explicit members, anytime exits, min_confidence, roomy budgets."""
    rng = np.random.default_rng(7)
    x = lambda n: rng.normal(size=(n, 1, 40)).astype(np.float32)  # noqa: E731
    requests = [
        (InferenceRequest(inputs=x(2), ensemble_size=1, request_id="e1"), False),
        (InferenceRequest(inputs=x(1), request_id="e-all"), True),
        (InferenceRequest(inputs=x(3), members=(names[-1], names[0]), request_id="e-members"), True),
        (InferenceRequest(inputs=x(1), mode="anytime", request_id="a-all"), True),
        (InferenceRequest(inputs=x(2), mode="anytime", exit=0, request_id="a-0"), False),
        (InferenceRequest(inputs=x(1), mode="anytime", members=(names[1],), exit=1, request_id="a-m1"), True),
        (InferenceRequest(inputs=x(4), mode="anytime", min_confidence=0.0, request_id="a-conf"), False),
        (InferenceRequest(inputs=x(1), budget_ms=30_000, request_id="budget"), False),
    ]
    return requests


def collect(engine, pairs, hold: threading.Event | None = None):
    """Submit all at once (one batch), return each request's answers."""
    boxes = [[] for _ in pairs]
    runs = engine.submit([r for r, _ in pairs], [box.append for box in boxes], [s for _, s in pairs])
    end = time.monotonic() + 60
    while not all(r.done for r in runs) and time.monotonic() < end:
        time.sleep(0.005)
    assert all(r.done for r in runs)
    return boxes, runs


def test_requests_batched_together_get_the_answers_they_get_alone(engine):
    pairs = mixed(engine.names)
    alone = [collect(engine, [p])[0][0] for p in pairs]
    together, runs = collect(engine, pairs)
    assert {r.batch_examples for r in runs} == {sum(r.examples for r in runs)}     # one batch, all of them
    for got, expected in zip(together, alone):
        assert [a.final for a in got] == [a.final for a in expected] and got[-1].final
        for a, b in zip(got, expected):
            # under a budget the planner ranks members by accuracy per predicted ms, which moves with the batch
            order = sorted if a.budget_ms is not None else list
            assert (a.request_id, order(a.members_used), a.exit_reached, order(a.plan), a.predictions) == \
                   (b.request_id, order(b.members_used), b.exit_reached, order(b.plan), b.predictions)
            np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
            np.testing.assert_allclose(a.entropy, b.entropy, atol=1e-5)
            np.testing.assert_allclose(a.disagreement, b.disagreement)


def test_each_member_stage_is_generated_once_per_batch(engine, monkeypatch):
    calls = []           # every (member, stage) whose weights are generated, one by one or several at once
    generate = engine._stages._generate      # traced or eager, every generation goes through it
    monkeypatch.setattr(engine._stages, "_generate",
                        lambda steps: calls.extend((s.member, s.stage) for s in steps) or generate(steps))
    x = np.zeros((1, 1, 40), np.float32)
    collect(engine, [(InferenceRequest(inputs=x, request_id=str(i)), False) for i in range(12)])
    assert sorted(calls) == sorted({(m, s) for m in range(len(engine.names)) for s in range(engine.num_exits)})


def test_anytime_requests_leave_at_their_exit_and_the_rest_go_on(engine):
    x = np.zeros((1, 1, 40), np.float32)
    (shallow, deep), runs = collect(engine, [(InferenceRequest(inputs=x, mode="anytime", exit=0), True),
                                             (InferenceRequest(inputs=x, mode="anytime"), True)])
    assert [a.exit_reached for a in shallow] == [0] and shallow[0].final
    assert [a.exit_reached for a in deep] == list(range(engine.num_exits))
    assert runs[0].generation_s < runs[1].generation_s       # it stopped costing when it left


def test_a_request_cancelled_mid_batch_is_dropped_and_the_others_answered(engine):
    x = np.zeros((1, 1, 40), np.float32)
    holder, ready = [], threading.Event()

    def cancel_after_first(item):
        gone.append(item)
        ready.wait(5)
        holder[0].cancel()                   # the caller gives up after its first refined answer

    gone, kept = [], []
    holder += engine.submit([InferenceRequest(inputs=x), InferenceRequest(inputs=x)],
                            [cancel_after_first, kept.append], intermediate=True)
    ready.set()
    end = time.monotonic() + 30
    while not all(r.done for r in holder) and time.monotonic() < end:
        time.sleep(0.005)
    assert len(gone) == 2 and isinstance(gone[-1], Cancelled)
    assert len(holder[0].members_run) == 1
    assert kept[-1].final and len(kept[-1].members_used) == len(engine.names)


def test_a_member_taken_whole_runs_in_one_call_unless_something_may_leave_between_its_stages(engine, monkeypatch):
    calls = []
    run, run_member = engine._stages.run, engine._stages.run_member
    monkeypatch.setattr(engine._stages, "run", lambda step, h: calls.append("stage") or run(step, h))
    monkeypatch.setattr(engine._stages, "run_member", lambda m, h: calls.append("member") or run_member(m, h))
    x = np.zeros((1, 1, 40), np.float32)
    n, exits = len(engine.names), engine.num_exits

    collect(engine, [(InferenceRequest(inputs=x), False)])
    assert calls == ["member"] * n
    calls.clear()
    collect(engine, [(InferenceRequest(inputs=x, mode="anytime"), False)])     # it leaves at its exits
    assert calls == ["stage"] * exits
    calls.clear()
    # a deadline the member is predicted to outlast: checked between stages (an idle engine runs it anyway)
    monkeypatch.setattr(engine.cost, "member_ms", lambda member, batch, upto=None: 120_000.0)
    deadline = time.time() * 1000 + 60_000
    (answers,), _ = collect(engine, [(InferenceRequest(inputs=x, deadline_unix_ms=deadline), False)])
    assert answers[-1].final and calls == ["stage"] * exits * len(answers[-1].members_used)


def test_the_plan_counts_the_queue_ahead(engine, monkeypatch):
    """A budget the whole ensemble fits alone, but not after the predicted wait: fewer members."""
    x = np.zeros((1, 1, 40), np.float32)
    costs = [engine.cost.member_ms(m, 1) for m in range(len(engine.names))]
    whole = max(costs) * len(engine.names) * 20     # roomy even when a loaded machine runs slower than predicted
    assert len(engine.answer(InferenceRequest(inputs=x, budget_ms=whole)).members_used) == len(engine.names)
    monkeypatch.setattr(engine.scheduler, "expected_wait_ms", lambda examples: whole - 1.5 * min(costs))   # room for one member, not two
    assert len(engine.answer(InferenceRequest(inputs=x, budget_ms=whole)).members_used) == 1


def test_an_observer_that_fails_does_not_fail_the_answers(engine):
    def broken(observation):
        raise RuntimeError("metrics backend down")

    engine.add_observer(broken)
    try:
        x = np.zeros((1, 1, 40), np.float32)
        assert engine.answer(InferenceRequest(inputs=x)).final
    finally:
        engine._observers.remove(broken)


def test_a_queued_request_past_its_deadline_is_refused_while_the_device_is_busy(engine, monkeypatch):
    """Between the steps of a running batch, the queue is checked: the refusal does not wait for the batch."""
    x = np.zeros((1, 1, 40), np.float32)
    events, late = [], []

    def first(item):
        events.append(("running", item.final))
        if not late:                          # queue a request whose deadline passes before the next step
            late.extend(engine.submit([InferenceRequest(inputs=x, deadline_unix_ms=time.time() * 1000 + 2)],
                                      [lambda i: events.append(("late", type(i).__name__))]))
            time.sleep(0.02)

    # admitted although the planner would refuse it (its deadline is shorter than any answer): this
    # test is about the queue's check, so admission is told the device is free and the work instant
    monkeypatch.setattr(engine.scheduler, "expected_wait_ms", lambda examples: 0.0)
    monkeypatch.setattr(engine.planner, "first_answer_ms", lambda plan, batch: 0.0)
    running, = engine.submit([InferenceRequest(inputs=x)], [first], intermediate=True)
    end = time.monotonic() + 30
    while not (running.done and late and late[0].done) and time.monotonic() < end:
        time.sleep(0.005)
    assert ("late", "DeadlineExceeded") in events
    assert events.index(("late", "DeadlineExceeded")) < events.index(("running", True))


def test_a_deadline_the_queue_ahead_makes_unreachable_is_refused_at_admission(engine, monkeypatch):
    """Predicted to miss its deadline before its first answer, given the queue: refused at once, nothing
    computed; the same deadline with the device free is answered, and a bare budget is never refused."""
    x = np.zeros((1, 1, 40), np.float32)
    seen = []
    engine.add_observer(seen.append)
    try:
        assert engine.answer(InferenceRequest(inputs=x, deadline_unix_ms=time.time() * 1000 + 5_000)).final
        monkeypatch.setattr(engine.scheduler, "expected_wait_ms", lambda examples: 10_000.0)
        monkeypatch.setattr(engine.scheduler, "ahead_examples", lambda: 1)        # the device is busy
        with pytest.raises(ResourceExhausted, match="deadline_unix_ms: the queue ahead"):
            engine.answer(InferenceRequest(inputs=x, deadline_unix_ms=time.time() * 1000 + 5_000))
        assert seen[-1].status == "overloaded" and seen[-1].members_run == [] and seen[-1].generation_s == 0
        late = engine.answer(InferenceRequest(inputs=x, budget_ms=5_000))   # planned as late, still answered
        assert late.final and len(late.members_used) == 1
    finally:
        engine._observers.remove(seen.append)


def test_an_idle_engine_runs_what_its_cost_model_would_refuse_and_learns_from_it(engine, monkeypatch):
    """A cost model inflated by a burst (here 10,000x) does not lock the server into refusing: with the
    device free, a deadline it predicts to miss is run, answered, and its prediction corrected."""
    x = np.zeros((1, 1, 40), np.float32)
    monkeypatch.setattr(engine.cost, "correction", engine.cost.correction * 10_000)
    deadline_ms, inflated = 200.0, engine.cost.correction.copy()
    # the previous test's last round may still be closing
    assert wait_until(lambda: engine.scheduler.ahead_examples() == 0, timeout_s=10, interval_s=0.001)
    fastest = min(engine.planner.first_answer_ms(engine.planner.ensemble(1, None, [m], None), 1)
                  for m in range(len(engine.names)))
    assert fastest * SAFETY > deadline_ms          # busy, it would be refused at admission
    answer = engine.answer(InferenceRequest(inputs=x, deadline_unix_ms=time.time() * 1000 + deadline_ms))
    assert answer.final and answer.members_used
    m = engine.names.index(answer.members_used[0])
    assert (engine.cost.correction[m] < inflated[m]).all()       # what ran corrected its prediction


def test_a_newcomer_joins_between_members_instead_of_waiting_for_the_whole_plan(engine):
    """Continuous batching: a request queued while another runs joins at the next member, and a more
    urgent one (a budget against none) gets its member before the other's remaining ones."""
    x = np.zeros((1, 1, 40), np.float32)
    order, joined = [], []

    def first(item):
        order.append(("whole", item.final))
        if not joined:
            joined.extend(engine.submit([InferenceRequest(inputs=x, ensemble_size=1, budget_ms=5_000)],
                                        [lambda i: order.append(("newcomer", i.final))]))

    whole, = engine.submit([InferenceRequest(inputs=x)], [first], intermediate=True)
    end = time.monotonic() + 30
    while not (whole.done and joined and joined[0].done) and time.monotonic() < end:
        time.sleep(0.005)
    assert order.index(("newcomer", True)) < order.index(("whole", True))
    assert joined[0].batch_examples == 2           # it ran beside the request in flight
    assert len(order) == len(engine.names) + 1


def test_a_refinement_gives_way_to_a_newcomers_first_answer(engine):
    """A request that has an answer ends with it when its next member no longer fits its budget behind a
    newcomer's first member (it would fit alone); the newcomer goes first instead of waiting for it."""
    x = np.zeros((1, 1, 40), np.float32)
    first_member, second = engine.planner.member_order[:2]
    events, held, joined = [], [], []

    def answered(item):
        events.append(("held", item.final, len(item.members_used)))
        if joined:
            return
        joined.extend(engine.submit([InferenceRequest(inputs=x, members=(engine.names[first_member],))],
                                    [lambda i: events.append(("newcomer", i.final))]))
        # wait (on the device thread, so nothing runs meanwhile) until the held request's next member
        # would fit on its own but not behind the newcomer's
        alone = engine.cost.member_ms(second, 1)
        behind = alone + engine.cost.member_ms(first_member, 1)
        left_ms = (alone + behind) / 2 / SAFETY
        run = held[0]
        time.sleep(max(0.0, run.started + (run.budget_ms - left_ms) / 1000 - time.perf_counter()))

    budget = 50 * sum(engine.cost.member_ms(m, 1) for m in range(len(engine.names)))
    held.extend(engine.submit([InferenceRequest(inputs=x, budget_ms=budget)], [answered], intermediate=True))
    end = time.monotonic() + 30
    while not (held[0].done and joined and joined[0].done) and time.monotonic() < end:
        time.sleep(0.005)
    assert events[0] == ("held", False, 1)
    assert events[1] == ("held", True, 1)        # ended with the answer it had, before the newcomer ran
    assert events[2] == ("newcomer", True)


def test_a_torchserve_batch_is_planned_to_the_tightest_budget_of_its_requests(engine):
    """TorchServe returns a batch's answers at once: a roomy request planned to its own budget would
    hold a tight neighbour's answer past its budget, so it runs what the tight one can afford."""
    x = np.zeros((1, 1, 40), np.float32)
    one = min(engine.cost.member_ms(m, 2) for m in range(len(engine.names)))
    tight = InferenceRequest(inputs=x, budget_ms=1.2 * one / SAFETY, request_id="tight")   # one member
    roomy = InferenceRequest(inputs=x, budget_ms=60_000, request_id="roomy")
    assert len(engine.answer(roomy).members_used) == len(engine.names)       # alone: the whole ensemble
    answers = engine.answer_batch([tight, roomy])
    assert [len(a.members_used) for a in answers] == [1, 1]


def test_a_delivery_that_fails_loses_only_its_own_answer(engine):
    x = np.zeros((1, 1, 40), np.float32)

    def gone(item):
        raise RuntimeError("the caller's connection is gone")

    kept = []
    runs = engine.submit([InferenceRequest(inputs=x, request_id="gone"), InferenceRequest(inputs=x, request_id="kept")],
                         [gone, kept.append])
    end = time.monotonic() + 30
    while not all(r.done for r in runs) and time.monotonic() < end:
        time.sleep(0.005)
    assert len(kept) == 1 and kept[0].final and kept[0].request_id == "kept"


def test_a_passed_deadline_is_refused_at_once_and_names_no_member(engine, monkeypatch):
    """Refused before any work for it: not normalised, not planned (an overloaded server's backlog is
    mostly such requests, and each one cost 71 us of the event loop's time when it was planned first)."""
    x = np.zeros((1, 1, 40), np.float32)
    seen = []
    engine.add_observer(seen.append)
    for unused in ("_inputs", "_plan"):
        monkeypatch.setattr(engine, unused, lambda *args: pytest.fail("work done for a request nobody waits for"))
    try:
        for mode in ("ensemble", "anytime"):
            with pytest.raises(DeadlineExceeded, match="passed before the request was run"):
                engine.answer(InferenceRequest(inputs=x, mode=mode, deadline_unix_ms=time.time() * 1000 - 1))
            assert (seen[-1].status, seen[-1].members_run, seen[-1].generation_s) == ("deadline", [], 0)
    finally:
        engine._observers.remove(seen.append)


def test_device_time_counts_the_rounds_and_shows_a_thread_that_holds_the_gil(engine):
    """`take_device_time`: the device thread's wall time in rounds and its CPU time in them, since the
    last take. A Python thread that never blocks keeps the GIL from the device thread between its
    operators: the rounds then take far more wall time than CPU, the gap the metrics expose."""
    x = np.random.default_rng(11).normal(size=(1, 1, 40)).astype(np.float32)

    def serve(n: int) -> tuple[float, float]:
        engine.take_device_time()
        for i in range(n):
            engine.answer(InferenceRequest(inputs=x, request_id=f"t{i}"))
        return engine.take_device_time()

    busy, cpu = serve(5)
    assert busy > 0 and 0 < cpu <= busy + 0.01      # thread_time ticks are coarser than perf_counter's
    assert engine.take_device_time() == (0.0, 0.0)  # taken: counted once

    stop, spins = threading.Event(), [0]

    def spin() -> None:
        while not stop.is_set():
            spins[0] += 1

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        assert wait_until(lambda: spins[0] > 1000, timeout_s=10, interval_s=0.001)   # spinning, on a core
        busy, cpu = serve(5)
    finally:
        stop.set()
        spinner.join(10)
    assert cpu < 0.5 * busy, (busy, cpu)


def test_a_steps_answers_are_delivered_inside_one_group(engine):
    """`deliver_together`: the answers a step ends are given inside one `group()`, so a transport can
    write them at once; requests run in one batch get their answers in one group."""
    try:
        log: list = []

        @contextlib.contextmanager
        def group():
            log.append("open")
            yield
            log.append("close")

        engine.deliver_together(group)
        x = np.zeros((1, 1, 40), np.float32)
        runs = engine.submit([InferenceRequest(inputs=x, ensemble_size=1, request_id=f"r{i}") for i in range(3)],
                             [lambda item: log.append(item.request_id) for _ in range(3)])
        assert wait_until(lambda: all(r.done for r in runs), timeout_s=30)
        assert log == ["open", "r0", "r1", "r2", "close"]
    finally:
        engine.deliver_together(contextlib.nullcontext)      # the module's engine, as the other tests have it
