"""Resident bytes: counted through the generator's interface, not its state-dict names."""
from __future__ import annotations

import torch
from torch import nn

from npas_serve.engine.memory import resident_bytes, state_bytes
from npas_serve.family import share
from npas_serve.generators.base import WeightGenerator


class TableGenerator(WeightGenerator):
    """A generator laid out unlike the built-in ones: a `table` and a `scale`, no `banks`."""

    def __init__(self, slots, groups, budget):
        super().__init__(slots, groups, budget)
        self.table = nn.Parameter(torch.randn(max(s.numel for s in slots)))
        self.scale = nn.Parameter(torch.ones(len(slots)))
        self.register_buffer("offsets", torch.zeros(len(slots), dtype=torch.int64))

    def generate(self, slot_ids):
        return [self.table[: self.slots[i].numel].view(self.slots[i].shape) * self.scale[i] for i in slot_ids]

    def bank_parameters(self):
        return [self.table]


def family():
    return share([nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), nn.Linear(5, 3)])


def test_a_generator_with_its_own_layout_counts_its_bank_and_the_rest():
    fam = family()
    fam.generator = TableGenerator(fam.slots, fam.generator.groups, fam.generator.budget)
    rb = resident_bytes(fam, None, cache=0)
    assert rb.bank == 35 * 4                                  # the table: the largest slot, 7 x 5
    assert rb.coefficients == 3 * 4 + 3 * 8                   # a scale and an int64 offset per shared layer
    assert rb.norms_heads == (7 + 3 + 3) * 4                  # the biases, private to each member
    assert rb.total == state_bytes(fam)


def test_the_built_in_generator_counts_the_same_way():
    fam = family()
    rb = resident_bytes(fam, None, cache=16)
    assert rb.bank == fam.generator.bank_numel() * 4 > 0
    assert rb.bank + rb.coefficients == state_bytes(fam.generator)
    assert rb.total == state_bytes(fam) + 16


def test_frozen_members_are_counted_on_top():
    fam = family()
    frozen = [fam.freeze(m) for m in range(2)]
    rb = resident_bytes(fam, frozen, cache=0)
    assert rb.frozen == sum(state_bytes(m) for m in frozen) == (35 + 7 + 21 + 3 + 15 + 3) * 4
