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
from npas_serve.train.gradient import cropped_cosine, match_layers, slot_gradients
from npas_serve.train.search import search_members

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
    found = match_layers(slots, bins, grads, largest=0, budget=10**6)
    groups, ids = found.groups, found.coefficient_ids
    assert groups[0] == groups[1] != groups[2]
    assert groups[3] == groups[2]          # the small layer's gradient matches layer 2's (another depth)
    assert len(set(ids[:3])) == 3          # merged layers of the largest member keep their own rows
    assert ids[3] == ids[2]                # the joining layer shares its partner's row
    assert found.diagnostics["merges"] == [["0:l0", "0:l1", pytest.approx(1.0, abs=0.01)]]
    assert found.diagnostics["joins"] == [["1:s", "0:l2", pytest.approx(1.0, abs=1e-4)]]


def test_merges_do_not_chain():
    """a~b and b~c above the threshold, a and c opposed: one pair merges, the third layer stays alone
    (union-find would have put all three in one group)."""
    slots = [Slot(0, 0, f"l{i}", (8, 8, 3), 0.0) for i in range(3)]
    u, v = torch.randn(192), torch.randn(192)
    u, v = u / u.norm(), v - (v @ u) / (u @ u) * u
    v = v / v.norm()
    grads = [(u + 0.2 * v).view(8, 8, 3), u.view(8, 8, 3), (u - 0.2 * v).view(8, 8, 3)]
    grads[0], grads[2] = grads[0] + 2 * v.view(8, 8, 3), grads[2] - 2 * v.view(8, 8, 3)
    assert cropped_cosine(grads[0], grads[1]) > 0.1 and cropped_cosine(grads[1], grads[2]) > 0.1
    assert cropped_cosine(grads[0], grads[2]) < 0.1
    groups = match_layers(slots, [0, 0, 0], grads, largest=0, budget=10**6).groups
    assert len(set(groups)) == 2


def test_members_of_the_largest_depth_join_by_position():
    """Member 1 has the largest member's depth: its k-th layer takes the k-th layer's group and row,
    whatever its gradient says; member 2 (another depth) joins by gradient, member 3 (member 2's
    depth) by position with member 2."""
    lead = [Slot(0, 0, f"l{i}", (8, 8, 3), i / 2) for i in range(2)]
    same = [Slot(1, 0, f"l{i}", (4, 4, 3), i / 2) for i in range(2)]
    other = [Slot(2, 0, "only", (4, 4, 3), 0.0)]
    again = [Slot(3, 0, "only", (4, 4, 3), 0.0)]
    g = torch.randn(8, 8, 3)
    h = torch.randn(8, 8, 3)
    grads = [g, h, h[:4, :4], g[:4, :4], h[:4, :4], g[:4, :4]]   # member 1's gradients point the other way
    found = match_layers(lead + same + other + again, [0, 1, 0, 1, 0, 0], grads, largest=0, budget=10**6)
    ids, groups = found.coefficient_ids, found.groups
    assert ids[2] == ids[0] and ids[3] == ids[1]         # by position, not by gradient
    assert ids[4] == ids[0]                               # another depth: by gradient, in its bin
    assert ids[5] == ids[4] and groups[5] == groups[4]    # its depth again: by position
    assert [j[2] for j in found.diagnostics["joins"]][:2] == ["position", "position"]


def test_merge_lowers_the_threshold_until_the_groups_fit():
    slots, bins, grads = lead_and_other()
    one_bank = 8 * 8 * 3
    assert len(set(match_layers(slots, bins, grads, 0, budget=2 * one_bank).groups)) == 2
    assert len(set(match_layers(slots, bins, grads, 0, budget=one_bank).groups)) == 1   # down to the bin
    # below even the bins' one template each, SuperWeights pools: the threshold stays where it started
    below = match_layers(slots, bins, grads, 0, budget=one_bank - 1)
    assert len(set(below.groups)) == 2 and below.diagnostics["threshold"] == 0.1
    assert below.diagnostics["below_one_template_per_bin"]


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
    cfg = TrainConfig(epochs=1, batch_size=4)
    grads = slot_gradients(fam, x, y, cfg)
    assert [tuple(g.shape) for g in grads] == [s.shape for s in fam.slots]
    assert all(g.abs().sum() > 0 for g in grads)
    assert "generate" not in fam.generator.__dict__             # the recording hook is gone
    assert not fam.training                                     # eval mode: batch norm's running statistics
    only = slot_gradients(fam, x, y, cfg, members=[1])    # each member's own loss: nothing reaches the others
    assert all((g.abs().sum() > 0) == (s.member == 1) for g, s in zip(only, fam.slots))


