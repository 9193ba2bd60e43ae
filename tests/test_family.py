import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from npas_serve.errors import UserError
from npas_serve.family import Family, FamilySpec, Member, build_family, share
from npas_serve.generators.superweights import width_chain
from npas_serve.layers import SharedConv1d, SharedConv2d, SharedLayer, SharedLinear
from npas_serve.train import family_loss

TINY = "mnist1d-resnet-tiny"


@pytest.fixture
def tiny() -> Family:
    """A fresh family per test (tests put it in eval mode or run backward on it)."""
    return build_family(FamilySpec(family=TINY, family_kwargs={"num_classes": 10, "in_channels": 1}))


@pytest.fixture
def tiny_templated() -> Family:
    """The tiny family at a budget of at least one template per (group, width): one bank per piece
    (below it, the widths of a group pool into one bank)."""
    return build_family(FamilySpec(family=TINY, budget=1.0))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(8, 1, 40, generator=torch.Generator().manual_seed(0))


def shared_layers(module: nn.Module) -> list[SharedLayer]:
    return [m for m in module.modules() if isinstance(m, SharedLayer)]


def test_forward_gives_every_exit_of_every_member(tiny, x):
    out = tiny(x)
    assert len(out) == len(tiny.names) == 3
    for exits in out:
        assert len(exits) == tiny.num_exits == 3
        assert all(logits.shape == (8, 10) for logits in exits)
    chosen = tiny(x, members=[2])
    assert len(chosen) == 1 and torch.equal(chosen[0][-1], out[2][-1])


def _regions(family: Family) -> list[list[tuple[int, int, int, int]]]:
    """Per bank, the (row0, row1, col0, col1) blocks its pieces fill in the group's widest weight.

    The spec of SuperWeights composition (docs/methods.md#superweights): width 0 is the smallest
    shape; width w adds the extra input channels of the previous rows, then the
    extra output channels across all inputs. A layer's weight is the leading block.
    """
    gen = family.generator
    regions = []
    for bank in gen._banks:
        ids = [i for i, g in enumerate(gen.groups) if g == bank.group]
        chain = width_chain([family.slots[i].shape for i in ids])
        c = chain[bank.width]
        if bank.width == 0:
            regions.append([(0, c[0], 0, c[1])])
        else:
            p = chain[bank.width - 1]
            regions.append([(0, p[0], p[1], c[1]), (p[0], c[0], 0, c[1])])
    return regions


def test_every_members_loss_reaches_the_bank(tiny_templated, x):
    """Each member alone trains the bank parameters inside its layers, and only those;
    together the members reach every bank parameter."""
    tiny = tiny_templated
    gen = tiny.generator
    assert not gen.pooled
    regions = _regions(tiny)
    y = torch.arange(8) % 10
    reached = [torch.zeros_like(p, dtype=torch.bool) for p in gen.banks]
    for m in range(len(tiny.names)):
        tiny.zero_grad(set_to_none=True)
        family_loss(tiny(x, members=[m]), y, [1 / 3, 2 / 3, 1]).backward()
        mine = [(s, gen.groups[i]) for i, s in enumerate(tiny.slots) if s.member == m]
        for b, p in enumerate(gen.banks):
            group = gen._banks[b].group
            inside = any(r0 < r1 and c0 < c1 and r0 < s.shape[0] and c0 < s.shape[1]
                         for s, g in mine if g == group
                         for r0, r1, c0, c1 in regions[b])
            moved = p.grad is not None and bool(p.grad.any())
            assert moved == inside, f"member {m}, bank {b}: gradient {moved}, inside its layers {inside}"
            if moved:
                reached[b] |= p.grad != 0
        for group in {g for _, g in mine}:   # every group the member draws on is trained by it
            assert any(gen.banks[b].grad.any() for b, bank in enumerate(gen._banks)
                       if bank.group == group and gen.banks[b].grad is not None)
        # its own heads learn, the other members' heads do not
        for other, member in enumerate(tiny.members):
            head_grad = member.heads[-1][-1].weight.grad
            assert (head_grad is not None and head_grad.abs().sum() > 0) == (other == m)
    for b, r in enumerate(reached):
        assert r.all(), f"{int((~r).sum())} parameters of bank {b} get gradient from no member"


def test_no_shared_layer_holds_a_weight_outside_a_forward_pass(tiny, x):
    layers = shared_layers(tiny)
    assert len(layers) == len(tiny.slots)
    assert all(layer.weight is None for layer in layers)
    tiny(x)
    assert all(layer.weight is None for layer in layers)
    with pytest.raises(RuntimeError):
        tiny(torch.randn(2, 3, 40))      # wrong channel count: fails inside a stage
    assert all(layer.weight is None for layer in layers)
    with pytest.raises(RuntimeError, match="without a bound weight"):
        tiny.members[0](x)              # a member run outside its family has no weights


