"""SuperWeights' coefficient unsharing (step 5 of docs/methods.md#gradient-grouping-search).

A few epochs into training, per bank (reference: `ParameterBank.compare_grads`), the layers
sharing one coefficient row are compared pairwise by the cosine of their coefficient
gradients, summed over one epoch in eval mode from each member's own final-exit loss;
layers stay together only while every pair among them is above 0.9 (complete linkage,
most similar first), and each split-off cluster gets a copy of the row. A bank with one
template (K = 1) is skipped with a log line: its gradients are single numbers, whose
cosine is always +-1.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from npas_serve.family import Family
from npas_serve.train.config import TrainConfig
from npas_serve.train.loop import batches

UNSHARE_COSINE = 0.9
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """The refined coefficient classes (one list per bank), each grown parameter's source rows (for
    the optimiser), and what the comparison saw."""

    coefficient_ids: list[list[int]]
    grown: dict[nn.Parameter, torch.Tensor]
    diagnostics: dict[str, Any] = field(default_factory=dict)


def unshare_coefficients(family: Family, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> Split | None:
    """Split coefficient rows whose users' summed gradients disagree, bank by bank, in place.

    None (nothing done) for a generator that shares no coefficients. The caller puts
    the new classes into its spec, so the manifest rebuilds the new shapes.
    """
    gen = family.generator
    if getattr(gen, "coefficient_ids", None) is None:
        return None
    classes = gen.bank_classes()
    shared = [b for b, bank in enumerate(gen._banks)
              if len({classes[b][s] for s in bank.users}) < len(bank.users)]
    if not shared:
        return None
    probe = copy.deepcopy(family)      # every slot its own rows (same values), to see each one's gradient
    probe.generator.split_coefficients(range(len(gen.slots)))
    probe.eval()
    probe.zero_grad(set_to_none=True)
    for idx in batches(len(x), cfg.batch_size, cfg.seed, cfg.split_epoch()):
        sum(F.cross_entropy(exits[-1], y[idx]) for exits in probe(x[idx])).backward()
    pgen = probe.generator
    new_ids = [list(c) for c in classes]
    compared, skipped, cosines = 0, [], []
    for b in shared:
        if gen.coefficients[b].shape[1] == 1:
            log.info("unshare: bank %d (group %d, width %d) has one template; its coefficient rows stay shared",
                     b, gen._banks[b].group, gen._banks[b].width)
            skipped.append(b)
            continue
        compared += 1
        grad = pgen.coefficients[b].grad
        row = {s: r for s, r in pgen._rows()[b].items()}
        users: dict[int, list[int]] = {}
        for s in gen._banks[b].users:
            users.setdefault(classes[b][s], []).append(s)
        fresh = max(classes[b]) + 1
        for cls, members in users.items():
            if len(members) < 2:
                continue
            cos = {(p, q): float(F.cosine_similarity(grad[row[p]], grad[row[q]], dim=0))
                   for n, p in enumerate(members) for q in members[n + 1:]}
            cosines += cos.values()
            clusters = _complete_linkage(members, cos, UNSHARE_COSINE)
            for cluster in clusters[1:]:           # the first keeps the class; each other gets a new one
                for s in cluster:
                    new_ids[b][s] = fresh
                fresh += 1
    diagnostics = {"banks_shared": len(shared), "banks_compared": compared, "banks_skipped_one_template": skipped,
                   "rows_before": sum(c.shape[0] for c in gen.coefficients),
                   "cosine_min": min(cosines, default=1.0), "cosine_max": max(cosines, default=1.0)}
    grown = gen.split_coefficients(new_ids)
    diagnostics["rows_after"] = sum(c.shape[0] for c in gen.coefficients)
    return Split(new_ids, grown, diagnostics)


def _complete_linkage(items: list[int], cos: dict[tuple[int, int], float], threshold: float) -> list[list[int]]:
    """Clusters in which every pair is above `threshold`, joined most similar first; in `items` order."""
    cluster = {i: (i,) for i in items}
    for c, p, q in sorted(((c, p, q) for (p, q), c in cos.items()), reverse=True):
        if c < threshold:
            break
        a, b = cluster[p], cluster[q]
        if a == b or any(cos.get((u, v), cos.get((v, u), -2.0)) < threshold for u in a for v in b):
            continue
        joined = tuple(sorted(a + b, key=items.index))
        for k in joined:
            cluster[k] = joined
    return sorted(dict.fromkeys(cluster.values()), key=lambda c: items.index(c[0]))


def follow_grown_parameters(optimizer: torch.optim.Optimizer, grown: dict[nn.Parameter, torch.Tensor]) -> None:
    """Per-parameter optimiser state (moments) of a parameter whose rows were copied: copy it alike."""
    for param, rows in grown.items():
        state = optimizer.state.get(param, {})
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() == param.dim() and value.shape != param.shape:
                state[key] = value.index_select(0, rows.to(value.device))
