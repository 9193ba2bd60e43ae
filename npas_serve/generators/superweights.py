"""SuperWeights: layer weights composed from template banks (Teterwak et al., NPAS).

Within a group, distinct layer shapes form a chain of widths. Width 0 is the
smallest shape; each wider shape adds two slabs (extra input channels, then
extra output channels), so a layer's weight is the concatenation of one piece
per width it spans and wide and narrow layers share their leading channels:

    W_w = cat(cat(W_{w-1}, in_slab_w, dim=1), out_slab_w, dim=0)

Each (group, width) owns a flat bank; its K templates are consecutive windows
of the piece size ``s`` and a layer's piece is ``sum_k alpha_k * T_k`` with a
per-layer coefficient row (no softmax, no normalisation). See docs/methods.md#superweights.

This project's extension below one template per (group, width) (not in the
paper): the widths of a group pool their share of the budget into one group
bank of ``P`` parameters (shares proportional to the groups' summed piece
sizes), and each piece cuts its own K windows from it, following SSN's
downsampling (Plummer et al., docs/methods.md#shapeshifter-networks-ssn): a
piece with ``s <= P`` mixes the ``K = min(P // s, max_templates)`` consecutive
windows ``bank[k*s:(k+1)*s]``; a piece with ``s > P`` mixes
``K = min(P, max_templates)`` windows of the bank tiled to length ``s``, each
starting at its own offset ``k*P // K``. So no piece is generated from a bank
smaller than itself without several templates to mix, and a small layer (a
stem) gets several templates instead of a bank of a few parameters.
See docs/methods.md#pooled-low-budget-superweights.

Coefficient sharing (docs/methods.md#gradient-grouping-search, steps 1
and 5): ``coefficient_ids`` gives each slot a class, either one list for every
bank or one list per bank (after unsharing, which splits banks separately);
slots of one class use one coefficient row in a bank they both draw on, so
they generate the same (cropped) piece. `split_coefficients` refines the classes.
The ids are a constructor option, so they travel in the manifest's
``generator_kwargs`` and a checkpoint rebuilds with the right coefficient shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from npas_serve.errors import UserError
from npas_serve.generators.assembly import AssemblyPlan, plan_assembly, run_assembly
from npas_serve.generators.base import Slot, WeightGenerator, kaiming_bank, unit_orthogonal
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

    Below one template per bank, sizes are proportional to `sizes` (the pooled
    group banks). Never exceeds `budget`.
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
                 max_templates: int = 8, coefficient_ids: Sequence[int] | Sequence[Sequence[int]] | None = None):
        super().__init__(slots, groups, budget)
        self.max_templates = max_templates
        self._banks, self._width = bank_layout(self.slots, self.groups)
        # None: every slot its own coefficient rows (the plain method)
        self.coefficient_ids = None if coefficient_ids is None else self._checked_ids(coefficient_ids)
        sizes = [b.size for b in self._banks]
        # below one template per (group, width), the widths of a group pool into one bank
        self.pooled = self.budget < sum(sizes)
        groups = sorted({b.group for b in self._banks})
        self._source = [groups.index(b.group) if self.pooled else i for i, b in enumerate(self._banks)]
        if self.pooled:
            alloc = split_budget([sum(b.size for b in self._banks if b.group == g) for g in groups],
                                 [1] * len(groups), self.budget, max_templates)
            fan_in = [next(b.fan_in for b in self._banks if b.group == g) for g in groups]
        else:
            alloc = split_budget(sizes, [len(b.users) for b in self._banks], self.budget, max_templates)
            fan_in = [b.fan_in for b in self._banks]
        self.banks = nn.ParameterList(nn.Parameter(kaiming_bank(n, f)) for n, f in zip(alloc, fan_in))
        self.coefficients = nn.ParameterList()
        self._windows: list[torch.Tensor | None] = []   # (K, s) bank positions of a pooled piece
        rows = self._rows()
        for b, bank in enumerate(self._banks):
            numel = alloc[self._source[b]]
            windows = pooled_windows(numel, bank.size, max_templates) if self.pooled else None
            k = min(max(1, numel // bank.size), max_templates) if windows is None else len(windows)
            self._windows.append(windows)
            self.coefficients.append(nn.Parameter(unit_orthogonal(1 + max(rows[b].values()), k)))
        self._index_pieces(rows)

    def _checked_ids(self, ids: Sequence[int] | Sequence[Sequence[int]]) -> list[int] | list[list[int]]:
        per_bank = len(ids) > 0 and isinstance(ids[0], (list, tuple))
        lists = ids if per_bank else [ids]
        if per_bank and len(ids) != len(self._banks):
            raise ValueError(f"coefficient ids for {len(ids)} banks, the grouping has {len(self._banks)}")
        for one in lists:
            if len(one) != len(self.slots):
                raise ValueError(f"{len(one)} coefficient ids for {len(self.slots)} slots")
        return [[int(c) for c in one] for one in ids] if per_bank else [int(c) for c in ids]

    def bank_classes(self) -> list[list[int]]:
        """Per bank, every slot's coefficient class (a slot's own id when none is shared)."""
        ids = self.coefficient_ids
        if ids is None:
            return [list(range(len(self.slots)))] * len(self._banks)
        return ids if ids and isinstance(ids[0], list) else [ids] * len(self._banks)

    def _rows(self) -> list[dict[int, int]]:
        """Per bank, slot -> its coefficient row; slots of one coefficient class share a row."""
        out = []
        for bank, ids in zip(self._banks, self.bank_classes()):
            first: dict[int, int] = {}
            out.append({slot: first.setdefault(ids[slot], len(first)) for slot in bank.users})
        return out

    def _index_pieces(self, rows: list[dict[int, int]]) -> None:
        # slot -> [(bank index, row in that bank's coefficients)] for widths 0..w
        self._pieces: list[list[tuple[int, int]]] = [[] for _ in self.slots]
        for b, bank in enumerate(self._banks):
            for slot in bank.users:
                self._pieces[slot].append((b, rows[b][slot]))
        self._plans: dict[tuple[tuple[int, ...], torch.device], AssemblyPlan] = {}

    def split_coefficients(self, coefficient_ids: Sequence[int]) -> dict[nn.Parameter, torch.Tensor]:
        """Refine the coefficient classes; every new row starts as a copy of the row it splits from.

        Returns, for each coefficient parameter that grew, the old row each new row
        copies, so an optimiser's per-row state can follow (`index_select(0, rows)`).
        """
        previous, old_classes, old_rows = self.coefficient_ids, self.bank_classes(), self._rows()
        self.coefficient_ids = self._checked_ids(coefficient_ids)
        for bank, old_ids, ids in zip(self._banks, old_classes, self.bank_classes()):
            merged: dict[int, int] = {}
            for slot in bank.users:
                if merged.setdefault(ids[slot], old_ids[slot]) != old_ids[slot]:
                    self.coefficient_ids = previous
                    raise ValueError("split_coefficients can only split classes, not merge them")
        new_rows = self._rows()
        grown: dict[nn.Parameter, torch.Tensor] = {}
        for b, coeffs in enumerate(self.coefficients):
            source = torch.zeros(1 + max(new_rows[b].values()), dtype=torch.long)
            for slot, row in new_rows[b].items():
                source[row] = old_rows[b][slot]
            if len(source) != coeffs.shape[0]:
                coeffs.data = coeffs.data.index_select(0, source.to(coeffs.device))
                coeffs.grad = None      # a gradient of the old shape would not fit the next backward
                grown[coeffs] = source
        self._index_pieces(new_rows)
        return grown

    def bank_parameters(self) -> list[nn.Parameter]:
        return list(self.banks)

    def pieces(self, slot: int) -> list[tuple[int, int]]:
        """(bank, coefficient row) of each width `slot` spans, narrowest first."""
        return list(self._pieces[slot])

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return list(self.coefficients)

    def templates(self, b: int) -> torch.Tensor:
        """The (K, s) templates of piece `b`: consecutive windows of its bank, or of its group's
        pooled bank (tiled when the piece is larger)."""
        bank, windows = self.banks._parameters[str(self._source[b])], self._windows[b]
        size, k = self._banks[b].size, self.coefficients._parameters[str(b)].shape[1]
        if windows is not None and size > bank.numel():     # tiled: gather the windows
            if windows.device != bank.device:
                windows = self._windows[b] = windows.to(bank.device)
            return bank[windows]
        # consecutive windows (pooled or not): a view of the bank
        return bank.view(k, size) if bank.numel() == k * size else bank[: k * size].view(k, size)

    def diagnostics(self) -> dict[str, float]:
        k = [c.shape[1] for c in self.coefficients]
        return {"pooled": float(self.pooled), "mean_templates": sum(k) / len(k), "min_templates": float(min(k))}

    def _plan(self, slot_ids: tuple[int, ...], device: torch.device) -> AssemblyPlan:
        """Which rows of which bank, written where (cached: same slots and device, same plan)."""
        plan = self._plans.get((slot_ids, device))
        if plan is None:
            plan = self._plans[slot_ids, device] = plan_assembly(
                slot_ids, [s.shape for s in self.slots], self.groups, self._width, self._banks, self._rows(),
                [c.shape[0] for c in self.coefficients], device)
        return plan

    def generate(self, slot_ids: Sequence[int]) -> list[torch.Tensor]:
        # One product per bank for every slot asked for at once, written into one buffer per layer shape
        # (npas_serve/generators/assembly.py): a call costs a few operations per bank, not per layer.
        coefficients = self.coefficients._parameters     # indexing a ParameterList goes through getattr
        plan = self._plan(tuple(slot_ids), coefficients["0"].device)
        return run_assembly(plan, lambda b: coefficients[str(b)], self.templates)


def pooled_windows(numel: int, size: int, max_templates: int = 8) -> torch.Tensor:
    """(K, size) positions in a pooled bank of `numel` parameters: K consecutive windows when the
    piece fits, else K windows of the bank tiled, each from its own offset."""
    if size <= numel:
        k = min(numel // size, max_templates)
        return torch.arange(k * size).view(k, size)
    k = min(numel, max_templates)
    offsets = torch.arange(k) * numel // k
    return (offsets[:, None] + torch.arange(size)[None, :]) % numel


def bank_layout(slots: Sequence[Slot], groups: Sequence[int]) -> tuple[list[_Bank], list[int]]:
    """The (group, width) banks of a grouping and each slot's width; one template each is
    ``sum(bank.size)``, the least budget at which no bank has to tile."""
    banks: list[_Bank] = []
    width = [0] * len(slots)
    for g in sorted(set(groups)):
        ids = [i for i, gi in enumerate(groups) if gi == g]
        kernels = {slots[i].kernel for i in ids}
        if len(kernels) > 1:
            raise ValueError(f"group {g} mixes kernel shapes {sorted(kernels)}")
        chain = width_chain([slots[i].shape for i in ids])
        for i in ids:
            s = slots[i].shape
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