def test_freeze_gives_a_plain_module_with_the_same_outputs(tiny, x):
    tiny.eval()
    expected = tiny(x)
    for m in range(len(tiny.names)):
        frozen = tiny.freeze(m)
        assert isinstance(frozen, Member)
        assert not shared_layers(frozen)
        assert any(isinstance(mod, nn.Conv1d) for mod in frozen.modules())
        frozen.eval()
        with torch.no_grad():
            got = frozen(x)
        assert len(got) == len(expected[m])
        for a, b in zip(got, expected[m]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # freezing copies: the family still holds no weights and has its own layers
    assert all(layer.weight is None for layer in shared_layers(tiny))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.ReLU(),
                                  nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.ReLU()))
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.pool(self.body(x)).flatten(1))


class Wide(Block):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 16, 3, padding=1), nn.ReLU(),
                                  nn.Sequential(nn.Conv1d(16, 16, 3, padding=1), nn.ReLU()))
        self.fc = nn.Linear(16, 3)


def test_share_converts_nested_modules_on_their_parents():
    models = [Block(), Wide(), nn.Linear(5, 3)]
    before = [sorted(n for n, _ in m.named_modules()) for m in models]
    family = share(models, budget=0.5, names=["small", "wide", "linear"])
    assert family.names == ["small", "wide", "linear"]
    for member, names in zip(family.members, before):
        model = member.stages[0]
        # no plain layer is left and no stray child was added next to the old one
        assert not any(type(m) in (nn.Conv1d, nn.Linear) for m in model.modules())
        assert sorted(n for n, _ in model.named_modules()) == names
    small = family.members[0].stages[0]
    assert isinstance(small.body[0], SharedConv1d) and isinstance(small.body[2][0], SharedConv1d)
    assert isinstance(small.fc, SharedLinear)
    assert isinstance(family.members[2].stages[0], SharedLinear)
    # the originals are untouched
    assert isinstance(models[0].body[2][0], nn.Conv1d) and isinstance(models[2], nn.Linear)
    assert len(family.slots) == 3 + 3 + 1
    assert family.generator.bank_numel() <= family.budget_params
    assert family.budget_params == int(0.5 * max(family.member_shared_numel()))
    out = family(torch.randn(4, 1, 12), members=[0, 1])
    assert [o[-1].shape for o in out] == [(4, 3), (4, 3)]
    assert family(torch.randn(4, 5), members=[2])[0][-1].shape == (4, 3)


def test_share_keeps_a_members_exit_heads_private():
    def member(width):
        stages = [nn.Sequential(nn.Conv1d(1, width, 3, padding=1), nn.ReLU()),
                  nn.Sequential(nn.Conv1d(width, width, 3, padding=1), nn.ReLU())]
        heads = [nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, 4)) for _ in stages]
        return Member(stages, heads)

    family = share([member(4), member(8)], budget=1.0)
    assert len(family.slots) == 4                     # the convolutions only
    assert all(isinstance(h[-1], nn.Linear) for m in family.members for h in m.heads)
    out = family(torch.randn(2, 1, 10))
    assert [[o.shape for o in exits] for exits in out] == [[(2, 4), (2, 4)]] * 2


@pytest.mark.parametrize("budget", [0, -1, -0.5, math.nan, math.inf])
def test_bad_budgets_raise_user_error(budget):
    with pytest.raises(UserError, match="budget"):
        share([Block(), Wide()], budget=budget)


def test_budget_too_small_to_build_a_layer_raises_user_error():
    with pytest.raises(UserError, match="too small"):
        share([Block(), Wide()], budget_params=11)
    with pytest.raises(UserError, match="budget"):
        share([Block(), Wide()], budget=1e-6)    # a fraction that rounds to no parameter


def test_budget_fraction_and_count():
    family = share([Block(), Wide()], budget_params=2000)
    assert family.budget_params == 2000 and family.generator.bank_numel() <= 2000
    family = share([Block(), Wide()], budget=0.25)
    assert family.budget_params == int(0.25 * max(family.member_shared_numel()))
    family = share([Block(), Wide()], budget=20)      # a fraction, however large: no magic switch to a count
    assert family.budget_params == 20 * max(family.member_shared_numel())
    assert share([Block(), Wide()]).budget_params == max(family.member_shared_numel())   # default: 1.0


@pytest.mark.parametrize("kwargs", [{"budget": 0.5, "budget_params": 2000}, {"budget_params": 0.5},
                                    {"budget_params": 0}, {"budget_params": True}])
def test_budget_as_fraction_or_count_not_both_and_a_count_is_whole(kwargs):
    with pytest.raises(UserError, match="budget"):
        share([Block(), Wide()], **kwargs)


