"""The interface every weight generator implements.

A generator owns all shared parameters of a family and turns them into the
weights of any subset of the family's shared layers ("slots"). Training,
checkpoints, the engine and the servers only call `generate`, so adding a
generator never touches them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from npas_serve.errors import UserError


@dataclass(frozen=True)
class Slot:
    """One shared layer of one member: what the generator must produce for it."""

    member: int
    stage: int
    name: str                 # module path inside the member, e.g. "stages.1.0.conv1"
    shape: tuple[int, ...]    # (out, in, *kernel) or (out, in)
    depth: float              # relative position in the member, in [0, 1)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.shape[2:]

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[1:])


class WeightGenerator(nn.Module):
    """Shared parameters in, generated layer weights out.

    Subclasses take ``(slots, groups, budget, **options)`` in their constructor and
    must keep the parameters they count in `bank_numel` within ``budget``.
    """

    def __init__(self, slots: Sequence[Slot], groups: Sequence[int], budget: int):
        super().__init__()
        if len(groups) != len(slots):
            raise ValueError(f"{len(groups)} group ids for {len(slots)} slots")
        if budget < 1:
            raise UserError(f"budget must be a positive number of parameters, got {budget}")
        self.slots = list(slots)
        self.groups = [int(g) for g in groups]
        self.budget = int(budget)

    def generate(self, slot_ids: Sequence[int]) -> list[torch.Tensor]:
        """The weights of `slot_ids`, in that order, differentiable w.r.t. the bank."""
        raise NotImplementedError

    def bank_parameters(self) -> list[nn.Parameter]:
        """The parameters counted against the budget (the templates / table)."""
        raise NotImplementedError

    def bank_numel(self) -> int:
        return sum(p.numel() for p in self.bank_parameters())

    def resident_bytes(self) -> tuple[int, int]:
        """(bank, everything else this generator keeps) in bytes: what serving holds for it.

        Read through `bank_parameters`, so memory accounting never depends on state-dict names.
        """
        bank = sum(p.numel() * p.element_size() for p in self.bank_parameters())
        total = sum(t.numel() * t.element_size() for t in self.state_dict().values())
        return bank, total - bank

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """Parameters trained without weight decay (mixing coefficients)."""
        return []

    def diagnostics(self) -> dict[str, float]:
        """Method-specific figures worth reporting (e.g. hash bucket balance); empty by default."""
        return {}


def kaiming_bank(numel: int, fan_in: int) -> torch.Tensor:
    """A flat bank drawn at the Kaiming-normal scale of the widest layer it serves."""
    return torch.randn(numel) * math.sqrt(2.0 / fan_in)


def unit_orthogonal(rows: int, cols: int) -> torch.Tensor:
    """Orthogonal init with rows rescaled to unit norm, so a mixed piece starts at the bank's scale."""
    t = torch.empty(rows, cols)
    nn.init.orthogonal_(t)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
