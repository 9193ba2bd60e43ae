"""The `gradient` grouping: SuperWeights' search by gradient similarity, as the reference code does it.

`gradient` (SuperWeights, docs/methods.md#gradient-grouping-search; reference:
piotr-teterwak/SuperWeights, models/group_gradient_analysis.py): layers that want to diverge
should not share.

1. Bins by kernel shape and depth position (the `shape` grouping). A warm-up
   (`search.warm_up`) trains, at a constant learning rate, the largest member plus one
   member per distinct depth on a SuperWeights family in which every layer of a bin
   shares the bin's templates *and* coefficients.
2. Each layer's gradient of its generated weight, in eval mode, from its own
   member's final-exit loss, summed over one epoch of minibatches (the reference
   takes one minibatch; a sum is less noisy at our small batch sizes).
3. Within a bin, the largest member's layers are compared pairwise by the cosine
   of their gradients cropped to the common leading channels; pairs above a
   threshold (start 0.1) merge, most similar first, and two groups merge only if
   every pair across them is above it (merges do not chain). Each merged layer
   keeps its own coefficient row. A member of the largest member's depth joins by
   position: its k-th layer takes the group and coefficient row of the largest
   member's k-th layer. The first member of another depth joins by gradient (its
   layer takes the group and row of its most similar largest-member layer in the
   bin); later members of that depth join it by position. While one template per
   (group, width) needs more than the budget, the threshold drops by 0.05 and the
   merge is redone (at worst: the bins). Below the budget at which even the bins
   need more, SuperWeights runs pooled (`generators/superweights.py`) and the
   threshold stays at its start: lowering it could not make the groups fit.
4. The warm-up weights are discarded; training starts from scratch with these
   groups and coefficient classes.
5. `unshare.unshare_coefficients`, a few epochs in, per bank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from npas_serve.family import Family, FamilySpec
from npas_serve.generators.base import Slot
from npas_serve.generators.superweights import SuperWeights, bank_layout
from npas_serve.grouping import renumber, shape_groups
from npas_serve.registry import register_grouping
from npas_serve.train.config import TrainConfig
from npas_serve.train.loop import batches
from npas_serve.train.search import SearchResult, largest_member, search_members, warm_up

START_THRESHOLD, THRESHOLD_STEP = 0.1, 0.05


@register_grouping("gradient", trains=True)
def gradient_groups(spec: FamilySpec, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> SearchResult:
    """Steps 1-3; a SuperWeights family also starts from the found coefficient classes (step 4)."""
    def shared_bins(slots: list[Slot], budget: int) -> SuperWeights:
        bins = shape_groups(slots)
        return SuperWeights(slots, bins, budget, coefficient_ids=bins)

    warm, bins = warm_up(spec, x, y, cfg, shared_bins)
    grads = slot_gradients(warm, x, y, cfg, members=search_members(warm))
    found = match_layers(warm.slots, bins, grads, largest_member(warm), warm.budget_params)
    kept = SuperWeights(warm.slots, found.groups, warm.budget_params, coefficient_ids=found.coefficient_ids)
    diagnostics = {**found.diagnostics, "templates_per_bank": [c.shape[1] for c in kept.coefficients],
                   "pooled": kept.pooled, "warm_up_epochs": cfg.warm_up_epochs()}
    options = {"coefficient_ids": found.coefficient_ids} if spec.generator == "superweights" else {}
    return SearchResult(found.groups, options, diagnostics)


def slot_gradients(family: Family, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                   members: Sequence[int] | None = None, epoch: int | None = None) -> list[torch.Tensor]:
    """Each slot's gradient of its generated weight, summed over the minibatches of one epoch
    (`epoch`, default the one after the warm-up), in eval mode, from each member's own final-exit
    loss. Slots of members not in `members` get zeros."""
    grads = [torch.zeros(s.shape) for s in family.slots]
    gen = family.generator
    original = gen.generate
    chosen = list(range(len(family.members)) if members is None else members)

    def recording(slot_ids: Sequence[int]) -> list[torch.Tensor]:
        weights = original(slot_ids)
        for i, w in zip(slot_ids, weights):
            if w.requires_grad:
                w.register_hook(lambda g, i=i: grads[i].add_(g.detach().cpu()))
        return weights

    gen.generate = recording           # an instance attribute shadows the method for this pass only
    try:
        family.eval()
        for idx in batches(len(x), cfg.batch_size, cfg.seed, cfg.warm_up_epochs() if epoch is None else epoch):
            family.zero_grad(set_to_none=True)
            # a generated weight is used by its own member only: the sum gives each its own loss's gradient
            sum(F.cross_entropy(exits[-1], y[idx]) for exits in family(x[idx], members=chosen)).backward()
    finally:
        del gen.generate
        family.zero_grad(set_to_none=True)
    return grads


def cropped_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two weight gradients over their common leading (output, input) channels."""
    o, i = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    return float(F.cosine_similarity(a[:o, :i].flatten(), b[:o, :i].flatten(), dim=0))


