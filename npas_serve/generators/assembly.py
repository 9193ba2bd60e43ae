"""SuperWeights generation in few, large operations: one product per bank, written into one buffer per layer shape.

Within a group, a layer of width ``w`` is the top-left crop of the group's shape at that
width, and each width ``j`` contributes one L-shaped region: its extra input channels (rows
``< o_{j-1}``, columns ``[i_{j-1}, i_j)``) and its extra output channels (rows
``[o_{j-1}, o_j)``, columns ``< i_j``). So the layers of a group that a call needs live in
one buffer per layer shape, ``(n, out, in, *kernel)``, slots ordered widest first: the users
of width ``j`` are then the first ``R_j`` rows of one product ``coefficients[rows] @
templates``, and a few strided copies put each shape's rows of it in place. Each layer's
weight is a row of its buffer, contiguous (a convolution given a strided crop copies it at
every call), so a call costs a few operations per (group, width) instead of a few per
(layer, width): across a whole stage, or across every member of a batch, each bank is read
by one product.

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
    """One rectangular region of a product, placed into one of the group's buffers."""

    size: tuple[int, ...]         # (slots, rows, cols, *kernel), in the product and in the buffer
    stride: tuple[int, ...]       # the product seen through as_strided
    offset: int
    buffer: int                   # which of the group's buffers (one per layer shape)
    dest_stride: tuple[int, ...]  # where it goes in that buffer, through as_strided too
    dest_offset: int


@dataclass(frozen=True)
class WidthStep:
    """One bank of a group: which coefficient rows, and where their product goes."""

    bank: int                              # piece index into the generator's coefficients
    rows: slice | torch.Tensor | None      # coefficient rows, one per user in buffer order (None: all)
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class GroupStep:
    shapes: tuple[tuple[int, ...], ...]    # one buffer per layer shape: (slots, out, in, *kernel)
    widths: tuple[WidthStep, ...]
    single: bool                           # one width only: the product is the buffer, no copy
    outputs: tuple[tuple[int, int, int], ...]   # (position in the call, buffer, row)


@dataclass(frozen=True)
class AssemblyPlan:
    groups: tuple[GroupStep, ...]
    count: int                             # weights returned


def plan_assembly(slot_ids: Sequence[int], slot_shapes: Sequence[tuple[int, ...]], slot_group: Sequence[int],
                  slot_width: Sequence[int], banks: Sequence, rows: Sequence[dict[int, int]],
                  num_rows: Sequence[int], device: torch.device | None = None) -> AssemblyPlan:
    """The plan for `slot_ids`: per group, its buffers, each width's rows and blocks, each slot's row.

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
            width = {p: slot_width[slot_ids[p]] for p in positions}
            shape = {p: tuple(slot_shapes[slot_ids[p]][:2]) for p in positions}
            # widest first (a width's users are a prefix of the product's rows), one shape's slots together
            order = sorted(positions, key=lambda p: (-width[p], [-d for d in shape[p]]))
            top = width[order[0]]
            chain = _chain([banks[bank_of[g, w]] for w in range(top + 1)])
            kernel = chain[0][2:]
            shapes = list(dict.fromkeys(shape[p] for p in order))
            by_shape = [[p for p in order if shape[p] == s] for s in shapes]
            # per buffer: its first row in the product, its slots, its shape, its width
            buffers = [(order.index(ps[0]), len(ps), s, width[ps[0]]) for s, ps in zip(shapes, by_shape)]
            widths = []
            for w in range(top + 1):
                b = bank_of[g, w]
                users = [slot_ids[p] for p in order if width[p] >= w]
                widths.append(WidthStep(b, _rows([rows[b][s] for s in users], num_rows[b], device),
                                        _blocks(buffers, chain, w, kernel)))
            outputs = tuple((p, k, r) for k, ps in enumerate(by_shape) for r, p in enumerate(ps))
            groups.append(GroupStep(tuple((len(ps), *s, *kernel) for s, ps in zip(shapes, by_shape)),
                                    tuple(widths), top == 0, outputs))
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


def _blocks(buffers: Sequence[tuple[int, int, tuple[int, int], int]], chain: list[tuple[int, ...]], w: int,
            kernel: tuple[int, ...]) -> tuple[Block, ...]:
    """Where width `w`'s pieces go: width 0 is the top-left block; wider ones add their extra input
    columns (above) and extra output rows (below), in that order in the piece. Each buffer whose
    width spans `w` takes its rows of the product, each region cut to the buffer's shape."""
    kk = math.prod(kernel)
    inner = tuple(math.prod(kernel[d + 1:]) for d in range(len(kernel)))    # contiguous kernel strides
    o, i = chain[w][:2]
    po, pi = (0, 0) if w == 0 else chain[w - 1][:2]
    regions, start = [], 0
    for r0, r1, c0, c1 in ([(0, po, pi, i), (po, o, 0, i)] if w else [(0, o, 0, i)]):
        regions.append((r0, r1, c0, c1, start))
        start += (r1 - r0) * (c1 - c0) * kk
    piece = start
    out = []
    for k, (first, slots, (bo, bi), width) in enumerate(buffers):
        if width < w:
            continue
        for r0, r1, c0, c1, offset in regions:
            rows, cols = min(r1, bo) - r0, min(c1, bi) - c0
            if rows > 0 and cols > 0:
                out.append(Block((slots, rows, cols, *kernel), (piece, (c1 - c0) * kk, kk, *inner),
                                 first * piece + offset, k, (bo * bi * kk, bi * kk, kk, *inner),
                                 (r0 * bi + c0) * kk))
    return tuple(out)


def run_assembly(plan: AssemblyPlan, coefficients: Callable[[int], torch.Tensor],
                 templates: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
    """The weights `plan` describes: per group one product per width, copied into one buffer per shape."""
    out: list[torch.Tensor] = [None] * plan.count      # type: ignore[list-item]
    for group in plan.groups:
        buffers: list[torch.Tensor] = []
        for step in group.widths:
            coeffs = coefficients(step.bank)
            if step.rows is not None:
                coeffs = coeffs[step.rows] if isinstance(step.rows, slice) else coeffs.index_select(0, step.rows)
            made = torch.mm(coeffs, templates(step.bank))
            if group.single:
                buffers = [made.view(group.shapes[0])]
                break
            if not buffers:
                buffers = [made.new_empty(shape) for shape in group.shapes]
            for block in step.blocks:       # two views and a copy: fewer operations than slicing
                buffers[block.buffer].as_strided(block.size, block.dest_stride, block.dest_offset).copy_(
                    made.as_strided(block.size, block.stride, block.offset))
        views = [buffer.unbind(0) for buffer in buffers]
        for pos, k, r in group.outputs:
            out[pos] = views[k][r]
    return out
