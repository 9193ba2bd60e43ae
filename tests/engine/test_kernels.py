"""engine/kernels.py: small rounds run with oneDNN off, the crossover is measured, answers do not change."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from npas_serve.engine import Engine, EngineConfig
from npas_serve.engine import kernels
from npas_serve.engine.kernels import onednn, onednn_from
from npas_serve.engine.planner import Step
from npas_serve.protocol import InferenceRequest


def test_onednn_sets_the_switch_inside_and_restores_it_after_an_error():
    before = torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError):
        with onednn(not before):
            assert torch.backends.mkldnn.enabled is (not before)
            raise RuntimeError("the stage failed")
    assert torch.backends.mkldnn.enabled is before


def fake_timing(native_wins_below: int):
    """time_ms for onednn_from: oneDNN costs 10 ms at every batch, native 1 ms per example."""
    def time_ms(batch: int) -> float:
        return 10.0 if torch.backends.mkldnn.enabled else float(batch) * 10.0 / native_wins_below
    return time_ms


@pytest.mark.parametrize("crossover", [2, 4, 8])
def test_the_crossover_is_the_first_batch_where_onednn_is_as_fast(crossover):
    assert onednn_from(fake_timing(crossover), batches=(2, 4, 8, 16), reps=1) == crossover


def test_native_winning_everywhere_still_hands_the_largest_batch_to_onednn():
    assert onednn_from(lambda b: 1.0 if not torch.backends.mkldnn.enabled else 5.0, batches=(2, 4, 16)) == 16


def test_without_onednn_built_in_nothing_is_switched(monkeypatch):
    monkeypatch.setattr(kernels.torch.backends.mkldnn, "is_available", lambda: False)
    assert onednn_from(lambda b: pytest.fail("nothing is timed"), batches=(2, 4)) == 1


@pytest.fixture(scope="module")
def engine(served_checkpoint):
    engine = Engine.load(served_checkpoint, EngineConfig(warmup_batch_sizes=(1, 4)))
    yield engine
    engine.close()


def test_the_engine_measures_its_crossover_at_load(engine):
    assert engine._stages.onednn_from in (*kernels.CANDIDATES, 1)


def test_a_stage_below_the_crossover_runs_with_onednn_off(engine, monkeypatch):
    seen = []
    step = Step(0, 0)
    real = engine._stages.traces.stage(step) if engine._stages.traces else None
    stage = real or engine._stages._eager[step]

    def spy(h, *weights):
        seen.append((len(h), torch.backends.mkldnn.enabled))
        return stage(h, *weights)
    monkeypatch.setattr(engine._stages, "_eager", {**engine._stages._eager, step: spy})
    if engine._stages.traces is not None:
        monkeypatch.setattr(engine._stages.traces, "stage", lambda s: None)
    monkeypatch.setattr(engine._stages, "onednn_from", 4)
    with torch.inference_mode():
        for batch in (3, 4):
            engine._stages.run(step, torch.randn(batch, *engine.limits.input_shape))
    assert seen == [(3, False), (4, torch.backends.mkldnn.enabled)]
    assert torch.backends.mkldnn.enabled          # restored after the stage


@pytest.mark.parametrize("batch", [2, 5])
def test_answers_are_those_of_onednn_at_every_batch(engine, monkeypatch, batch):
    x = np.random.default_rng(batch).normal(size=(batch, 1, 40)).astype(np.float32)
    answers = []
    for crossover in (1, 16):            # oneDNN always, then never below 16
        monkeypatch.setattr(engine._stages, "onednn_from", crossover)
        answers.append(engine.answer(InferenceRequest(inputs=x)))
    a, b = answers
    assert a.predictions == b.predictions and a.members_used == b.members_used
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-5, atol=1e-6)
