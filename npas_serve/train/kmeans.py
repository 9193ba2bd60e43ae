"""The `kmeans` grouping: Shapeshifter Networks' layer clustering.

`kmeans` (SSN, docs/methods.md#shapeshifter-networks-ssn): a warm-up with one SSN bank and the `emb`
mapping, then k-means on the learned layer embeddings. We ask for as many
clusters as `shape` has groups (the same group count as the baselines) and
split clusters by kernel shape so any generator can use the groups.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from npas_serve.family import FamilySpec
from npas_serve.generators.ssn import SSN
from npas_serve.grouping import renumber
from npas_serve.registry import register_grouping
from npas_serve.train.config import TrainConfig
from npas_serve.train.search import SearchResult, warm_up


@register_grouping("kmeans", trains=True)
def kmeans_groups(spec: FamilySpec, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> SearchResult:
    """k-means on the layer embeddings of a one-bank SSN warm-up."""
    from sklearn.cluster import KMeans    # heavy, and needed by this grouping only

    up = spec.generator_kwargs.get("up", "inter") if spec.generator == "ssn" else "inter"
    warm, bins = warm_up(spec, x, y, cfg,
                         lambda slots, budget: SSN(slots, [0] * len(slots), budget, down="emb", up=up))
    features = F.normalize(warm.generator.layer_embeddings(), dim=1).numpy()
    k = min(len(set(bins)), len(features))
    labels = KMeans(n_clusters=k, n_init=10, random_state=spec.seed).fit_predict(features)
    return SearchResult(renumber([(int(c), s.kernel) for c, s in zip(labels, warm.slots)]))
