"""The gradient grouping search, SSN's k-means groups and SuperWeights' coefficient unsharing."""
import copy
import dataclasses

import pytest
import torch

from npas_serve import registry
from npas_serve.checkpoint import load_checkpoint
from npas_serve.errors import UserError
from npas_serve.family import Family, FamilySpec, build_family
from npas_serve.generators.base import Slot
from npas_serve.generators.superweights import SuperWeights
from npas_serve.train import (SearchResult, TrainConfig, follow_grown_parameters, run_training,
                              unshare_coefficients)
from npas_serve.train.gradient import cropped_cosine, merge_by_gradient, slot_gradients

TINY = dict(family="mnist1d-resnet-tiny", family_kwargs={"num_classes": 3, "in_channels": 1})


def test_cropped_cosine_compares_common_leading_channels():
    a = torch.randn(8, 4, 3)
    b = torch.randn(16, 8, 3)
    b[:8, :4] = 2 * a
    assert cropped_cosine(a, b) == pytest.approx(1.0)
    assert cropped_cosine(a, -b) == pytest.approx(-1.0)


def lead_and_other():
    """Bin 0: three largest-member layers (0 and 1 agree, 2 disagrees) and one small-member layer."""
    slots = [Slot(0, 0, f"l{i}", (8, 8, 3), 0.0) for i in range(3)] + [Slot(1, 0, "s", (4, 4, 3), 0.0)]
    g = torch.randn(8, 8, 3)
    grads = [g, g + 0.01 * torch.randn_like(g), -g, -g[:4, :4]]
    return slots, [0, 0, 0, 0], grads


def test_merge_joins_agreeing_layers_and_other_members_follow_their_nearest():
    slots, bins, grads = lead_and_other()
    groups = merge_by_gradient(slots, bins, grads, largest=0, budget=10**6)
    assert groups[0] == groups[1] != groups[2]
    assert groups[3] == groups[2]          # the small layer's gradient matches layer 2's


def test_merge_lowers_the_threshold_until_the_groups_fit():
    slots, bins, grads = lead_and_other()
    one_bank = 8 * 8 * 3
    assert len(set(merge_by_gradient(slots, bins, grads, 0, budget=2 * one_bank))) == 2
    assert len(set(merge_by_gradient(slots, bins, grads, 0, budget=one_bank))) == 1   # down to the bin


def test_coefficient_classes_share_rows_and_splitting_keeps_the_function():
    slots = [Slot(0, 0, f"l{i}", (8, 8, 3), 0.0) for i in range(3)] + [Slot(1, 0, "s", (4, 8, 3), 0.0)]
    gen = SuperWeights(slots, [0] * 4, 8 * 8 * 3 * 2, coefficient_ids=[0, 0, 0, 0])
    w = gen.generate(range(4))
    assert torch.equal(w[0], w[1]) and torch.equal(w[0], w[2])
    assert torch.equal(w[3], w[0][:4])          # leading channels of the same weight
    assert [c.shape[0] for c in gen.coefficients] == [1, 1]    # width 0 (all four), width 1 (the 8x8 ones)
    grown = gen.split_coefficients([0, 1, 1, 2])
    assert [c.shape[0] for c in gen.coefficients] == [3, 2]
    assert [rows.tolist() for rows in grown.values()] == [[0, 0, 0], [0, 0]]
    for before, after in zip(w, gen.generate(range(4))):
        torch.testing.assert_close(before, after)
    with pytest.raises(ValueError, match="only split"):
        gen.split_coefficients([0, 0, 1, 2])


def test_optimiser_moments_follow_grown_rows():
    slots = [Slot(0, 0, f"l{i}", (4, 4, 3), 0.0) for i in range(2)]
    gen = SuperWeights(slots, [0, 0], 1000, coefficient_ids=[0, 0])
    opt = torch.optim.AdamW(gen.parameters(), lr=0.1)
    sum(w.sum() for w in gen.generate([0, 1])).backward()
    opt.step()
    before = opt.state[gen.coefficients[0]]["exp_avg"].clone()
    follow_grown_parameters(opt, gen.split_coefficients([0, 1]))
    after = opt.state[gen.coefficients[0]]["exp_avg"]
    assert after.shape == gen.coefficients[0].shape and torch.equal(after, before.repeat(2, 1))
    sum(w.sum() for w in gen.generate([0, 1])).backward()
    opt.step()                                 # the optimiser runs on with the grown parameter


