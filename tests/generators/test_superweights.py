import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npas_serve.errors import UserError
from npas_serve.generators.base import Slot
from npas_serve.family import FamilySpec, build_family
from npas_serve.generators.superweights import SuperWeights, pooled_windows, split_budget, width_chain


def slots(*shapes, member=0):
    return [Slot(member, 0, f"l{i}", tuple(s), i / len(shapes)) for i, s in enumerate(shapes)]


# --- width_chain ------------------------------------------------------------------------------------

def test_width_chain_nests_shapes_smallest_first():
    shapes = [(16, 8, 3), (8, 4, 3), (4, 8, 3), (16, 16, 3), (8, 4, 3)]
    chain = width_chain(shapes)
    assert chain[0] == (4, 8, 3)
    assert chain[-1] == (16, 16, 3)
    for prev, nxt in zip(chain, chain[1:]):
        assert nxt != prev
        assert nxt[0] >= prev[0] and nxt[1] >= prev[1] and nxt[2:] == prev[2:]
    for s in shapes:   # every shape fits inside some width of the chain
        assert any(c[0] >= s[0] and c[1] >= s[1] for c in chain)


def test_width_chain_of_one_shape_is_that_shape():
    assert width_chain([(8, 8, 3, 3)] * 3) == [(8, 8, 3, 3)]


