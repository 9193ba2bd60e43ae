"""Groupings found by training, and SuperWeights' coefficient unsharing.

`gradient` (docs/methods.md, Gradient grouping search): layers that want to diverge should not share.

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
5. `unshare_coefficients`, a few epochs in: within a class of layers sharing
   coefficients, a layer splits off (with a copy of the row) when the cosine of
   its coefficient gradients, summed over a few minibatches, with the class's
   representative is below 0.9.

`kmeans` (docs/methods.md, Shapeshifter Networks (SSN)): a warm-up with one SSN bank and the `emb`
mapping, then k-means on the learned layer embeddings. We ask for as many
clusters as `shape` has groups (the same group count as the baselines) and
split clusters by kernel shape so any generator can use the groups.

Our schedules are short (8-60 epochs, not 200), so the reference's epoch counts
scale with the run: warm-up 10% of the epochs (reference 20/200), at least 2
so the gradients come from a network past its first-epoch transient;
unsharing at 5% (reference 10/200), at least after epoch 1. `TrainConfig`'s
`search_epochs` / `unshare_epoch` override both.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from npas_serve.family import Family, FamilySpec, build_family
from npas_serve.generators.base import Slot, WeightGenerator
from npas_serve.generators.ssn import SSN
from npas_serve.generators.superweights import SuperWeights, bank_layout
from npas_serve.grouping import renumber, shape_groups
from npas_serve.registry import register_grouping

START_THRESHOLD, THRESHOLD_STEP = 0.1, 0.05
UNSHARE_COSINE = 0.9
UNSHARE_BATCHES = 4


def search_epochs(cfg) -> int:
    return cfg.search_epochs if cfg.search_epochs is not None else max(2, round(0.1 * cfg.epochs))


def unshare_epoch(cfg) -> int:
    return cfg.unshare_epoch if cfg.unshare_epoch is not None else max(1, round(0.05 * cfg.epochs))


# --- the two searched groupings ------------------------------------------------------------------------

@register_grouping("gradient", trains=True)
def gradient_groups(spec: FamilySpec, x: torch.Tensor, y: torch.Tensor, cfg) -> list[int]:
    """docs/methods.md (Gradient grouping search) steps 1-3; also makes the group the starting coefficient class (step 4)."""
    def shared_bins(slots: list[Slot], budget: int) -> SuperWeights:
        bins = shape_groups(slots)
        return SuperWeights(slots, bins, budget, coefficient_ids=bins)

    warm, bins = _warm_up(spec, x, y, cfg, shared_bins)
    grads = slot_gradients(warm, *_probe_batch(x, y, cfg), cfg)
    groups = merge_by_gradient(warm.slots, bins, grads, _largest(warm), warm.budget_params)
    if spec.method == "superweights":
        spec.method_kwargs["coefficient_ids"] = list(groups)
    return groups


@register_grouping("kmeans", trains=True)
def kmeans_groups(spec: FamilySpec, x: torch.Tensor, y: torch.Tensor, cfg) -> list[int]:
    """docs/methods.md (Shapeshifter Networks (SSN)): k-means on the layer embeddings of a one-bank SSN warm-up."""
    from sklearn.cluster import KMeans

    up = spec.method_kwargs.get("up", "inter") if spec.method == "ssn" else "inter"
    warm, bins = _warm_up(spec, x, y, cfg,
                          lambda slots, budget: SSN(slots, [0] * len(slots), budget, down="emb", up=up))
    features = F.normalize(warm.generator.layer_embeddings(), dim=1).numpy()
    k = min(len(set(bins)), len(features))
    labels = KMeans(n_clusters=k, n_init=10, random_state=spec.seed).fit_predict(features)
    return renumber([(int(c), s.kernel) for c, s in zip(labels, warm.slots)])


def _warm_up(spec: FamilySpec, x: torch.Tensor, y: torch.Tensor, cfg,
             make: Callable[[list[Slot], int], WeightGenerator]) -> tuple[Family, list[int]]:
    """A throw-away family with generator `make(slots, budget)`, trained `search_epochs(cfg)` epochs."""
    from npas_serve.train import make_optimizer, train_epochs

    warm = build_family(dataclasses.replace(spec, method="superweights", method_kwargs={},
                                            grouping="shape", groups=None))
    warm.generator = make(warm.slots, warm.budget_params)
    wcfg = dataclasses.replace(cfg, epochs=search_epochs(cfg))
    train_epochs(warm, warm, make_optimizer(warm, wcfg), x, y, wcfg, progress=False)
    return warm, shape_groups(warm.slots)


def _probe_batch(x: torch.Tensor, y: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    from npas_serve.train import batches

    idx = batches(len(x), cfg.batch_size, cfg.seed, search_epochs(cfg))[0]
    return x[idx], y[idx]


def _largest(family: Family) -> int:
    sizes = family.member_shared_numel()
    return sizes.index(max(sizes))


# --- step 2-3: gradients and the greedy merge ------------------------------------------------------------

def slot_gradients(family: Family, x: torch.Tensor, y: torch.Tensor, cfg) -> list[torch.Tensor]:
    """Each slot's gradient of its generated weight, on one minibatch (train mode, as in training)."""
    from npas_serve.train import exit_weights, family_loss

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
        family_loss(family(x), y, exit_weights(cfg, family.num_exits)).backward()
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


def _merge(slots, bins, pairs, cos, largest, threshold) -> list[int]:
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


# --- step 5: coefficient unsharing ----------------------------------------------------------------------

def unshare_coefficients(family: Family, spec: FamilySpec, x: torch.Tensor, y: torch.Tensor,
                         cfg) -> dict[nn.Parameter, torch.Tensor]:
    """Split coefficient classes whose members' summed gradients disagree; returns the grown parameters.

    A no-op (empty dict) for a generator that shares no coefficients. Updates
    `spec.method_kwargs["coefficient_ids"]`, so the manifest rebuilds the new shapes.
    """
    from npas_serve.train import batches, exit_weights, family_loss

    ids = getattr(family.generator, "coefficient_ids", None)
    if ids is None or len(set(ids)) == len(ids):
        return {}
    probe = copy.deepcopy(family)      # every slot its own rows (same values), to see each one's gradient
    probe.generator.split_coefficients(range(len(ids)))
    probe.train()
    probe.zero_grad(set_to_none=True)
    weights = exit_weights(cfg, family.num_exits)
    for idx in batches(len(x), cfg.batch_size, cfg.seed, unshare_epoch(cfg))[:UNSHARE_BATCHES]:
        family_loss(probe(x[idx]), y[idx], weights).backward()
    gen = probe.generator
    rows = [{b: gen.coefficients[b].grad[r] for b, r in gen.pieces(s)} for s in range(len(ids))]

    def cosine(a: int, b: int) -> float:
        common = sorted(set(rows[a]) & set(rows[b]))
        return float(F.cosine_similarity(torch.cat([rows[a][k] for k in common]),
                                         torch.cat([rows[b][k] for k in common]), dim=0))

    reps: dict[int, list[tuple[int, int]]] = {}
    new_ids = []
    for s, cls in enumerate(ids):
        match = next((new for rep, new in reps.get(cls, []) if cosine(s, rep) >= UNSHARE_COSINE), None)
        if match is None:
            match = sum(len(v) for v in reps.values())
            reps.setdefault(cls, []).append((s, match))
        new_ids.append(match)
    grown = family.generator.split_coefficients(new_ids)
    spec.method_kwargs["coefficient_ids"] = new_ids
    return grown
