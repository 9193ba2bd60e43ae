"""Traced stages and generation: the answers of the eager engine, and eager where a trace would be wrong."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from npas_serve.checkpoint import load_checkpoint
from npas_serve.engine import Engine, EngineConfig
from npas_serve.engine.planner import Step
from npas_serve.engine.traces import Traces
from npas_serve.protocol import InferenceRequest

CONFIG = dict(warmup_batch_sizes=(1, 4))


@pytest.fixture(scope="module")
def engines(served_checkpoint):
    traced, eager = (Engine.load(served_checkpoint, EngineConfig(trace=t, **CONFIG)) for t in (True, False))
    yield traced, eager
    traced.close()
    eager.close()


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("kind", ["ensemble", "anytime", "last member"])
def test_traced_engine_answers_as_the_eager_one(engines, batch, kind):
    traced, _ = engines
    knobs = {"ensemble": {}, "anytime": {"mode": "anytime"}, "last member": {"members": [traced.names[-1]]}}[kind]
    assert traced._stages.traces.eager_stages == []        # every stage of this family traces
    x = np.random.default_rng(batch).normal(size=(batch, 1, 40)).astype(np.float32)
    a, b = (e.answer(InferenceRequest(inputs=x, **knobs)) for e in engines)
    assert a.predictions == b.predictions and a.members_used == b.members_used
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-5, atol=1e-6)


def test_traced_generation_gives_the_generators_weights_for_any_set_of_steps(served_checkpoint):
    """Every member at once, whole members, lone steps and a mix of them, in the order asked for: the
    traces that cover a set (the largest first) give what the generator gives for it."""
    family, manifest = load_checkpoint(served_checkpoint)
    family.eval().requires_grad_(False)
    traces = Traces(family, torch.device("cpu"), None, manifest.input_shape)
    every = [Step(m, s) for m in range(len(family.names)) for s in range(family.num_exits)]
    last = len(family.names) - 1
    member = [Step(last, s) for s in range(family.num_exits)]
    for steps in (every, every[::-1], member, [every[0]], [Step(0, 1), *member, Step(0, 0)]):
        with torch.inference_mode():
            got = traces.weights(steps)
            want = family.steps_weights([(s.member, s.stage) for s in steps])
        assert [len(w) for w in got] == [len(w) for w in want]
        for g, w in zip(got, want):
            for a, b in zip(g, w):
                torch.testing.assert_close(a, b)


def test_every_generation_trace_and_whole_member_is_optimised_at_load(engines):
    """TorchScript optimises a graph on its second call (4-9 ms of CPU for a member's weights): a
    request whose plan first needs a set of members must not pay it. A graph not optimised yet has no
    execution plan to show (`get_debug_state` raises)."""
    traced, _ = engines
    generation = traced._stages.traces._generation
    assert len(generation) == 1 + len(traced.names) * (1 + traced.num_exits)   # all, each member, each step
    for _, _, generate in generation:
        assert len(generate.get_debug_state().execution_plans) == 1
    for member in range(len(traced.names)):           # each member whole, too
        assert len(traced._stages.traces.member(member).get_debug_state().execution_plans) == 1


def test_a_stage_whose_trace_would_bake_its_batch_size_runs_eagerly(served_checkpoint, caplog):
    family, manifest = load_checkpoint(served_checkpoint)
    run_stage = family.run_stage

    def baking(member, stage, h, weights=None):      # a Python int from the shape: a trace would freeze it
        out = run_stage(member, stage, h, weights)
        return out * float(h.shape[0]) / float(h.shape[0] + 1) if (member, stage) == (0, 0) else out
    family.run_stage = baking
    engine = Engine(family, manifest, EngineConfig(**CONFIG))
    try:
        assert engine._stages.traces.eager_stages == [Step(0, 0)]
        assert "runs eagerly" in caplog.text
        x = np.random.default_rng(3).normal(size=(3, 1, 40)).astype(np.float32)
        traced = engine.answer(InferenceRequest(inputs=x, members=[engine.names[0]]))
        family.run_stage = baking                       # the same stage, all eager, for reference
        eager = Engine(family, manifest, EngineConfig(trace=False, **CONFIG))
        try:
            want = eager.answer(InferenceRequest(inputs=x, members=[engine.names[0]]))
        finally:
            eager.close()
        np.testing.assert_allclose(traced.probabilities, want.probabilities, rtol=1e-5, atol=1e-6)
    finally:
        engine.close()
