"""ArbNet: one hashed table; the Dirichlet and Neighborhood hashes; checkpoints keep the hash."""
import math

import pytest
import torch

from npas_serve.errors import UserError
from npas_serve.family import FamilySpec, build_family
from npas_serve.generators.arbnet import dirichlet_hash, load_entropy, neighborhood_hash
from npas_serve.generators.base import Slot

TINY = dict(family="mnist1d-resnet-tiny", family_kwargs={"num_classes": 10, "in_channels": 1})


def family(budget=0.25, seed=0, **kwargs):
    return build_family(FamilySpec(**TINY, generator="arbnet", budget=budget, seed=seed, generator_kwargs=kwargs))


def test_spread_zero_is_the_balanced_modulo_hash():
    h = neighborhood_hash(1000, 64, 0.0)
    assert torch.equal(h, torch.arange(1000) % 64)
    loads = torch.bincount(h, minlength=64)
    assert loads.max() - loads.min() <= 1


def test_spread_moves_indices_near_their_deterministic_entry():
    torch.manual_seed(0)
    m = 1000
    h = neighborhood_hash(20_000, m, 3.0)
    base = torch.arange(20_000) % m
    offset = (h - base + m // 2) % m - m // 2          # circular distance
    assert (offset != 0).float().mean() > 0.5
    assert offset.abs().max() <= 6 * 3.0
    assert abs(offset.float().std().item() - 3.0) < 0.3


def test_higher_dirichlet_alpha_balances_the_loads():
    torch.manual_seed(0)
    m = 500
    entropy = {a: load_entropy(dirichlet_hash(50_000, m, a), m) for a in (0.1, 1.0, 10.0)}
    assert entropy[0.1] < entropy[1.0] < entropy[10.0] < math.log(m)
    assert entropy[10.0] > 0.99 * math.log(m)


def test_a_table_entry_gets_the_sum_of_its_weights_gradients():
    fam = family(budget=0.05)
    gen = fam.generator
    ids = list(range(len(fam.slots)))
    weights = gen.generate(ids)
    targets = [torch.randn_like(w) for w in weights]
    sum((w * t).sum() for w, t in zip(weights, targets)).backward()
    expected = torch.zeros(gen.bank_numel())
    for i, t in zip(ids, targets):
        idx = gen.index[gen._offsets[i]:gen._offsets[i + 1]].long()
        expected.index_add_(0, idx, t.flatten() * gen._scale[i])
    torch.testing.assert_close(gen.banks[0].grad, expected)
    for i, w in zip(ids, weights):      # and every weight is its table entry times the layer's scale
        idx = gen.index[gen._offsets[i]:gen._offsets[i + 1]].long()
        torch.testing.assert_close(w.flatten(), gen.banks[0].detach()[idx] * gen._scale[i])


@pytest.mark.parametrize("kwargs", [{"hash": "dirichlet", "alpha": 0.5}, {"hash": "neighborhood", "spread": 4.0}])
def test_the_hash_travels_in_the_state_dict(kwargs):
    a, b = family(seed=0, **kwargs), family(seed=1, **kwargs)
    assert "generator.index" in a.state_dict()
    assert not torch.equal(a.generator.index, b.generator.index)
    x = torch.randn(2, 1, 40)
    b.generator.generate([0])          # fill b's plan cache: loading must invalidate it
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    with torch.no_grad():
        for ea, eb in zip(a(x), b(x)):
            torch.testing.assert_close(ea[-1], eb[-1])


def test_diagnostics_report_the_bucket_entropy():
    fam = family(hash="neighborhood", spread=0.0, budget=0.05)
    d = fam.generator.diagnostics()
    assert d["bucket_entropy_max"] == pytest.approx(math.log(fam.budget_params))
    assert d["bucket_balance"] > 0.999 and d["empty_buckets"] == 0
    low = family(hash="dirichlet", alpha=0.1, budget=0.05).generator.diagnostics()
    assert low["bucket_balance"] < d["bucket_balance"] and low["empty_buckets"] > 0


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="unknown ArbNet hash"):
        family(hash="cuckoo")
    with pytest.raises(UserError, match="alpha > 0"):
        family(alpha=0.0)
    with pytest.raises(UserError, match="spread >= 0"):
        family(hash="neighborhood", spread=-1.0)
