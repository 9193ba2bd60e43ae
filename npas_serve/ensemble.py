"""How several softmax outputs become one answer with its uncertainty.

The one copy of this maths: the engine answers with it, evaluation scores
ensembles with it, and the benchmarks check the engine against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Combination:
    probabilities: torch.Tensor   # (B, C): the answer
    predictions: torch.Tensor     # (B,): its top class
    entropy: torch.Tensor         # (B,): predictive entropy of the answer, in nats
    disagreement: torch.Tensor    # (B,): share of voters whose top class differs from the answer's


def combine(voters: Sequence[torch.Tensor], answer: torch.Tensor | None = None) -> Combination:
    """The mean of the voters' probabilities (an ensemble), or `answer` when given (an anytime exit).

    Voters are the members combined, or the exits run so far; each is (B, C) softmax.
    """
    stacked = torch.stack(list(voters))
    answer = stacked.mean(dim=0) if answer is None else answer
    pred = answer.argmax(dim=-1)
    entropy = -(answer * answer.clamp_min(1e-12).log()).sum(dim=-1)
    disagreement = (stacked.argmax(dim=-1) != pred).float().mean(dim=0)
    return Combination(answer, pred, entropy, disagreement)
