"""What the searched groupings share: their result, the warm-up they train, the members it trains.

A searched grouping is registered with ``trains=True`` and called as
``fn(spec, x, y, cfg) -> SearchResult``; `run.run_training` applies the result to
the spec once, before the family is built. The warm-up family is thrown away: training restarts from scratch
with the found groups. See docs/methods.md#gradient-grouping-search.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from npas_serve.family import Family, FamilySpec, build_family
from npas_serve.generators.base import Slot, WeightGenerator
from npas_serve.grouping import shape_groups
from npas_serve.train.config import TrainConfig
from npas_serve.train.loop import make_optimizer, train_epochs


@dataclass(frozen=True)
class SearchResult:
    """A searched grouping: the group of every slot, and the generator options these groups need
    (e.g. SuperWeights' starting coefficient classes), merged into the spec's own options."""

    groups: list[int]
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)   # what the search saw, for the manifest

    def applied_to(self, spec: FamilySpec) -> FamilySpec:
        """`spec` with these groups, and these options over its own."""
        return dataclasses.replace(spec, groups=list(self.groups),
                                   generator_kwargs={**spec.generator_kwargs, **self.generator_kwargs})


class Members(nn.Module):
    """The chosen members of a family as one module, for the training loop to run."""

    def __init__(self, family: Family, members: Sequence[int]):
        super().__init__()
        self.family, self.chosen = family, list(members)

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        return self.family(x, members=self.chosen)


def search_members(family: Family) -> list[int]:
    """The largest member and the first member of every other depth (count of shared layers):
    the members the reference warms up, since the others join them by position."""
    depth = [sum(1 for s in family.slots if s.member == m) for m in range(len(family.members))]
    chosen = {depth[largest_member(family)]: largest_member(family)}
    for m, d in enumerate(depth):
        chosen.setdefault(d, m)
    return sorted(chosen.values())


def warm_up(spec: FamilySpec, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
            make: Callable[[list[Slot], int], WeightGenerator],
            members: Callable[[Family], list[int]] = search_members) -> tuple[Family, list[int]]:
    """A throw-away family with generator `make(slots, budget)`, its `members(family)` trained
    `cfg.warm_up_epochs()` epochs at the constant learning rate `cfg.lr`; returns it with its
    `shape` groups (the bins the searches start from)."""
    warm = build_family(dataclasses.replace(spec, generator="superweights", generator_kwargs={},
                                            grouping="shape", groups=None))
    warm.generator = make(warm.slots, warm.budget_params)
    wcfg = dataclasses.replace(cfg, epochs=cfg.warm_up_epochs(), schedule="constant")
    train_epochs(warm, Members(warm, members(warm)), make_optimizer(warm, wcfg), x, y, wcfg, progress=False)
    return warm, shape_groups(warm.slots)


def largest_member(family: Family) -> int:
    sizes = family.member_shared_numel()
    return sizes.index(max(sizes))