def test_search_warms_up_the_largest_member_and_one_per_depth():
    fam = build_family(FamilySpec(family="mnist1d-resnet"))
    assert search_members(fam) == [0, 2]    # deep-wide (largest) and deeper-narrow (3 blocks a stage)
    assert search_members(build_family(FamilySpec(**TINY))) == [0]   # one depth: the largest alone


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
        assert len(ids) == len(family.generator.coefficients)   # unsharing: classes per bank
        unshare = manifest.search["unshare"]
        assert unshare["rows_after"] > unshare["rows_before"]   # unsharing split some rows
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
        ids = result.generator_kwargs["coefficient_ids"]
        assert list(result.generator_kwargs) == ["coefficient_ids"]
        largest = [i for i, s in enumerate(family.slots) if s.member == 0]
        assert len({ids[i] for i in largest}) == len(largest)     # the largest member's layers: own rows
        for i, s in enumerate(family.slots):                      # every class lies inside one group
            assert all(result.groups[j] == result.groups[i] for j in range(len(ids)) if ids[j] == ids[i])
    assert manifest.search == result.diagnostics and manifest.search    # the diagnostics are recorded
    assert manifest.validation is not None and manifest.validation.size > 0


def test_unsharing_splits_per_bank_and_skips_one_template_banks(caplog):
    """Classes split bank by bank from gradients summed over an epoch; a bank with K = 1 (gradients
    are single numbers, cosine +-1) keeps its rows shared and says so."""
    spec = FamilySpec(**TINY, budget=1.0)
    fam = build_family(spec)
    bins = fam.generator.groups
    fam = build_family(dataclasses.replace(spec, generator_kwargs={"coefficient_ids": bins}))
    gen = fam.generator
    ks = [c.shape[1] for c in gen.coefficients]
    assert 1 in ks and max(ks) > 1
    x, y = torch.randn(16, 1, 40), torch.randint(0, 3, (16,))
    before = gen.bank_classes()
    with caplog.at_level("INFO", logger="npas_serve.train.unshare"):
        split = unshare_coefficients(fam, x, y, TrainConfig(epochs=4, batch_size=8, unshare_epoch=1))
    assert split.diagnostics["banks_skipped_one_template"] == [b for b, k in enumerate(ks) if k == 1
                                                              and len(gen._banks[b].users) > 1]
    assert "one template" in caplog.text
    for b, k in enumerate(ks):
        users = gen._banks[b].users
        if k == 1:
            assert [split.coefficient_ids[b][s] for s in users] == [before[b][s] for s in users]
    assert split.diagnostics["rows_after"] == sum(c.shape[0] for c in gen.coefficients)
    assert split.diagnostics["rows_after"] > split.diagnostics["rows_before"]    # random start: they disagree


def test_kmeans_search_reports_how_far_the_embeddings_moved(small_npz):
    from npas_serve.data import load_dataset
    from npas_serve.train.kmeans import kmeans_groups

    data = load_dataset(str(small_npz))
    x = torch.from_numpy(data.normalisation().apply(data.x_train))[:, None]
    spec = FamilySpec(**TINY, generator="ssn", grouping="kmeans", budget=1.0)
    result = kmeans_groups(spec, x, torch.from_numpy(data.y_train), TrainConfig(epochs=20, batch_size=32))
    d = result.diagnostics
    assert d["warm_up_epochs"] == 2 and -1 <= d["ari_against_initial_embeddings"] <= 1
    assert d["embedding_cosine_to_initial"]["min"] < 1.0                            # the embeddings moved
