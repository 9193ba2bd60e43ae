"""The engine: answers, uncertainty, anytime stopping, resident memory, cache."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from npas_serve.checkpoint import load_checkpoint
from npas_serve.engine import Engine, EngineConfig
from npas_serve.engine.run import DeadlineExceeded
from npas_serve.ensemble import Temperatures, combine
from npas_serve.layers import SharedLayer
from npas_serve.protocol import InferenceRequest


@pytest.fixture(scope="module")
def engine(served_checkpoint):
    engine = Engine.load(served_checkpoint, EngineConfig(warmup_batch_sizes=(1, 4)))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).normal(size=(6, 1, 40)).astype(np.float32)


def direct_probs(checkpoint, x) -> torch.Tensor:
    """Final-exit softmax of every member, computed straight from the family."""
    family, manifest = load_checkpoint(checkpoint)
    norm = manifest.normalisation
    with torch.no_grad():
        return torch.stack([e[-1].softmax(-1) for e in family(torch.from_numpy(norm.apply(x)))])


def temperatures(engine) -> Temperatures:
    """What `eval` fitted on the validation split; every answer is calibrated at them."""
    found = Temperatures.from_report(engine.manifest.report)
    assert len(found.ensemble) == len(engine.names) and any(t != 1.0 for t in found.ensemble)
    return found


def test_ensemble_is_the_mean_of_the_chosen_members(engine, served_checkpoint, x):
    probs = direct_probs(served_checkpoint, x)
    order = [engine.names.index(n) for n in engine.manifest.report["member_order"]]
    for k in range(1, len(engine.names) + 1):
        answer = engine.answer(InferenceRequest(inputs=x, ensemble_size=k))
        assert answer.members_used == [engine.names[m] for m in order[:k]]
        expected = combine(list(probs[order[:k]]), temperature=temperatures(engine).for_ensemble(k))
        np.testing.assert_allclose(answer.probabilities, expected.probabilities.numpy(), atol=1e-5)


def test_uncertainty_is_entropy_and_disagreement(engine, served_checkpoint, x):
    """The engine answers with `combine` of the members' softmax (its maths: tests/test_ensemble.py)."""
    expected = combine(list(direct_probs(served_checkpoint, x)),
                       temperature=temperatures(engine).for_ensemble(len(engine.names)))
    answer = engine.answer(InferenceRequest(inputs=x))
    assert answer.predictions == expected.predictions.tolist()
    np.testing.assert_allclose(answer.entropy, expected.entropy.numpy(), atol=1e-4)
    np.testing.assert_allclose(answer.disagreement, expected.disagreement.numpy())


def test_anytime_uncertainty_is_the_latest_exit_judged_by_the_exits_so_far(engine, served_checkpoint, x):
    family, manifest = load_checkpoint(served_checkpoint)
    answer = engine.answer(InferenceRequest(inputs=x, mode="anytime", members=(engine.names[0],), exit=1))
    with torch.no_grad():
        exits = [o.softmax(-1) for o in family.iter_exits(torch.from_numpy(manifest.normalisation.apply(x)), 0, 1)]
    expected = combine(exits, exits[-1], temperatures(engine).for_exit(engine.names[0], 1))
    np.testing.assert_allclose(answer.probabilities, expected.probabilities.numpy(), atol=1e-5)
    np.testing.assert_allclose(answer.entropy, expected.entropy.numpy(), atol=1e-4)
    np.testing.assert_allclose(answer.disagreement, expected.disagreement.numpy())


def test_anytime_streams_every_exit_then_stops(engine, x):
    answers = list(engine.answers(InferenceRequest(inputs=x, mode="anytime")))
    assert [a.exit_reached for a in answers] == [0, 1, 2]
    assert [a.final for a in answers] == [False, False, True]
    assert engine.answer(InferenceRequest(inputs=x, mode="anytime", exit=1)).exit_reached == 1


def test_anytime_stops_at_min_confidence(engine, x):
    answers = list(engine.answers(InferenceRequest(inputs=x, mode="anytime", min_confidence=0.0)))
    assert len(answers) == 1 and answers[0].final and answers[0].exit_reached == 0


