"""The `kmeans` grouping: Shapeshifter Networks' layer clustering.

`kmeans` (SSN, docs/methods.md#shapeshifter-networks-ssn): a warm-up with one SSN bank and the `emb`
mapping, then k-means on the learned layer embeddings. We ask for as many
clusters as `shape` has groups (the same group count as the baselines) and
split clusters by kernel shape so any generator can use the groups.

Every member trains in the warm-up (every layer's embedding must move). How far
the embeddings moved, and how much the clusters differ from k-means on the
initial embeddings (adjusted Rand index: 1 = the same partition, so the
warm-up taught nothing), go into the search's diagnostics.
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

    from sklearn.metrics import adjusted_rand_score

    up = spec.generator_kwargs.get("up", "inter") if spec.generator == "ssn" else "inter"
    initial: list[torch.Tensor] = []

    def one_bank(slots, budget) -> SSN:
        gen = SSN(slots, [0] * len(slots), budget, down="emb", up=up)
        initial.append(gen.layer_embeddings().clone())
        return gen

    warm, bins = warm_up(spec, x, y, cfg, one_bank, members=lambda family: list(range(len(family.members))))
    trained = warm.generator.layer_embeddings()
    k = min(len(set(bins)), len(trained))

    def clusters(embeddings: torch.Tensor) -> list[int]:
        features = F.normalize(embeddings, dim=1).numpy()
        return KMeans(n_clusters=k, n_init=10, random_state=spec.seed).fit_predict(features).tolist()

    labels = clusters(trained)
    moved = F.cosine_similarity(trained, initial[0], dim=1)
    diagnostics = {"warm_up_epochs": cfg.warm_up_epochs(), "clusters": k,
                   "ari_against_initial_embeddings": float(adjusted_rand_score(clusters(initial[0]), labels)),
                   "embedding_cosine_to_initial": {"min": float(moved.min()), "mean": float(moved.mean())}}
    return SearchResult(renumber([(int(c), s.kernel) for c, s in zip(labels, warm.slots)]), {}, diagnostics)
