"""SuperWeights: layer weights composed from template banks (Teterwak et al., NPAS).

Within a group, distinct layer shapes form a chain of widths. Width 0 is the
smallest shape; each wider shape adds two slabs (extra input channels, then
extra output channels), so a layer's weight is the concatenation of one piece
per width it spans and wide and narrow layers share their leading channels:

    W_w = cat(cat(W_{w-1}, in_slab_w, dim=1), out_slab_w, dim=0)

Each (group, width) owns a flat bank; its K templates are consecutive windows
of the piece size ``s`` and a layer's piece is ``sum_k alpha_k * T_k`` with a
per-layer coefficient row (no softmax, no normalisation). See METHODS.md §1.

Choice made here (not in the paper): when the budget cannot give a bank even
one template, the bank's ``P < s`` parameters are tiled to length ``s`` (SSN's
`repeat` upsampling), so low budgets still build every layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from npas_serve.errors import UserError
from npas_serve.generators.base import Slot, WeightGenerator
from npas_serve.registry import register_generator


@dataclass(frozen=True)
class _Bank:
    group: int
    width: int
    in_shape: tuple[int, ...]    # slab of extra input channels (width 0: the whole base shape)
    out_shape: tuple[int, ...]   # slab of extra output channels (width 0: empty)
    users: tuple[int, ...]       # slot ids whose weight spans this width
    fan_in: int

    @property
    def size(self) -> int:
        return math.prod(self.in_shape) + math.prod(self.out_shape)


def width_chain(shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Nested shapes, smallest first; each grows (out, in) to cover the next distinct shape."""
    chain: list[tuple[int, ...]] = []
    for shape in sorted(set(shapes), key=lambda s: (math.prod(s), s)):
        if chain:
            prev = chain[-1]
            shape = (max(prev[0], shape[0]), max(prev[1], shape[1]), *shape[2:])
            if shape == prev:
                continue
        chain.append(shape)
    return chain


