"""How several softmax outputs become one answer with its uncertainty.

The one copy of this maths: the engine answers with it, evaluation scores
ensembles with it, and the benchmarks check the engine against it.

Temperature scaling (Guo et al., 2017) calibrates an answer: ``softmax(log(p) / T)``,
with ``T`` fitted on held-out validation data by minimising the NLL, one ``T`` per
ensemble size and per (member, exit); it never changes the top class. Evaluation
fits the temperatures and stores them in the report; every answer applies them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class Combination:
    probabilities: torch.Tensor   # (B, C): the answer
    predictions: torch.Tensor     # (B,): its top class
    entropy: torch.Tensor         # (B,): predictive entropy of the answer, in nats
    disagreement: torch.Tensor    # (B,): share of voters whose top class differs from the answer's


def combine(voters: Sequence[torch.Tensor], answer: torch.Tensor | None = None,
            temperature: float = 1.0) -> Combination:
    """The mean of the voters' probabilities (an ensemble), or `answer` when given (an anytime exit),
    calibrated at `temperature`.

    Voters are the members combined, or the exits run so far; each is (B, C) softmax.
    """
    stacked = torch.stack(list(voters))
    answer = calibrate(stacked.mean(dim=0) if answer is None else answer, temperature)
    pred = answer.argmax(dim=-1)
    entropy = -(answer * answer.clamp_min(1e-12).log()).sum(dim=-1)
    disagreement = (stacked.argmax(dim=-1) != pred).float().mean(dim=0)
    return Combination(answer, pred, entropy, disagreement)


def calibrate(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log(p) / T)``: T > 1 softens an over-confident answer, T < 1 sharpens it; T = 1 is `p`."""
    if temperature == 1.0:
        return probabilities
    return torch.softmax(probabilities.clamp_min(1e-12).log() / temperature, dim=-1).to(probabilities.dtype)


def nll(probabilities: torch.Tensor, y: torch.Tensor) -> float:
    return float(-probabilities.gather(1, y[:, None]).clamp_min(1e-12).log().mean())


def fit_temperature(probabilities: torch.Tensor, y: torch.Tensor, low: float = 0.05, high: float = 20.0) -> float:
    """The temperature in [low, high] minimising the NLL of `probabilities` on labels `y`: a grid
    over log T, then a golden-section search around the best grid point (the NLL is smooth in log T)."""
    p = probabilities.double()
    grid = [math.exp(math.log(low) + i * (math.log(high) - math.log(low)) / 40) for i in range(41)]
    losses = [nll(calibrate(p, t), y) for t in grid]
    best = min(range(len(grid)), key=losses.__getitem__)
    a, b = math.log(grid[max(best - 1, 0)]), math.log(grid[min(best + 1, len(grid) - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(30):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if nll(calibrate(p, math.exp(c)), y) <= nll(calibrate(p, math.exp(d)), y):
            b = d
        else:
            a = c
    return math.exp((a + b) / 2)


@dataclass(frozen=True)
class Temperatures:
    """The fitted temperatures: per ensemble size (index k - 1) and per member's exit. Missing ones are 1."""

    ensemble: list[float] = field(default_factory=list)
    exits: dict[str, list[float]] = field(default_factory=dict)

    def for_ensemble(self, size: int) -> float:
        return self.ensemble[size - 1] if 0 < size <= len(self.ensemble) else 1.0

    def for_exit(self, member: str, exit: int) -> float:
        per_exit = self.exits.get(member, [])
        return per_exit[exit] if 0 <= exit < len(per_exit) else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"ensemble": list(self.ensemble), "exits": {k: list(v) for k, v in self.exits.items()}}

    @classmethod
    def from_report(cls, report: dict[str, Any] | None) -> "Temperatures":
        """The temperatures an evaluation report holds; none (all 1) for a model not evaluated yet."""
        found = (report or {}).get("temperatures") or {}
        return cls(list(found.get("ensemble", [])), dict(found.get("exits", {})))
