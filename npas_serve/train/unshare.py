"""SuperWeights' coefficient unsharing (step 5 of docs/methods.md#gradient-grouping-search).

A few epochs into training, within a class of layers sharing coefficients, a layer
splits off (with a copy of the row) when the cosine of its coefficient gradients,
summed over a few minibatches, with the class's representative is below 0.9.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from npas_serve.family import Family
from npas_serve.train.config import TrainConfig
from npas_serve.train.loop import batches, family_loss

UNSHARE_COSINE = 0.9
UNSHARE_BATCHES = 4


@dataclass(frozen=True)
class Split:
    """The refined coefficient classes, and each grown parameter's source rows (for the optimiser)."""

    coefficient_ids: list[int]
    grown: dict[nn.Parameter, torch.Tensor]


def unshare_coefficients(family: Family, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> Split | None:
    """Split coefficient classes whose members' summed gradients disagree, in place.

    None (nothing done) for a generator that shares no coefficients. The caller puts
    the new classes into its spec, so the manifest rebuilds the new shapes.
    """
    ids = getattr(family.generator, "coefficient_ids", None)
    if ids is None or len(set(ids)) == len(ids):
        return None
    probe = copy.deepcopy(family)      # every slot its own rows (same values), to see each one's gradient
    probe.generator.split_coefficients(range(len(ids)))
    probe.train()
    probe.zero_grad(set_to_none=True)
    weights = cfg.exit_weights_for(family.num_exits)
    for idx in batches(len(x), cfg.batch_size, cfg.seed, cfg.split_epoch())[:UNSHARE_BATCHES]:
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
    return Split(new_ids, family.generator.split_coefficients(new_ids))


def follow_grown_parameters(optimizer: torch.optim.Optimizer, grown: dict[nn.Parameter, torch.Tensor]) -> None:
    """Per-parameter optimiser state (moments) of a parameter whose rows were copied: copy it alike."""
    for param, rows in grown.items():
        state = optimizer.state.get(param, {})
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() == param.dim() and value.shape != param.shape:
                state[key] = value.index_select(0, rows.to(value.device))