def test_models_without_shareable_layers_are_refused():
    with pytest.raises(UserError, match="no member"):
        share([nn.Sequential(nn.ReLU())])


def test_members_with_different_exit_counts_are_refused():
    one = Member([nn.Conv1d(1, 2, 3)], [nn.Identity()])
    two = Member([nn.Conv1d(1, 2, 3), nn.Conv1d(2, 2, 3)], [nn.Identity(), nn.Identity()])
    with pytest.raises(UserError, match="exits"):
        share([one, two])


def test_build_family_is_seeded_and_resolves_its_spec_without_changing_it():
    spec = FamilySpec(family=TINY, family_kwargs={"num_classes": 10, "in_channels": 1}, seed=3)
    a = build_family(spec)
    assert a.spec.groups is not None and len(a.spec.groups) == len(a.slots)
    assert a.spec.budget == 0.5     # the family's registered default
    assert spec.groups is None and spec.budget is None                    # the caller's spec is a value
    assert a.spec == dataclasses.replace(spec, budget=0.5, groups=a.spec.groups)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.groups = [0]
    assert build_family(a.spec).spec == a.spec                             # a complete spec rebuilds itself
    b = build_family(FamilySpec(family=TINY, family_kwargs={"num_classes": 10, "in_channels": 1}, seed=3))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_digits_family_runs_on_8x8_images():
    family = build_family(FamilySpec(family="digits-cnn", family_kwargs={"num_classes": 10, "in_channels": 1}))
    assert family.names == ["deep-wide", "shallow-wide", "shallow-narrow"]
    out = family(torch.randn(3, 1, 8, 8))
    assert [[o.shape for o in exits] for exits in out] == [[(3, 10)] * 3] * 3
    assert family.generator.bank_numel() <= family.budget_params == int(0.45 * max(family.member_shared_numel()))


def test_family_learns_a_trivial_task():
    torch.manual_seed(0)
    family = share([Block(), Wide()], budget=0.5)
    x = torch.randn(64, 1, 12)
    y = (x.mean(dim=(1, 2)) > 0).long()
    opt = torch.optim.Adam(family.parameters(), lr=1e-2)
    for _ in range(60):
        loss = family_loss(family(x), y, [1.0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = [(exits[-1].argmax(1) == y).float().mean().item() for exits in family(x)]
    assert min(acc) > 0.9, acc
    assert F.cross_entropy(family(x)[0][-1], y).item() < 0.5


def test_a_spec_of_an_older_manifest_reads_method_as_generator_and_a_large_budget_as_a_count():
    old = {"family": TINY, "family_kwargs": {}, "method": "ssn", "method_kwargs": {"down": "emb"},
           "budget": 5000.0, "grouping": "shape", "groups": None, "seed": 0}
    spec = FamilySpec.from_dict(old)
    assert (spec.generator, spec.generator_kwargs) == ("ssn", {"down": "emb"})
    assert (spec.budget, spec.budget_params) == (None, 5000)
    assert FamilySpec.from_dict({**old, "budget": 0.5}).budget == 0.5
    assert FamilySpec.from_dict(spec.to_dict()) == spec


class WeightStandardisedConv(nn.Conv2d):
    """A user's Conv2d subclass: `share` used to skip it (it matched exact types)."""


def test_share_converts_subclasses_and_reports_what_it_left_alone():
    model = nn.Sequential(WeightStandardisedConv(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv3d(1, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    family = share([model], budget=1.0, names=["cnn"])
    stage = family.members[0].stages[0]
    assert isinstance(stage[0], SharedConv2d) and isinstance(stage[6], SharedLinear)
    assert isinstance(stage[3], nn.Conv3d)             # no shared twin: stays the model's own
    conversion = family.conversion
    assert conversion.converted == ["cnn.0: WeightStandardisedConv -> SharedConv2d", "cnn.6: Linear -> SharedLinear"]
    assert conversion.left_alone == {"BatchNorm2d": ["cnn.1"], "Conv3d": ["cnn.3"]}
    assert conversion.weights_replaced and "replaced" in conversion.lines()[0]
    assert "Conv3d x1" in conversion.lines()[1]
    assert "generated" in share.__doc__ and "replaced" in share.__doc__


def test_share_sets_a_spec_that_rebuilds_the_same_bank():
    family = share([Block(), Wide()], budget=0.5, seed=3)
    spec = family.spec
    assert spec.budget_params == family.budget_params and spec.seed == 3
    assert spec.groups == list(family.generator.groups) and spec.generator == "superweights"


def test_share_with_an_example_fails_at_once_on_a_member_the_data_does_not_fit():
    share([Block()], example=torch.randn(2, 1, 12))
    with pytest.raises(UserError, match="member 'm0' fails on inputs of shape"):
        share([Block()], example=torch.randn(2, 3, 12))