def test_budget_is_reported(engine, x):
    roomy = engine.answer(InferenceRequest(inputs=x, budget_ms=50_000))
    assert roomy.budget_met is True and roomy.budget_ms == 50_000
    assert engine.answer(InferenceRequest(inputs=x)).budget_met is None


def test_a_deadline_passed_before_any_answer_is_refused_not_run(engine, x):
    seen = []
    engine.add_observer(seen.append)
    with pytest.raises(DeadlineExceeded):
        engine.answer(InferenceRequest(inputs=x, deadline_unix_ms=time.time() * 1000 - 1000))
    assert seen[-1].status == "deadline" and seen[-1].members_run == [] and seen[-1].generation_s == 0


def test_a_deadline_passing_mid_run_makes_the_best_answer_so_far_final(engine, x):
    """The deadline passes once the first member has answered: that answer is repeated as final."""
    holder, ready = [], threading.Event()

    def deliver(item):
        got.append(item)
        if len(got) == 1:
            ready.wait(5)
            holder[0].deadline_at = 0.0          # perf_counter() is past it from now on

    got = []
    holder += engine.submit([InferenceRequest(inputs=x, deadline_unix_ms=time.time() * 1000 + 60_000)],
                            [deliver], intermediate=True)
    ready.set()
    end = time.monotonic() + 30
    while not holder[0].done and time.monotonic() < end:
        time.sleep(0.01)
    assert [a.final for a in got] == [False, True]
    assert got[0].members_used == got[1].members_used and len(got[1].members_used) == 1
    np.testing.assert_allclose(got[0].probabilities, got[1].probabilities)


def test_resident_bytes_are_the_shared_parameters_only(engine, x):
    engine.answer(InferenceRequest(inputs=x))
    resident = engine.resident_bytes()
    state = engine.family.state_dict()
    assert resident.total == sum(t.numel() * t.element_size() for t in state.values())
    assert resident.cache == 0
    assert resident.bank == engine.family.generator.bank_numel() * 4
    # no generated weight outlives a request
    assert all(m.weight is None for m in engine.family.modules() if isinstance(m, SharedLayer))
    unshared = sum(s.numel for s in engine.family.slots) * 4
    assert resident.bank < unshared


def test_cache_is_bounded_in_bytes_and_hits(served_checkpoint, x):
    eng = Engine.load(served_checkpoint, EngineConfig(cache_bytes=10**9, warmup_batch_sizes=(1,)))
    eng.answer(InferenceRequest(inputs=x))
    hits = eng.cache.hits
    eng.answer(InferenceRequest(inputs=x))
    assert eng.cache.hits > hits and 0 < eng.resident_bytes().cache <= 10**9
    small = Engine.load(served_checkpoint, EngineConfig(cache_bytes=1, warmup_batch_sizes=(1,)))
    small.answer(InferenceRequest(inputs=x))
    assert small.resident_bytes().cache == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_runs_on_cuda(served_checkpoint, x):
    eng = Engine.load(served_checkpoint, EngineConfig(device="cuda", warmup_batch_sizes=(1,)))
    answer = eng.answer(InferenceRequest(inputs=x))
    assert next(eng.family.parameters()).is_cuda and answer.probabilities.shape == (6, 10)


def test_observations_carry_each_requests_cache_hits_and_metrics_leave_the_engine_alone(served_checkpoint, x):
    from npas_serve.servers.metrics import PrometheusSink, record

    eng = Engine.load(served_checkpoint, EngineConfig(cache_bytes=10**9, warmup_batch_sizes=(1,)))
    sink = PrometheusSink("npas")
    seen = []
    eng.add_observer(seen.append)
    eng.add_observer(lambda obs: record(sink, eng, obs))
    eng.answer(InferenceRequest(inputs=x, ensemble_size=1))       # warm-up filled the cache already
    eng.answer(InferenceRequest(inputs=x, ensemble_size=1))
    stages = eng.num_exits
    assert [o.cache_hits for o in seen] == [stages, stages]
    hits_before = eng.cache.hits
    assert hits_before >= 2 * stages                                # recording did not reset it
    value = sink.registry.get_sample_value("npas_cache_hits_total", {"ModelName": "npas"})
    assert value == 2 * stages
