"""The `gradient` grouping: SuperWeights' search by gradient similarity.

`gradient` (SuperWeights, docs/methods.md#gradient-grouping-search): layers that want to diverge
should not share.

1. Bins by kernel shape and depth position (the `shape` grouping). A warm-up
   trains a SuperWeights family in which every layer of a bin shares the bin's
   templates *and* coefficients.
2. On one minibatch, each layer's gradient of its generated weight.
3. Within a bin, the largest member's layers are compared pairwise by the cosine
   of their gradients cropped to the common leading channels, and pairs above
   a threshold (start 0.1) are merged greedily, most similar first. Every other
   member's layer joins the group of its most similar largest-member layer
   among those at least as wide on both axes (so it takes leading channels and
   does not widen the group: our choice; without such a layer, among all).
   While one template per (group, width) needs more than the budget, the
   threshold drops by 0.05 and the merge is redone (at worst: the bins).
4. The warm-up weights are discarded; training starts from scratch with these
   groups, layers of one group still sharing one coefficient row per bank.
5. `unshare.unshare_coefficients`, a few epochs in: within a class of layers sharing
   coefficients, a layer splits off (with a copy of the row) when the cosine of
   its coefficient gradients, summed over a few minibatches, with the class's
   representative is below 0.9.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from npas_serve.family import Family, FamilySpec
from npas_serve.generators.base import Slot
from npas_serve.generators.superweights import SuperWeights, bank_layout
from npas_serve.grouping import renumber, shape_groups
from npas_serve.registry import register_grouping
from npas_serve.train.config import TrainConfig
from npas_serve.train.loop import family_loss
from npas_serve.train.search import SearchResult, largest_member, probe_batch, warm_up

START_THRESHOLD, THRESHOLD_STEP = 0.1, 0.05


@register_grouping("gradient", trains=True)
def gradient_groups(spec: FamilySpec, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> SearchResult:
    """Steps 1-3; a SuperWeights family also starts from the groups as coefficient classes (step 4)."""
    def shared_bins(slots: list[Slot], budget: int) -> SuperWeights:
        bins = shape_groups(slots)
        return SuperWeights(slots, bins, budget, coefficient_ids=bins)

    warm, bins = warm_up(spec, x, y, cfg, shared_bins)
    grads = slot_gradients(warm, *probe_batch(x, y, cfg), cfg)
    groups = merge_by_gradient(warm.slots, bins, grads, largest_member(warm), warm.budget_params)
    options = {"coefficient_ids": list(groups)} if spec.generator == "superweights" else {}
    return SearchResult(groups, options)


def slot_gradients(family: Family, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> list[torch.Tensor]:
    """Each slot's gradient of its generated weight, on one minibatch (train mode, as in training)."""
    grads = [torch.zeros(s.shape) for s in family.slots]
    gen = family.generator
    original = gen.generate

    def recording(slot_ids: Sequence[int]) -> list[torch.Tensor]:
        weights = original(slot_ids)
        for i, w in zip(slot_ids, weights):
            w.register_hook(lambda g, i=i: grads[i].add_(g.detach().cpu()))
        return weights

    gen.generate = recording           # an instance attribute shadows the method for this pass only
    try:
        family.train()
        family.zero_grad(set_to_none=True)
        family_loss(family(x), y, cfg.exit_weights_for(family.num_exits)).backward()
    finally:
        del gen.generate
        family.zero_grad(set_to_none=True)
    return grads


def cropped_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two weight gradients over their common leading (output, input) channels."""
    o, i = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    return float(F.cosine_similarity(a[:o, :i].flatten(), b[:o, :i].flatten(), dim=0))


def merge_by_gradient(slots: Sequence[Slot], bins: Sequence[int], grads: Sequence[torch.Tensor], largest: int,
                      budget: int, start: float = START_THRESHOLD, step: float = THRESHOLD_STEP) -> list[int]:
    """Greedy merge within bins (largest member), lowering the threshold until the groups fit `budget`."""
    cos: dict[tuple[int, int], float] = {}
    pairs: dict[int, list[tuple[float, int, int]]] = {}
    for b in sorted(set(bins)):
        lead = [i for i in range(len(slots)) if bins[i] == b and slots[i].member == largest]
        pairs[b] = sorted(((cropped_cosine(grads[i], grads[j]), i, j) for n, i in enumerate(lead)
                           for j in lead[n + 1:]), reverse=True)
        for i in (i for i in range(len(slots)) if bins[i] == b and slots[i].member != largest):
            shape = slots[i].shape
            wider = [j for j in lead if slots[j].shape[0] >= shape[0] and slots[j].shape[1] >= shape[1]]
            for j in wider or lead:
                cos[i, j] = cropped_cosine(grads[i], grads[j])
    threshold = start
    while True:
        groups = _merge(slots, bins, pairs, cos, largest, threshold)
        if sum(bank.size for bank in bank_layout(slots, groups)[0]) <= budget or threshold < -1:
            return groups
        threshold -= step


def _merge(slots: Sequence[Slot], bins: Sequence[int], pairs: dict[int, list[tuple[float, int, int]]],
           cos: dict[tuple[int, int], float], largest: int, threshold: float) -> list[int]:
    root = list(range(len(slots)))

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for b, ranked in pairs.items():
        for c, i, j in ranked:
            if c <= threshold:
                break
            root[find(i)] = find(j)
    keys = []
    for i, s in enumerate(slots):
        if s.member == largest:
            keys.append(("lead", find(i)))
        else:
            near = [(c, j) for (k, j), c in cos.items() if k == i]
            # no largest-member layer in this bin: the bin stays one group
            keys.append(("lead", find(max(near)[1])) if near else ("bin", bins[i]))
    return renumber(keys)
