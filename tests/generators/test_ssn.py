"""SSN: template downsampling, the three upsamplings, budgets far below and above the network."""
import itertools
import math

import pytest
import torch

from npas_serve.errors import UserError
from npas_serve.family import FamilySpec, build_family
from npas_serve.generators.base import Slot
from npas_serve.generators.ssn import SSN, inter_block

TINY = dict(family="mnist1d-resnet-tiny", family_kwargs={"num_classes": 10, "in_channels": 1})


def family(budget, **kwargs):
    return build_family(FamilySpec(**TINY, generator="ssn", budget=budget, generator_kwargs=kwargs))


@pytest.mark.parametrize("down,up", list(itertools.product(("wavg", "emb", "avg"), ("inter", "repeat", "mask"))))
@pytest.mark.parametrize("budget", [0.1, 0.25, 2.0])
def test_every_mapping_builds_every_layer_within_budget(down, up, budget):
    fam = family(budget, down=down, up=up)
    gen = fam.generator
    assert gen.bank_numel() <= fam.budget_params
    weights = gen.generate(range(len(fam.slots)))
    assert [tuple(w.shape) for w in weights] == [s.shape for s in fam.slots]
    assert all(torch.isfinite(w).all() for w in weights)
    loss = sum((w ** 2).sum() for w in weights)
    loss.backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in gen.banks)
    learned = gen.no_decay_parameters()
    if down == "avg" and (up != "mask" or budget > 1):
        assert learned == []                     # plain mean: nothing per layer to learn
    else:
        assert learned and all(p.grad is not None for p in learned)


def test_low_budgets_upsample_and_high_budgets_combine_templates():
    low, high = family(0.1).generator, family(2.0).generator
    assert low.diagnostics()["upsampled_layers"] > 0
    assert high.diagnostics()["upsampled_layers"] == 0
    assert high.diagnostics()["mean_templates"] > low.diagnostics()["mean_templates"] > 1


def test_inter_block_shrinks_from_095_until_it_fits():
    assert inter_block((10, 10, 3), 10_000) == (10, 30)          # p = 0.95 rounds back to the full shape
    rows, cols = inter_block((64, 32, 3), 1000)
    assert rows * cols <= 1000 and cols % 3 == 0
    assert rows * cols > 1000 / 4                               # not needlessly small
    assert inter_block((512, 512, 3), 3) == (1, 3)               # far below 5%: p keeps halving
    with pytest.raises(UserError, match="cannot build"):
        inter_block((8, 8, 3), 2)


def test_inter_interpolates_a_block_of_the_bank():
    slots = [Slot(0, 0, "a", (8, 4, 3), 0.0)]
    gen = SSN(slots, [0], 40, down="avg", up="inter")
    rows, cols = gen._block[0]
    w = gen.generate([0])[0]
    block = gen.banks[0][: rows * cols].view(1, 1, rows, cols)
    expected = torch.nn.functional.interpolate(block, size=(8, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(w.reshape(8, 12), expected.reshape(8, 12))


def test_repeat_tiles_and_mask_scales_each_copy():
    slots = [Slot(0, 0, "a", (4, 4, 3), 0.0)]
    rep = SSN(slots, [0], 20, down="avg", up="repeat")
    flat = rep.generate([0])[0].flatten()
    torch.testing.assert_close(flat, rep.banks[0].detach().repeat(3)[:48])
    mask = SSN(slots, [0], 20, down="avg", up="mask", mask_window=4)
    with torch.no_grad():
        mask.masks["0"][1] = 2.0
    flat = mask.generate([0])[0].flatten()
    bank = mask.banks[0].detach()
    torch.testing.assert_close(flat[:20], bank)
    torch.testing.assert_close(flat[20:40], 2 * bank)


def test_wavg_downsampling_is_a_weighted_sum_of_consecutive_windows():
    slots = [Slot(0, 0, "a", (2, 2, 3), 0.0)]
    gen = SSN(slots, [0], 50, down="wavg")
    k = gen._k[0]
    assert k == 50 // 12 == 4
    templates = gen.banks[0][: k * 12].view(k, 12)
    expected = (gen.coefficients[0] @ templates)
    torch.testing.assert_close(gen.generate([0])[0].flatten(), expected)


def test_high_budget_freezes_into_plain_modules_with_the_same_outputs():
    fam = family(2.0).eval()
    x = torch.randn(3, 1, 40)
    with torch.no_grad():
        for m in range(len(fam.members)):
            plain = fam.freeze(m).eval()
            torch.testing.assert_close(plain(x)[-1], fam(x, members=[m])[0][-1])


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="down"):
        family(0.5, down="median")
    with pytest.raises(UserError, match="cannot take options"):
        family(0.5, templates=3)


@pytest.mark.parametrize("method,kwargs", [("ssn", {"down": "wavg"}), ("arbnet", {"hash": "neighborhood"})])
def test_layers_start_at_their_kaiming_scale_and_banks_at_a_superweights_scale(method, kwargs):
    fam = build_family(FamilySpec(**TINY, generator=method, budget=2.0, generator_kwargs=kwargs))
    fan_max = max(s.fan_in for s in fam.slots)
    for s, w in zip(fam.slots, fam.generator.generate(range(len(fam.slots)))):
        if s.numel >= 2000:
            assert w.std().item() == pytest.approx(math.sqrt(2 / s.fan_in), rel=0.2), s
    # the bank's scale sets how far one Adam step moves a weight: as large as SuperWeights' own
    biggest = max(fam.generator.banks, key=lambda b: b.numel())
    assert biggest.std().item() == pytest.approx(math.sqrt(2 / fan_max), rel=0.2)