@dataclass(frozen=True)
class Match:
    """The found groups, coefficient classes (largest member: one per layer; others: their partner's),
    and what the search saw."""

    groups: list[int]
    coefficient_ids: list[int]
    diagnostics: dict[str, Any] = field(default_factory=dict)


def match_layers(slots: Sequence[Slot], bins: Sequence[int], grads: Sequence[torch.Tensor], largest: int,
                 budget: int, start: float = START_THRESHOLD, step: float = THRESHOLD_STEP) -> Match:
    """Step 3: merge the largest member's layers within bins, join the others by position or gradient,
    lowering the threshold until one template per (group, width) fits `budget`."""
    members = sorted({s.member for s in slots})
    own = {m: [i for i, s in enumerate(slots) if s.member == m] for m in members}
    lead = own[largest]
    cos = {(i, j): cropped_cosine(grads[i], grads[j]) for n, i in enumerate(lead) for j in lead[n + 1:]
           if bins[i] == bins[j]}
    partner, how = _partners(slots, bins, grads, own, largest)
    pooled = sum(bank.size for bank in bank_layout(slots, bins)[0]) > budget
    threshold = start
    while True:
        clusters, merges = _merge(lead, cos, threshold)
        root = {i: min(c) for c in clusters for i in c}
        keys, ids = [], []
        for i in range(len(slots)):
            head = i if slots[i].member == largest else partner[i]
            keys.append(("bin", bins[i]) if head is None else ("lead", root[head]))
            ids.append(("own", i) if head is None else ("lead", head))
        groups = renumber(keys)
        if pooled or sum(bank.size for bank in bank_layout(slots, groups)[0]) <= budget or threshold < -1:
            break
        threshold -= step
        if threshold < -1:      # the last try: a bin's layers all merge, whatever their (float) cosines
            threshold = -2.0
    name = [f"{s.member}:{s.name}" for s in slots]
    values = list(cos.values())
    diagnostics = {
        "threshold": round(threshold, 4),
        "lead_cosines": {"pairs": len(values), "max": max(values, default=0.0), "min": min(values, default=0.0),
                         "mean_abs": sum(abs(v) for v in values) / max(len(values), 1)},
        "merges": [[name[i], name[j], round(c, 4)] for c, i, j in merges],
        "joins": [[name[i], name[partner[i]], how[i]] for i in sorted(partner) if partner[i] is not None],
        "groups": len(set(groups)), "bins": len(set(bins)), "below_one_template_per_bin": pooled,
    }
    return Match(groups, renumber(ids), diagnostics)


def _partners(slots: Sequence[Slot], bins: Sequence[int], grads: Sequence[torch.Tensor],
              own: dict[int, list[int]], largest: int) -> tuple[dict[int, int | None], dict[int, Any]]:
    """Each other member's layer -> the largest-member layer whose group and coefficient row it takes,
    and how it was found ("position", or the cosine of a gradient match)."""
    partner: dict[int, int | None] = {}
    how: dict[int, Any] = {}
    first_of_depth = {len(own[largest]): largest}
    for m in sorted(own):
        if m == largest:
            continue
        depth = len(own[m])
        rep = first_of_depth.setdefault(depth, m)
        for k, i in enumerate(own[m]):
            if rep != m:                        # same depth as a member already placed: by position
                j = own[rep][k]
                partner[i] = j if rep == largest else partner[j]
                how[i] = "position"
                continue
            near = [(cropped_cosine(grads[i], grads[j]), j) for j in own[largest] if bins[j] == bins[i]]
            best = max(near, default=None)
            partner[i] = None if best is None else best[1]   # no largest-member layer in the bin: the bin
            how[i] = None if best is None else round(best[0], 4)
    return partner, how


def _merge(lead: Sequence[int], cos: dict[tuple[int, int], float],
           threshold: float) -> tuple[list[set[int]], list[tuple[float, int, int]]]:
    """Complete-linkage merging, most similar pair first: two clusters join only when every pair
    across them is above `threshold`, so a chain of similar pairs does not make one group."""
    cluster = {i: frozenset([i]) for i in lead}
    merges = []
    for c, i, j in sorted(((c, i, j) for (i, j), c in cos.items()), reverse=True):
        if c <= threshold:
            break
        a, b = cluster[i], cluster[j]
        if a == b or any(cos.get((min(p, q), max(p, q)), -2.0) <= threshold for p in a for q in b):
            continue
        joined = a | b
        for k in joined:
            cluster[k] = joined
        merges.append((c, i, j))
    return list(dict.fromkeys(cluster.values())), merges