def split_budget(sizes: Sequence[int], users: Sequence[int], budget: int,
                 max_templates: int = 8) -> list[int]:
    """Bank sizes in parameters: one template each, then more to the most-used banks, then round-robin.

    Below one template per bank, sizes are proportional to the piece sizes
    (the banks then tile). Never exceeds `budget`.
    """
    base = sum(sizes)
    if budget < base:
        alloc = [budget * s // base for s in sizes]
        if min(alloc) < 1:
            raise UserError(
                f"budget of {budget} parameters is too small to build a layer: "
                f"{len(sizes)} banks need at least one parameter each (ask for more than {base // min(sizes)})"
            )
        return alloc
    templates = [1] * len(sizes)
    left = budget - base

    def fill(order: list[int], cap) -> None:
        nonlocal left
        grew = True
        while grew:
            grew = False
            for b in order:
                if templates[b] < cap(b) and sizes[b] <= left:
                    templates[b] += 1
                    left -= sizes[b]
                    grew = True

    by_use = sorted(range(len(sizes)), key=lambda b: (-users[b], sizes[b]))
    fill(by_use, lambda b: min(users[b], max_templates))   # banks shared by more layers first
    fill(by_use, lambda b: max_templates)                  # then round-robin up to the cap
    return [k * s for k, s in zip(templates, sizes)]


@register_generator("superweights")
class SuperWeights(WeightGenerator):
    def __init__(self, slots: Sequence[Slot], groups: Sequence[int], budget: int,
                 max_templates: int = 8):
        super().__init__(slots, groups, budget)
        self.max_templates = max_templates
        self._banks, self._width = self._layout()
        sizes = [b.size for b in self._banks]
        alloc = split_budget(sizes, [len(b.users) for b in self._banks], self.budget, max_templates)
        self.banks = nn.ParameterList()
        self.coefficients = nn.ParameterList()
        for bank, numel in zip(self._banks, alloc):
            k = min(max(1, numel // bank.size), max_templates)
            self.banks.append(nn.Parameter(_kaiming(numel, bank.fan_in)))
            self.coefficients.append(nn.Parameter(_orthogonal_rows(len(bank.users), k)))
        # slot -> [(bank index, row in that bank's coefficients)] for widths 0..w
        self._pieces: list[list[tuple[int, int]]] = [[] for _ in self.slots]
        for b, bank in enumerate(self._banks):
            for row, slot in enumerate(bank.users):
                self._pieces[slot].append((b, row))
        self._plans: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}

    def _layout(self) -> tuple[list[_Bank], list[int]]:
        banks: list[_Bank] = []
        width = [0] * len(self.slots)
        for g in sorted(set(self.groups)):
            ids = [i for i, gi in enumerate(self.groups) if gi == g]
            kernels = {self.slots[i].kernel for i in ids}
            if len(kernels) > 1:
                raise ValueError(f"group {g} mixes kernel shapes {sorted(kernels)}")
            chain = width_chain([self.slots[i].shape for i in ids])
            for i in ids:
                s = self.slots[i].shape
                width[i] = next(w for w, c in enumerate(chain) if c[0] >= s[0] and c[1] >= s[1])
            kernel = chain[0][2:]
            fan_in = chain[-1][1] * math.prod(kernel)
            for w, c in enumerate(chain):
                if w == 0:
                    in_shape, out_shape = c, (0,)
                else:
                    p = chain[w - 1]
                    in_shape = (p[0], c[1] - p[1], *kernel)
                    out_shape = (c[0] - p[0], c[1], *kernel)
                users = tuple(i for i in ids if width[i] >= w)
                banks.append(_Bank(g, w, in_shape, out_shape, users, fan_in))
        return banks, width

    def bank_numel(self) -> int:
        return sum(p.numel() for p in self.banks)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return list(self.coefficients)

    def templates(self, b: int) -> torch.Tensor:
        """The (K, s) templates of bank `b`: consecutive windows, or the bank tiled when too small."""
        bank, size = self.banks[b], self._banks[b].size
        k = self.coefficients[b].shape[1]
        if bank.numel() >= size:
            return bank[: k * size].view(k, size)
        return bank.repeat(-(-size // bank.numel()))[:size].view(1, size)

    def _plan(self, slot_ids: tuple[int, ...]) -> list[tuple[int, torch.Tensor]]:
        """Which coefficient rows each bank needs for these slots (cached: same slots, same plan)."""
        plan = self._plans.get(slot_ids)
        if plan is None:
            rows: dict[int, list[int]] = {}
            for slot in slot_ids:
                for b, row in self._pieces[slot]:
                    rows.setdefault(b, []).append(row)
            plan = [(b, torch.tensor(sorted(set(r)))) for b, r in sorted(rows.items())]
            self._plans[slot_ids] = plan
        return plan

    def generate(self, slot_ids: Sequence[int]) -> list[torch.Tensor]:
        slot_ids = tuple(slot_ids)
        # The engine calls this per stage per request, where per-call overhead costs more than
        # the arithmetic (benchmarks/serving.py): parameters are read from the lists' own dicts
        # (indexing a ParameterList goes through getattr), a bank holding exactly its K templates
        # is viewed rather than sliced, and each product is split into rows in one call.
        coefficients, banks = self.coefficients._parameters, self.banks._parameters
        pieces: dict[tuple[int, int], torch.Tensor] = {}
        for b, rows in self._plan(slot_ids):
            coeffs, bank, size = coefficients[str(b)], banks[str(b)], self._banks[b].size
            k = coeffs.shape[1]
            templates = bank.view(k, size) if bank.numel() == k * size else self.templates(b)
            # one matmul per bank for all the rows this request needs
            made = coeffs.index_select(0, rows.to(coeffs.device)) @ templates
            pieces.update(zip([(b, row) for row in rows.tolist()], made.unbind(0)))
        return [self._assemble(slot, pieces) for slot in slot_ids]

    def _assemble(self, slot: int, pieces: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
        # Slabs that grow the same axis one after another are joined by one cat (the same values
        # as one cat each), and a piece that is a single slab is viewed without slicing.
        weight, axis, run = None, 1, []
        for b, row in self._pieces[slot]:
            bank, flat = self._banks[b], pieces[b, row]
            if weight is None:
                weight = flat.view(bank.in_shape)
                continue
            cut, numel = math.prod(bank.in_shape), flat.numel()
            # extra input channels grow axis 1, then extra output channels grow axis 0
            for dim, lo, hi, shape in ((1, 0, cut, bank.in_shape), (0, cut, numel, bank.out_shape)):
                if hi == lo:
                    continue
                if dim != axis and run:
                    weight, run = torch.cat([weight, *run], dim=axis), []
                axis = dim
                run.append((flat if hi - lo == numel else flat[lo:hi]).view(shape))
        if run:
            weight = torch.cat([weight, *run], dim=axis)
        out, inp = self.slots[slot].shape[:2]
        if weight.shape[0] != out or weight.shape[1] != inp:
            weight = weight[:out, :inp]   # narrower than its width on one axis: lead channels
        return weight


def _kaiming(numel: int, fan_in: int) -> torch.Tensor:
    return torch.randn(numel) * math.sqrt(2.0 / fan_in)


def _orthogonal_rows(rows: int, k: int) -> torch.Tensor:
    """Orthogonal init, rows rescaled to unit norm so every piece starts at the Kaiming scale."""
    coeffs = torch.empty(rows, k)
    nn.init.orthogonal_(coeffs)
    return coeffs / coeffs.norm(dim=1, keepdim=True).clamp_min(1e-12)
