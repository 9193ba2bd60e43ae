"""Which shared layers draw on the same banks.

A grouping maps every slot to a group id. Groups never mix kernel shapes: a
bank's templates are cut to one kernel. `shape` is the starting point of the
SuperWeights search (kernel shape and depth position); `random` keeps the
same number of groups per kernel shape but assigns layers at random, as a
control for the searched groupings; `unshared` gives every layer its own bank
(with a budget of the members' total size, an independent ensemble).
Groupings that need training (`gradient`, `kmeans`) live in the training package, which
registers them when imported (`import npas_serve.train`).
"""
from __future__ import annotations

import random as _random
from typing import Sequence

from npas_serve.generators.base import Slot
from npas_serve.registry import register_grouping


def _shape_keys(slots: Sequence[Slot], depth_bins: int) -> list[tuple]:
    return [(len(s.shape), s.kernel, min(int(s.depth * depth_bins), depth_bins - 1)) for s in slots]


def renumber(keys: Sequence) -> list[int]:
    """Group ids 0..G-1 in order of first appearance of each key."""
    ids: dict = {}
    return [ids.setdefault(k, len(ids)) for k in keys]


@register_grouping("shape")
def shape_groups(slots: Sequence[Slot], depth_bins: int = 3, seed: int = 0) -> list[int]:
    """Bins by kernel shape and depth position, across all members."""
    return renumber(_shape_keys(slots, depth_bins))


@register_grouping("random")
def random_groups(slots: Sequence[Slot], depth_bins: int = 3, seed: int = 0) -> list[int]:
    """As many groups per kernel shape as `shape` makes, with layers assigned at random."""
    rng = _random.Random(seed)
    keys = _shape_keys(slots, depth_bins)
    groups: list = [None] * len(slots)
    for kernel in sorted({k[:2] for k in keys}):
        ids = [i for i, k in enumerate(keys) if k[:2] == kernel]
        bins = sorted({keys[i][2] for i in ids})
        # every bin keeps at least one layer so the group count matches `shape`
        order = ids[:]
        rng.shuffle(order)
        for j, i in enumerate(order):
            groups[i] = (kernel, bins[j] if j < len(bins) else rng.choice(bins))
    return renumber(groups)


@register_grouping("unshared")
def unshared_groups(slots: Sequence[Slot], seed: int = 0) -> list[int]:
    """Every layer its own group: nothing is shared between layers or members."""
    return list(range(len(slots)))
