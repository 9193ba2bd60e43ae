"""The ensemble combination, on numbers worked by hand."""
from __future__ import annotations

import math

import torch

from npas_serve.ensemble import combine


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
