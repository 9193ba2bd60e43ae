"""The ensemble combination, on numbers worked by hand."""
from __future__ import annotations

import math

import pytest
import torch

from npas_serve.ensemble import Temperatures, calibrate, combine, fit_temperature


def test_mean_entropy_and_disagreement_of_two_members():
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    b = torch.tensor([[0.3, 0.7], [0.4, 0.6]])
    c = combine([a, b])
    torch.testing.assert_close(c.probabilities, torch.tensor([[0.6, 0.4], [0.3, 0.7]]))
    assert c.predictions.tolist() == [0, 1]
    expected = [-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)), -(0.3 * math.log(0.3) + 0.7 * math.log(0.7))]
    torch.testing.assert_close(c.entropy, torch.tensor(expected))
    assert c.disagreement.tolist() == [0.5, 0.0]       # b votes 1 against the answer's 0 on the first example


def test_a_given_answer_is_kept_and_judged_by_every_voter():
    early, late = torch.tensor([[0.45, 0.55]]), torch.tensor([[0.8, 0.2]])
    c = combine([early, late], late)
    assert c.probabilities is late and c.predictions.tolist() == [0]
    assert c.disagreement.tolist() == [0.5]


def test_a_certain_answer_has_zero_entropy():
    c = combine([torch.tensor([[1.0, 0.0, 0.0]])])
    assert c.entropy.tolist() == [0.0] and c.disagreement.tolist() == [0.0]


def test_calibrate_at_one_is_the_answer_and_keeps_the_top_class_at_any_temperature():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    assert calibrate(p, 1.0) is p
    for t in (0.3, 2.0, 7.0):
        q = calibrate(p, t)
        torch.testing.assert_close(q.sum(dim=1), torch.ones(2))
        assert q.argmax(dim=1).tolist() == [0, 2]
    assert calibrate(p, 2.0)[0, 0] < 0.7 < calibrate(p, 0.5)[0, 0]     # T > 1 softens, T < 1 sharpens
    # softmax(log p / T) is p^(1/T), renormalised
    expected = p ** 0.5 / (p ** 0.5).sum(dim=1, keepdim=True)
    torch.testing.assert_close(calibrate(p, 2.0), expected)


def test_fit_temperature_recovers_the_over_confidence_it_was_given():
    """Labels drawn from softmax(z); answers given as softmax(3 z): the fitted temperature is about 3."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 5, generator=gen)
    y = torch.multinomial(z.softmax(-1), 1, generator=gen)[:, 0]
    t = fit_temperature((3 * z).softmax(-1), y)
    assert t == pytest.approx(3.0, rel=0.05)
    assert fit_temperature(z.softmax(-1), y) == pytest.approx(1.0, rel=0.05)


def test_combine_applies_the_temperature_to_the_answer_only():
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    b = torch.tensor([[0.3, 0.7], [0.4, 0.6]])
    plain, warm = combine([a, b]), combine([a, b], temperature=2.0)
    torch.testing.assert_close(warm.probabilities, calibrate(plain.probabilities, 2.0))
    assert warm.predictions.tolist() == plain.predictions.tolist()
    assert torch.equal(warm.disagreement, plain.disagreement)
    assert (warm.entropy > plain.entropy).all()


def test_temperatures_from_a_report_and_without_one():
    none = Temperatures.from_report(None)
    assert none.for_ensemble(2) == 1.0 and none.for_exit("m", 0) == 1.0
    found = Temperatures.from_report({"temperatures": {"ensemble": [1.5, 2.0], "exits": {"m": [0.9, 1.1]}}})
    assert found.for_ensemble(2) == 2.0 and found.for_exit("m", 1) == 1.1 and found.for_exit("other", 0) == 1.0
    assert Temperatures.from_report({"temperatures": found.to_dict()}) == found