# --- split_budget -----------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 500), min_size=1, max_size=12), data=st.data())
def test_split_budget_never_exceeds_budget_and_caps_templates(sizes, data):
    users = data.draw(st.lists(st.integers(1, 12), min_size=len(sizes), max_size=len(sizes)))
    budget = data.draw(st.integers(len(sizes), 20 * sum(sizes)))
    try:
        alloc = split_budget(sizes, users, budget)
    except UserError:
        # only when some bank would get no parameter at all
        assert min(budget * s // sum(sizes) for s in sizes) < 1
        return
    assert sum(alloc) <= budget
    assert all(a >= 1 for a in alloc)
    if budget >= sum(sizes):   # whole templates, between 1 and 8 per bank
        for a, s in zip(alloc, sizes):
            assert a % s == 0 and 1 <= a // s <= 8
        # nothing left that would buy one more template for a bank below the cap
        left = budget - sum(alloc)
        assert all(a // s == 8 or s > left for a, s in zip(alloc, sizes))


def test_split_budget_caps_at_eight_templates_per_bank():
    assert split_budget([10, 20], [1, 1], 10_000) == [80, 160]


def test_split_budget_gives_extra_templates_to_most_used_banks_first():
    sizes, users = [10, 10, 10], [1, 3, 2]
    assert split_budget(sizes, users, 30) == [10, 10, 10]
    assert split_budget(sizes, users, 40) == [10, 20, 10]     # the bank with 3 users
    assert split_budget(sizes, users, 50) == [10, 20, 20]     # then the one with 2
    # a bank gets at most one template per user before the round-robin
    assert split_budget([10, 10], [1, 2], 60) == [20, 40]


def test_split_budget_below_one_template_each_is_proportional():
    alloc = split_budget([100, 300], [1, 1], 200)
    assert alloc == [50, 150]


def test_split_budget_too_small_raises_user_error():
    with pytest.raises(UserError, match="too small"):
        split_budget([100, 100, 100], [1, 1, 1], 2)


# --- the generator ----------------------------------------------------------------------------------

def test_bank_numel_within_budget_and_templates_per_bank():
    torch.manual_seed(0)
    ss = slots((8, 4, 3), (16, 8, 3), (16, 16, 3), (4, 1, 3), (8, 8, 1))
    for budget in (100, 500, 3000, 100_000):
        gen = SuperWeights(ss, [0, 0, 0, 0, 1], budget)
        assert gen.bank_numel() <= budget
        assert gen.pooled == (budget < sum(bank.size for bank in gen._banks))
        assert len(gen.banks) == (2 if gen.pooled else len(gen._banks))   # pooled: one bank per group
        for b, bank in enumerate(gen._banks):
            k = gen.coefficients[b].shape[1]
            numel = gen.banks[gen._source[b]].numel()
            if numel >= bank.size:
                assert k == min(max(1, numel // bank.size), 8)
            else:   # a piece larger than its pooled bank mixes several tiled windows
                assert k == min(numel, 8) and k > 1
            assert gen.coefficients[b].shape[0] == len(bank.users)
        for i, w in enumerate(gen.generate(range(len(ss)))):
            assert tuple(w.shape) == ss[i].shape


def test_narrow_and_wide_layers_share_leading_channels():
    torch.manual_seed(0)
    ss = slots((4, 2, 3), (8, 4, 3), (8, 8, 3))
    gen = SuperWeights(ss, [0, 0, 0], budget=10_000)
    narrow, mid, wide = gen.generate([0, 1, 2])
    assert not torch.equal(mid[:4, :2], narrow)       # independent rows: different weights
    with torch.no_grad():
        for b, bank in enumerate(gen._banks):
            rows = gen.coefficients[b]
            rows[:] = rows[len(bank.users) - 1]           # every user takes the widest layer's row
    narrow, mid, wide = gen.generate([0, 1, 2])
    assert torch.equal(wide[:4, :2], narrow)
    assert torch.equal(wide[:8, :4], mid)


def test_a_layer_narrower_on_one_axis_uses_the_leading_block():
    torch.manual_seed(0)
    ss = slots((8, 2, 3), (8, 8, 3))
    gen = SuperWeights(ss, [0, 0], budget=10_000)
    with torch.no_grad():
        for rows in gen.coefficients:
            rows[:] = rows[-1]
    thin, wide = gen.generate([0, 1])
    assert thin.shape == (8, 2, 3)
    assert torch.equal(wide[:, :2], thin)


def test_low_budget_pools_the_group_and_still_builds_every_layer():
    torch.manual_seed(0)
    ss = slots((16, 8, 3), (32, 16, 3), (32, 32, 3), (8, 1, 3))
    total = sum(s.numel for s in ss)
    gen = SuperWeights(ss, [0, 0, 0, 0], budget=total // 20)
    assert gen.bank_numel() <= total // 20
    assert gen.pooled and len(gen.banks) == 1
    assert any(gen.banks[0].numel() < bank.size for bank in gen._banks)   # really tiled
    for i, w in enumerate(gen.generate(range(len(ss)))):
        assert tuple(w.shape) == ss[i].shape
        assert torch.isfinite(w).all() and w.abs().sum() > 0


def test_pooled_windows_fit_or_tile_from_distinct_offsets():
    fit = pooled_windows(100, 30, 8)
    assert fit.tolist() == torch.arange(90).view(3, 30).tolist()   # consecutive windows, as a bank
    tiled = pooled_windows(10, 25, 8)
    assert tiled.shape == (8, 25) and int(tiled.max()) == 9
    assert len({row[0] for row in tiled.tolist()}) == 8            # every window its own offset
    assert torch.equal(tiled[:, 10:20], tiled[:, :10])             # a window is the bank tiled


@pytest.mark.parametrize("family", ["mnist1d-resnet-tiny", "mnist1d-resnet"])
def test_no_stem_collapses_to_rank_one_at_five_percent(family):
    """The tiling fallback gave the tiny family's stems one parameter each at 5% (every output
    channel equal); the pooled group bank gives every stem several templates instead."""
    fam = build_family(FamilySpec(family=family, budget=0.05))
    gen = fam.generator
    assert gen.pooled and gen.bank_numel() <= fam.budget_params
    stems = [i for i, s in enumerate(fam.slots) if s.shape[1] == 1]   # one input channel: the stems
    assert len(stems) == len(fam.names)
    for i, w in zip(stems, gen.generate(stems)):
        matrix = w.detach().flatten(1)
        assert torch.linalg.matrix_rank(matrix) == min(matrix.shape)       # full rank, not 1
        assert len({tuple(row) for row in matrix.tolist()}) == matrix.shape[0]   # no two channels equal
        assert all(gen.coefficients[b].shape[1] > 1 for b, _ in gen.pieces(i))   # templates to mix


def test_group_mixing_kernel_shapes_is_refused():
    with pytest.raises(ValueError, match="kernel"):
        SuperWeights(slots((8, 8, 3), (8, 8, 1)), [0, 0], budget=1000)


def test_generated_weight_is_a_differentiable_function_of_the_bank():
    torch.manual_seed(0)
    ss = slots((4, 2, 3), (8, 4, 3))
    gen = SuperWeights(ss, [0, 0], budget=10_000).double()
    probe = torch.randn(8, 4, 3, dtype=torch.float64)
    w = gen.generate([1])[0]
    (w * probe).sum().backward()
    grads = [p.grad.clone() for p in gen.banks]
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in gen.coefficients)
    # the gradient predicts how the weight moves when the bank moves (the map is linear in the bank)
    directions = [torch.randn_like(p) for p in gen.banks]
    eps = 1e-3
    with torch.no_grad():
        for p, d in zip(gen.banks, directions):
            p.add_(eps * d)
        moved = gen.generate([1])[0]
    predicted = sum((g * d).sum() for g, d in zip(grads, directions)) * eps
    assert torch.allclose(((moved - w.detach()) * probe).sum(), predicted, rtol=1e-6, atol=1e-9)


def test_generate_returns_requested_slots_in_order():
    torch.manual_seed(0)
    ss = slots((4, 2, 3), (8, 4, 3), (8, 8, 3))
    gen = SuperWeights(ss, [0, 0, 0], budget=5000)
    together = gen.generate([2, 0])
    # the same values; not always the same bits, since one product for both rounds differently on some CPUs
    torch.testing.assert_close(together[0], gen.generate([2])[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together[1], gen.generate([0])[0], rtol=1e-5, atol=1e-6)
    assert [tuple(w.shape) for w in together] == [(8, 8, 3), (4, 2, 3)]


def test_initial_pieces_have_kaiming_scale():
    torch.manual_seed(0)
    ss = slots((64, 64, 3), (64, 64, 3))
    gen = SuperWeights(ss, [0, 0], budget=math.prod((64, 64, 3)) * 4)
    w = gen.generate([0])[0]
    expected = math.sqrt(2.0 / (64 * 3))
    assert 0.8 * expected < w.std().item() < 1.2 * expected


def test_training_after_serving_in_the_same_process():
    """Plans cached under inference_mode (a server's first request) must not break a later backward."""
    family = build_family(FamilySpec(family="mnist1d-resnet-tiny"))
    x = torch.randn(4, 1, 40)
    with torch.inference_mode():
        family(x)
    loss = sum(logits.sum() for exits in family(x) for logits in exits)
    loss.backward()
    assert all(p.grad is not None for p in family.generator.banks)
