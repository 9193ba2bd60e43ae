"""What the engine keeps on its device, by kind, for the resident-bytes metric and target.

The generator says which of its tensors are the bank (`WeightGenerator.resident_bytes`),
so any generator, whatever its state-dict layout, is counted the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from npas_serve.family import Family


@dataclass(frozen=True)
class ResidentBytes:
    bank: int             # the templates / table counted against the budget
    coefficients: int     # everything else the generator holds
    norms_heads: int      # per-member norms, heads and biases
    cache: int            # generated weights kept by the optional cache
    frozen: int = 0       # the plain members built by `freeze` (their own weights, norms and heads)

    @property
    def total(self) -> int:
        return self.bank + self.coefficients + self.norms_heads + self.cache + self.frozen


def state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def target_bytes(family: Family) -> int:
    """The resident target with the cache off: one member's share of the members' unshared shared-layer
    weights (what N independent members hold, divided by N), plus the norms and heads every member keeps.
    Bank and coefficients must fit in the first part."""
    elem = next(family.generator.parameters()).element_size()
    shared = family.member_shared_numel()
    return int(sum(shared) * elem / len(shared)) + state_bytes(family) - state_bytes(family.generator)


def resident_bytes(family: Family, frozen: Sequence[nn.Module] | None, cache: int) -> ResidentBytes:
    bank, coefficients = family.generator.resident_bytes()
    norms_heads = state_bytes(family) - state_bytes(family.generator)
    return ResidentBytes(bank, coefficients, norms_heads, cache, sum(state_bytes(m) for m in frozen or []))
