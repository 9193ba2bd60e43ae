"""ArbNets: every weight is a hashed entry of one learnable table (Chang & Lipson, arXiv:2312.08401).

The family's shared weights, all members and layers in slot order, are
numbered ``i = 0 .. n-1`` (each layer's weight flattened in row-major order).
A hash ``h`` maps every index to one of the ``m = budget`` table entries and
weight ``i`` is ``table[h(i)]`` times its layer's fixed factor
``sqrt(fan_max / fan_in)``. The table is ``N(0, 2 / fan_max)`` (fan_max: the
largest fan-in of any layer), so every layer starts at its Kaiming scale while
the table sits at a SuperWeights bank's scale, which keeps Adam's steps
(relative to the parameter scale) comparable across methods. Colliding indices
share: a table entry's gradient is the sum of its weights' gradients. Groups
are accepted but unused: there is one table.

Hashes (drawn once at construction from torch's global RNG, which
`build_family` seeds, then kept in a persistent buffer, so a checkpoint
reloads the very same sharing):

- ``dirichlet``: bucket probabilities ``q ~ Dirichlet(alpha * 1_m)``, then every
  index draws its bucket from ``q`` independently. High ``alpha``: near-uniform
  loads (balanced); low ``alpha``: a few buckets take most indices.
- ``neighborhood``: ``h(i) = (i + round(eps_i)) mod m`` with
  ``eps_i ~ N(0, spread^2)``, ``spread`` in table entries. ``spread = 0`` is the
  deterministic modulo hash (perfectly balanced: loads differ by at most one);
  a larger spread moves each index to a random entry near its deterministic
  one, so the sharing becomes noisy (and, as a side effect, less balanced).
  The paper's exact definition was not verified; this is ours (docs/methods.md#arbnet).

`diagnostics` reports the entropy of the bucket loads (nats, and over its
maximum ``log m``) and the share of empty buckets.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from npas_serve.errors import UserError
from npas_serve.generators.base import Slot, WeightGenerator, kaiming_bank
from npas_serve.registry import register_generator

HASHES = ("dirichlet", "neighborhood")


def dirichlet_hash(n: int, m: int, alpha: float) -> torch.Tensor:
    """`n` bucket ids drawn from bucket probabilities ~ Dirichlet(alpha) over `m` buckets."""
    gamma = torch._standard_gamma(torch.full((m,), float(alpha), dtype=torch.float64))
    if not gamma.sum() > 0:     # every draw underflowed (alpha far below 1e-2): one bucket takes all
        gamma[torch.randint(m, ())] = 1.0
    return torch.multinomial(gamma / gamma.sum(), n, replacement=True)


def neighborhood_hash(n: int, m: int, spread: float) -> torch.Tensor:
    """`(i + round(eps_i)) mod m`, eps_i ~ N(0, spread^2): the modulo hash, blurred by `spread`."""
    idx = torch.arange(n, dtype=torch.float64)
    if spread > 0:
        idx = idx + torch.randn(n, dtype=torch.float64) * spread
    return torch.remainder(torch.round(idx).long(), m)


def load_entropy(index: torch.Tensor, m: int) -> float:
    """Entropy (nats) of the distribution of indices over the `m` buckets."""
    q = torch.bincount(index.long(), minlength=m).double() / index.numel()
    q = q[q > 0]
    return float(-(q * q.log()).sum())


@register_generator("arbnet")
class ArbNet(WeightGenerator):
    def __init__(self, slots: Sequence[Slot], groups: Sequence[int], budget: int, hash: str = "dirichlet",
                 alpha: float = 1.0, spread: float = 0.0):
        super().__init__(slots, groups, budget)
        if hash not in HASHES:
            raise UserError(f"unknown ArbNet hash {hash!r}; known: {', '.join(HASHES)}")
        if not alpha > 0 or not spread >= 0:
            raise UserError(f"ArbNet needs alpha > 0 and spread >= 0, got alpha={alpha}, spread={spread}")
        self.hash, self.alpha, self.spread = hash, float(alpha), float(spread)
        m = self.budget
        n = sum(s.numel for s in self.slots)
        fan_max = max(s.fan_in for s in self.slots)
        self.banks = nn.ParameterList([nn.Parameter(kaiming_bank(m, fan_max))])
        index = dirichlet_hash(n, m, alpha) if hash == "dirichlet" else neighborhood_hash(n, m, spread)
        dtype = torch.int32 if m < 2**31 else torch.int64
        self.register_buffer("index", index.to(dtype), persistent=True)
        self._offsets = [0]
        for s in self.slots:
            self._offsets.append(self._offsets[-1] + s.numel)
        self._scale = [math.sqrt(fan_max / s.fan_in) for s in self.slots]
        self._plans: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def bank_parameters(self) -> list[nn.Parameter]:
        return [self.banks[0]]

    def _plan(self, slot_ids: tuple[int, ...]) -> torch.Tensor:
        """The table indices of these slots, concatenated (cached per request shape and device)."""
        key = (slot_ids, self.index.device)
        plan = self._plans.get(key)
        if plan is None:
            plan = torch.cat([self.index[self._offsets[i]:self._offsets[i + 1]] for i in slot_ids])
            self._plans[key] = plan
        return plan

    def _load_from_state_dict(self, *args, **kwargs):
        self._plans.clear()     # a loaded hash replaces the one drawn at construction
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._plans.clear()     # moved to another device or dtype: re-slice from the moved buffer
        return super()._apply(fn, *args, **kwargs)

    def generate(self, slot_ids: Sequence[int]) -> list[torch.Tensor]:
        slot_ids = tuple(slot_ids)
        flat = self.banks[0].index_select(0, self._plan(slot_ids))   # one gather for the whole request
        sizes = [self.slots[i].numel for i in slot_ids]
        return [(piece * self._scale[i]).view(self.slots[i].shape)
                for i, piece in zip(slot_ids, flat.split(sizes))]

    def diagnostics(self) -> dict[str, float]:
        m = self.bank_numel()
        entropy = load_entropy(self.index, m)
        loads = torch.bincount(self.index.long(), minlength=m)
        return {"bucket_entropy": entropy, "bucket_entropy_max": math.log(m),
                "bucket_balance": entropy / math.log(m) if m > 1 else 1.0,
                "empty_buckets": float((loads == 0).double().mean())}
