"""SuperWeights generation in few, large operations: one product per bank, written into one buffer per group.

Within a group, a layer of width ``w`` is the top-left crop of the group's widest shape,
and each width ``j`` contributes one L-shaped region: its extra input channels (rows
``< o_{j-1}``, columns ``[i_{j-1}, i_j)``) and its extra output channels (rows
``[o_{j-1}, o_j)``, columns ``< i_j``). So every layer of a group that a call needs can
live in one buffer ``(R, O, I, *kernel)``, slots ordered widest first: the users of
width ``j`` are then the first ``R_j`` rows, one product ``coefficients[rows] @
templates`` fills their pieces, and two strided copies put them in place. Each layer's
weight is a view of the buffer, so a call costs a few operations per (group, width)
instead of a few per (layer, width): across a whole stage, or across every member of a
batch, each bank is read by one product.

`AssemblyPlan` is computed once per set of slots and holds only shapes, offsets and a few
coefficient row numbers (never an index of weight size); the buffers live until the
caller drops the weights. Autograd flows through the copies, so training and serving
generate the same weights (to float rounding) through the same code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Block:
    """One rectangular region of a product, placed into the group buffer."""

    size: tuple[int, ...]         # (R_j, rows, cols, *kernel): the product seen through as_strided
    stride: tuple[int, ...]
    offset: int
    dest: tuple[slice, ...]       # where it goes in the group buffer


@dataclass(frozen=True)
class WidthStep:
    """One bank of a group: which coefficient rows, and where their product goes."""

    bank: int                              # piece index into the generator's coefficients
    rows: slice | torch.Tensor | None      # coefficient rows, one per user in buffer order (None: all)
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class GroupStep:
    shape: tuple[int, ...]                 # (R, O, I, *kernel) of the group buffer
    widths: tuple[WidthStep, ...]
    single: bool                           # one width only: the product is the buffer, no copy
    outputs: tuple[tuple[int, int, tuple[slice, ...] | None], ...]   # (position in the call, buffer row, crop)


@dataclass(frozen=True)
class AssemblyPlan:
    groups: tuple[GroupStep, ...]
    count: int                             # weights returned


def plan_assembly(slot_ids: Sequence[int], slot_shapes: Sequence[tuple[int, ...]], slot_group: Sequence[int],
                  slot_width: Sequence[int], banks: Sequence, rows: Sequence[dict[int, int]],
                  num_rows: Sequence[int], device: torch.device | None = None) -> AssemblyPlan:
    """The plan for `slot_ids`: per group, its buffer, each width's rows and blocks, each slot's crop.

    `banks` are the generator's (group, width) banks (``group``, ``width``, ``in_shape``,
    ``out_shape``); `rows[b]` maps a slot to its coefficient row in bank `b`, and
    `num_rows[b]` is that bank's row count; row numbers that need an index live on `device`.
    """
    by_group: dict[int, list[int]] = {}
    for pos, slot in enumerate(slot_ids):
        by_group.setdefault(slot_group[slot], []).append(pos)
    bank_of = {(bk.group, bk.width): b for b, bk in enumerate(banks)}
    groups = []
    with torch.inference_mode(False):     # plan tensors must be usable by a later training step
        for g, positions in by_group.items():
            order = sorted(positions, key=lambda p: -slot_width[slot_ids[p]])    # widest first: users are a prefix
            top = slot_width[slot_ids[order[0]]]
            chain = _chain([banks[bank_of[g, w]] for w in range(top + 1)])
            kernel = chain[0][2:]
            shape = (len(order), *chain[top][:2], *kernel)
            widths = []
            for w in range(top + 1):
                b = bank_of[g, w]
                users = [slot_ids[p] for p in order if slot_width[slot_ids[p]] >= w]
                widths.append(WidthStep(b, _rows([rows[b][s] for s in users], num_rows[b], device),
                                        _blocks(len(users), chain, w, kernel)))
            outputs = []
            for r, p in enumerate(order):
                out, inp = slot_shapes[slot_ids[p]][:2]
                crop = None if (out, inp) == shape[1:3] else (slice(0, out), slice(0, inp))
                outputs.append((p, r, crop))
            groups.append(GroupStep(shape, tuple(widths), top == 0, tuple(outputs)))
    return AssemblyPlan(tuple(groups), len(slot_ids))


def _chain(banks: Sequence) -> list[tuple[int, ...]]:
    """The group's nested shapes, width 0 first, from its banks' slabs."""
    chain = [tuple(banks[0].in_shape)]
    for bk in banks[1:]:
        prev = chain[-1]
        chain.append((prev[0] + bk.out_shape[0], bk.out_shape[1], *prev[2:]))
    return chain


def _rows(rows: list[int], total: int, device: torch.device | None) -> slice | torch.Tensor | None:
    if rows == list(range(total)):
        return None
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, device=device)


def _blocks(users: int, chain: list[tuple[int, ...]], w: int, kernel: tuple[int, ...]) -> tuple[Block, ...]:
    """Where width `w`'s pieces go: width 0 is the top-left block; wider ones add their
    extra input columns (above) and extra output rows (below), in that order in the piece."""
    kk = math.prod(kernel)
    inner = tuple(math.prod(kernel[d + 1:]) for d in range(len(kernel)))    # contiguous kernel strides
    o, i = chain[w][:2]
    po, pi = (0, 0) if w == 0 else chain[w - 1][:2]
    regions = [(0, po, pi, i), (po, o, 0, i)] if w else [(0, o, 0, i)]
    piece = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in regions) * kk
    out, offset = [], 0
    for r0, r1, c0, c1 in regions:
        rows, cols = r1 - r0, c1 - c0
        if rows and cols:
            out.append(Block((users, rows, cols, *kernel), (piece, cols * kk, kk, *inner), offset,
                             (slice(0, users), slice(r0, r1), slice(c0, c1))))
        offset += rows * cols * kk
    return tuple(out)


def run_assembly(plan: AssemblyPlan, coefficients: Callable[[int], torch.Tensor],
                 templates: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
    """The weights `plan` describes: per group one product per width, copied into one buffer."""
    out: list[torch.Tensor] = [None] * plan.count      # type: ignore[list-item]
    for group in plan.groups:
        buffer = None
        for step in group.widths:
            coeffs = coefficients(step.bank)
            if step.rows is not None:
                coeffs = coeffs[step.rows] if isinstance(step.rows, slice) else coeffs.index_select(0, step.rows)
            made = torch.mm(coeffs, templates(step.bank))
            if group.single:
                buffer = made.view(group.shape)
                break
            if buffer is None:
                buffer = made.new_empty(group.shape)
            for block in step.blocks:
                buffer[block.dest] = made.as_strided(block.size, block.stride, block.offset)
        views = buffer.unbind(0)
        for pos, r, crop in group.outputs:
            out[pos] = views[r] if crop is None else views[r][crop]
    return out
