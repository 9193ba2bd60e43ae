"""Shapeshifter Networks (SSN): layers of a parameter group draw on one flat bank (Plummer et al., NPAS).

How SSN works and what this project chose: docs/methods.md#shapeshifter-networks-ssn.

A group's bank holds ``P`` parameters. A layer needing ``n <= P`` parameters
downsamples: its ``K = min(max(1, P // n), max_templates)`` templates are the
consecutive windows ``bank[k*n:(k+1)*n]`` and a mapping combines them:

- ``wavg``: learned per-layer coefficients (orthogonal init);
- ``emb``: a learned per-layer embedding (``emb_size``-d) through the group's
  shared linear map to the coefficients (the first K of ``max_templates`` outputs);
- ``avg``: the plain mean of the templates.

A layer needing ``n > P`` upsamples the bank (one template, scaled by a learned
coefficient unless the mapping is ``avg``):

- ``inter``: a block of ``round(p*out) x round(p*in)*prod(kernel)`` parameters,
  bilinearly interpolated to ``(out, in*prod(kernel))``; ``p`` starts at 0.95 and
  drops by 0.05 until the block fits (below 0.05 it halves: our extension, so
  any budget of at least one kernel builds);
- ``repeat``: the bank tiled and cropped;
- ``mask``: the bank tiled, copy ``c`` multiplied element-wise by a learned
  vector of ``mask_window`` multipliers repeated along it (init 1: starts as
  ``repeat``, learns to tell the copies apart).

Unlike SuperWeights a bank is flat, so a group may mix kernel shapes. The
budget is split over groups in proportion to the summed sizes of their layers,
as the reference code does. Choice made here: one bank feeds layers of
different fan-in, so it is drawn at the Kaiming scale of the group's largest
fan-in, ``N(0, 2 / fan_max)``, and each layer's weight is multiplied by the
fixed factor ``sqrt(fan_max / fan_in)``: every layer starts at its own Kaiming
scale, and the bank's scale matches a SuperWeights bank, so Adam's steps
(relative to the parameter scale) are as large as there. With a
budget above the network's size (`high budget`), layers combine up to
``max_templates`` templates while training; `Family.freeze` bakes the result
into plain layers for inference at no extra cost.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from npas_serve.errors import UserError
from npas_serve.generators.base import Slot, WeightGenerator, kaiming_bank, unit_orthogonal
from npas_serve.registry import register_generator

DOWN = ("wavg", "emb", "avg")
UP = ("inter", "repeat", "mask")


def inter_block(shape: Sequence[int], params: int) -> tuple[int, int]:
    """The (rows, cols) block `inter` interpolates from: the largest p-scaled shape within `params`."""
    out, cols, kernel = shape[0], shape[1], math.prod(shape[2:])
    p = 0.95
    while True:
        rows, width = max(1, round(out * p)), max(1, round(cols * p)) * kernel
        if rows * width <= params:
            return rows, width
        if rows == 1 and width == kernel:
            raise UserError(f"an SSN bank of {params} parameters cannot build a layer of shape "
                            f"{tuple(shape)} (needs at least {kernel})")
        p = p - 0.05 if p > 0.075 else p / 2


def split_groups(sizes: Sequence[int], budget: int) -> list[int]:
    """Bank sizes proportional to `sizes` (floored, so never above `budget`)."""
    total = sum(sizes)
    alloc = [budget * s // total for s in sizes]
    if min(alloc) < 1:
        raise UserError(f"budget of {budget} parameters leaves an SSN group without a parameter")
    return alloc


@register_generator("ssn")
class SSN(WeightGenerator):
    def __init__(self, slots: Sequence[Slot], groups: Sequence[int], budget: int, down: str = "wavg",
                 up: str = "inter", max_templates: int = 8, emb_size: int = 24, mask_window: int = 9):
        super().__init__(slots, groups, budget)
        if down not in DOWN or up not in UP:
            raise UserError(f"ssn needs down in {DOWN} and up in {UP}, got down={down!r}, up={up!r}")
        if max_templates < 1 or emb_size < 1 or mask_window < 1:
            raise UserError("ssn needs max_templates, emb_size and mask_window >= 1")
        self.down, self.up, self.max_templates = down, up, max_templates
        ids = sorted(set(self.groups))
        self._bank_of = [ids.index(g) for g in self.groups]
        sizes = [sum(s.numel for s, b in zip(self.slots, self._bank_of) if b == i) for i in range(len(ids))]
        fan_max = [max(s.fan_in for s, b in zip(self.slots, self._bank_of) if b == i) for i in range(len(ids))]
        self.banks = nn.ParameterList(nn.Parameter(kaiming_bank(n, f))
                                      for n, f in zip(split_groups(sizes, self.budget), fan_max))
        self._k = []           # templates per slot; 0 marks an upsampled slot
        for s, b in zip(self.slots, self._bank_of):
            p = self.banks[b].numel()
            self._k.append(min(max(1, p // s.numel), max_templates) if s.numel <= p else 0)
        self._block = [inter_block(s.shape, self.banks[b].numel()) if k == 0 and up == "inter" else None
                       for s, b, k in zip(self.slots, self._bank_of, self._k)]
        self._scale = [math.sqrt(fan_max[b] / s.fan_in) for s, b in zip(self.slots, self._bank_of)]
        self.coefficients = nn.ParameterList()
        self.embeddings = nn.ParameterList()
        self.projections = nn.ParameterList()
        if down == "wavg":
            self.coefficients.extend(nn.Parameter(unit_orthogonal(1, max(k, 1))[0]) for k in self._k)
        elif down == "emb":
            self.embeddings.extend(nn.Parameter(unit_orthogonal(1, emb_size)[0]) for _ in self.slots)
            self.projections.extend(nn.Parameter(unit_orthogonal(max_templates, emb_size)) for _ in ids)
        self.masks = nn.ParameterDict()
        if up == "mask":
            for i, (s, b, k) in enumerate(zip(self.slots, self._bank_of, self._k)):
                if k == 0:
                    copies = -(-s.numel // self.banks[b].numel())
                    self.masks[str(i)] = nn.Parameter(torch.ones(copies, mask_window))

    def bank_parameters(self) -> list[nn.Parameter]:
        return list(self.banks)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return [*self.coefficients, *self.embeddings, *self.projections, *self.masks.values()]

    def layer_embeddings(self) -> torch.Tensor:
        """(slots, emb_size) embeddings of the `emb` mapping: SSN's features for k-means groups."""
        if self.down != "emb":
            raise ValueError("layer embeddings exist only with down='emb'")
        return torch.stack(list(self.embeddings)).detach()

    def _coefficients(self, slot: int, k: int) -> torch.Tensor | None:
        if self.down == "wavg":
            return self.coefficients[slot]
        if self.down == "emb":
            return self.projections[self._bank_of[slot]][:k] @ self.embeddings[slot]
        return None

    def generate(self, slot_ids: Sequence[int]) -> list[torch.Tensor]:
        return [self._one(i) for i in slot_ids]

    def _one(self, i: int) -> torch.Tensor:
        slot, bank, k = self.slots[i], self.banks[self._bank_of[i]], self._k[i]
        alpha = self._coefficients(i, max(k, 1))
        if k:                                            # downsample: K templates, mapped
            templates = bank[: k * slot.numel].view(k, slot.numel)
            flat = templates.mean(0) if alpha is None else alpha @ templates
        else:                                            # upsample one template, then scale it
            flat = self._upsample(i, bank, slot)
            if alpha is not None:
                flat = flat * alpha[0]
        return (flat * self._scale[i]).view(slot.shape)

    def _upsample(self, i: int, bank: torch.Tensor, slot: Slot) -> torch.Tensor:
        if self.up == "inter":
            rows, cols = self._block[i]
            block = bank[: rows * cols].view(1, 1, rows, cols)
            size = (slot.shape[0], slot.fan_in)
            return F.interpolate(block, size=size, mode="bilinear", align_corners=False).reshape(-1)
        copies = -(-slot.numel // bank.numel())
        if self.up == "repeat":
            return bank.repeat(copies)[: slot.numel]
        mask = self.masks[str(i)]
        position = torch.arange(bank.numel(), device=bank.device) % mask.shape[1]
        return (bank * mask[:, position]).reshape(-1)[: slot.numel]

    def diagnostics(self) -> dict[str, float]:
        down = [k for k in self._k if k]
        return {"upsampled_layers": float(len(self._k) - len(down)),
                "mean_templates": float(sum(down) / len(down)) if down else 0.0}