def test_slot_gradients_are_the_gradients_of_the_generated_weights():
    fam = build_family(FamilySpec(**TINY))
    x, y = torch.randn(8, 1, 40), torch.randint(0, 3, (8,))
    cfg = TrainConfig(epochs=1)
    grads = slot_gradients(fam, x, y, cfg)
    assert [tuple(g.shape) for g in grads] == [s.shape for s in fam.slots]
    assert all(g.abs().sum() > 0 for g in grads)
    assert "generate" not in fam.generator.__dict__             # the recording hook is gone


def test_unsharing_is_a_no_op_without_shared_coefficients():
    fam = build_family(FamilySpec(**TINY))
    before = {k: v.clone() for k, v in fam.state_dict().items()}
    assert unshare_coefficients(fam, torch.randn(8, 1, 40), torch.zeros(8, dtype=torch.long),
                                TrainConfig(epochs=1, batch_size=4)) is None
    after = fam.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_searched_groupings_need_training():
    fam = build_family(FamilySpec(**TINY))
    with pytest.raises(UserError, match="searched by training"):
        Family(fam.members, fam.names, grouping="gradient")
    assert registry.meta("grouping", "gradient")["trains"]
    assert registry.meta("grouping", "kmeans")["trains"]
    assert not registry.meta("grouping", "shape").get("trains")


def test_unshared_grouping_gives_every_layer_its_own_bank():
    fam = build_family(FamilySpec(**TINY, grouping="unshared", budget_params=10**6))
    assert fam.generator.groups == list(range(len(fam.slots)))


@pytest.mark.parametrize("method,grouping", [("superweights", "gradient"), ("ssn", "kmeans")])
def test_searched_training_saves_groups_that_rebuild_the_checkpoint(tmp_path, small_npz, method, grouping):
    spec = FamilySpec(family="mnist1d-resnet-tiny", generator=method, grouping=grouping, budget=1.0)
    cfg = TrainConfig(epochs=3, search_epochs=1, unshare_epoch=1)
    family, manifest = run_training(spec, cfg, tmp_path / "run", data=str(small_npz), progress=False)
    groups = manifest.spec.groups
    kernels = {}
    for g, s in zip(groups, family.slots):
        kernels.setdefault(g, set()).add(s.kernel)
    assert all(len(k) == 1 for k in kernels.values())           # groups never mix kernel shapes
    if method == "superweights":
        ids = manifest.spec.generator_kwargs["coefficient_ids"]
        assert len(set(ids)) > len(set(groups))                 # unsharing split some classes
    loaded, _ = load_checkpoint(tmp_path / "run")
    x = torch.randn(4, 1, 40)
    with torch.no_grad():
        for a, b in zip(family.eval()(x), loaded(x)):
            torch.testing.assert_close(a[-1], b[-1])


@pytest.mark.parametrize("generator,grouping", [("superweights", "gradient"), ("ssn", "kmeans")])
def test_the_manifest_holds_the_spec_the_search_produced(tmp_path, small_npz, monkeypatch, generator, grouping):
    """The spec is built once from the user's spec and the search's result; nothing changes it later
    (unsharing is off here: it is the one step that refines the spec mid-run)."""
    found = []
    search = registry.lookup("grouping", grouping)

    def recording(*args):
        found.append(search(*args))
        return found[-1]

    meta = registry.meta("grouping", grouping)
    others = {name: fn for name, fn in registry._REGISTRY["grouping"].items() if name != grouping}
    monkeypatch.setitem(registry._REGISTRY, "grouping", others)        # restored after the test
    registry.register("grouping", grouping, **meta)(recording)
    spec = FamilySpec(family="mnist1d-resnet-tiny", generator=generator, generator_kwargs={"max_templates": 4}
                      if generator == "superweights" else {}, grouping=grouping, budget=1.0)
    family, manifest = run_training(spec, TrainConfig(epochs=2, search_epochs=1, unshare_epoch=0),
                                    tmp_path / "run", data=str(small_npz), progress=False)
    [result] = found
    assert isinstance(result, SearchResult)
    expected = dataclasses.replace(spec, family_kwargs={"num_classes": 3, "in_channels": 1}, groups=result.groups,
                                   generator_kwargs={**spec.generator_kwargs, **result.generator_kwargs})
    assert result.applied_to(dataclasses.replace(spec, family_kwargs=expected.family_kwargs)) == expected
    assert manifest.spec == family.spec == expected
    assert load_checkpoint(tmp_path / "run")[1].spec == expected
    assert spec.groups is None and "coefficient_ids" not in spec.generator_kwargs     # the input is untouched
    if generator == "superweights":
        assert result.generator_kwargs == {"coefficient_ids": result.groups}
