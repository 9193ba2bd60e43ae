"""What the searched groupings share: their result, the warm-up they train, the probe batch.

A searched grouping is registered with ``trains=True`` and called as
``fn(spec, x, y, cfg) -> SearchResult``; `run.run_training` applies the result to
the spec once, before the family is built. The warm-up family is thrown away: training restarts from scratch
with the found groups. See docs/methods.md#gradient-grouping-search.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from npas_serve.family import Family, FamilySpec, build_family
from npas_serve.generators.base import Slot, WeightGenerator
from npas_serve.grouping import shape_groups
from npas_serve.train.config import TrainConfig
from npas_serve.train.loop import batches, make_optimizer, train_epochs


@dataclass(frozen=True)
class SearchResult:
    """A searched grouping: the group of every slot, and the generator options these groups need
    (e.g. SuperWeights' starting coefficient classes), merged into the spec's own options."""

    groups: list[int]
    generator_kwargs: dict[str, Any] = field(default_factory=dict)

    def applied_to(self, spec: FamilySpec) -> FamilySpec:
        """`spec` with these groups, and these options over its own."""
        return dataclasses.replace(spec, groups=list(self.groups),
                                   generator_kwargs={**spec.generator_kwargs, **self.generator_kwargs})


def warm_up(spec: FamilySpec, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
            make: Callable[[list[Slot], int], WeightGenerator]) -> tuple[Family, list[int]]:
    """A throw-away family with generator `make(slots, budget)`, trained `cfg.warm_up_epochs()` epochs;
    returns it with its `shape` groups (the bins the searches start from)."""
    warm = build_family(dataclasses.replace(spec, generator="superweights", generator_kwargs={},
                                            grouping="shape", groups=None))
    warm.generator = make(warm.slots, warm.budget_params)
    wcfg = dataclasses.replace(cfg, epochs=cfg.warm_up_epochs())
    train_epochs(warm, warm, make_optimizer(warm, wcfg), x, y, wcfg, progress=False)
    return warm, shape_groups(warm.slots)


def probe_batch(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The first minibatch of the epoch after the warm-up."""
    idx = batches(len(x), cfg.batch_size, cfg.seed, cfg.warm_up_epochs())[0]
    return x[idx], y[idx]


def largest_member(family: Family) -> int:
    sizes = family.member_shared_numel()
    return sizes.index(max(sizes))
