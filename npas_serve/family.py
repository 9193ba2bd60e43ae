"""A family: several member networks whose shared layers all draw on one generator.

A member is a sequence of stages, each followed by an exit head, so every
member can answer early (anytime prediction). The family generates a stage's
weights just before the stage runs and drops them right after: outside a
forward pass only the generator's bank and coefficients, plus each member's
norms and heads, are held.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from npas_serve import registry
from npas_serve.errors import UserError
from npas_serve.generators.base import Slot, WeightGenerator
from npas_serve.layers import SharedLayer, to_plain, to_shared


class Member(nn.Module):
    """A network as stages, with an exit head after each; `forward` returns every exit's logits."""

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module]):
        super().__init__()
        if len(stages) != len(heads) or not stages:
            raise ValueError(f"a member needs one head per stage, got {len(stages)} stages, {len(heads)} heads")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        logits = []
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            logits.append(head(x))
        return logits


@dataclass(frozen=True)
class FamilySpec:
    """Everything needed to rebuild a family; stored verbatim in the checkpoint manifest.

    A value: nothing changes it after it is made. `build_family` returns the
    complete spec (budget and groups resolved) as `Family.spec`, and a training
    run builds its final spec once, from the user's and the search's results.
    """

    family: str = "mnist1d-resnet"
    family_kwargs: dict[str, Any] = field(default_factory=dict)
    generator: str = "superweights"
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    budget: float | None = None         # a fraction of the largest member's shared parameters
    budget_params: int | None = None    # or a parameter count; neither: the family's registered budget
    grouping: str = "shape"
    groups: list[int] | None = None     # the resolved grouping; None: computed from `grouping`
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FamilySpec":
        """A spec from a manifest, including those written before "method" became "generator"
        and before a count moved from `budget` (then: a count when above 10) to `budget_params`."""
        d = dict(d)
        for old, new in (("method", "generator"), ("method_kwargs", "generator_kwargs")):
            if old in d:
                d.setdefault(new, d.pop(old))
        budget = d.get("budget")
        if isinstance(budget, (int, float)) and budget > 10 and d.get("budget_params") is None:
            d["budget"], d["budget_params"] = None, int(budget)
        return cls(**d)


SHARED = "share()"    # FamilySpec.family of a family made by `share`: no builder to rebuild it from


class Family(nn.Module):
    spec: FamilySpec | None = None    # set by `build_family` and `share`: the complete spec it was built from
    conversion: "Conversion | None" = None   # set by `share`: what it converted and left alone

    def __init__(self, members: Sequence[Member], names: Sequence[str], generator: str = "superweights",
                 budget: float | None = 1.0, grouping: str = "shape", groups: Sequence[int] | None = None,
                 seed: int = 0, generator_kwargs: dict[str, Any] | None = None, budget_params: int | None = None):
        super().__init__()
        _family_checks(members, names)
        self.names = list(names)
        self.members = nn.ModuleList(members)
        self.slots: list[Slot] = []
        self._layers: list[list[list[SharedLayer]]] = []   # [member][stage] -> layers
        self._slot_ids: list[list[list[int]]] = []         # [member][stage] -> slot ids
        for m, member in enumerate(members):
            self._collect(m, member)
        if not self.slots:
            raise UserError("no member has a Conv1d, Conv2d or Linear layer to share")
        self.budget_params = resolve_budget(self.member_shared_numel(), budget, budget_params)
        if groups is None:
            if registry.meta("grouping", grouping).get("trains"):
                raise UserError(f"grouping {grouping!r} is searched by training: train with "
                                f"`npas-serve train --grouping {grouping}` (run_training), or pass its groups")
            groups = registry.create("grouping", grouping, self.slots, seed=seed)
        try:
            self.generator: WeightGenerator = registry.create(
                "generator", generator, self.slots, list(groups), self.budget_params, **(generator_kwargs or {}))
        except TypeError as err:    # an option the generator does not take (e.g. a mistyped --generator-arg)
            raise UserError(f"generator {generator!r} cannot take options {sorted(generator_kwargs or {})}: "
                            f"{err}") from None

    def _collect(self, m: int, member: Member) -> None:
        layers: list[list[SharedLayer]] = [[] for _ in member.stages]
        ids: list[list[int]] = [[] for _ in member.stages]
        for e, stage in enumerate(member.stages):
            named = [(n, mod) for n, mod in stage.named_modules() if isinstance(mod, SharedLayer)]
            for i, (name, layer) in enumerate(named):
                # depth position: the stage, refined by the layer's place inside it
                depth = (e + i / len(named)) / member.num_exits
                layers[e].append(layer)
                ids[e].append(len(self.slots))
                self.slots.append(Slot(m, e, f"stages.{e}.{name}".rstrip("."), layer.weight_shape, depth))
        self._layers.append(layers)
        self._slot_ids.append(ids)

    # --- sizes -------------------------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        return min(m.num_exits for m in self.members)

    def member_shared_numel(self) -> list[int]:
        """Per member, the parameters its shared layers would hold unshared."""
        counts = [0] * len(self.members)
        for slot in self.slots:
            counts[slot.member] += slot.numel
        return counts

    def member_private_numel(self) -> list[int]:
        """Per member, its own parameters (norms, heads, biases): never shared."""
        return [sum(p.numel() for p in m.parameters()) for m in self.members]

    # --- running -----------------------------------------------------------------------------
    @torch.no_grad()
    def check_runs(self, x: torch.Tensor) -> None:
        """Every member once on the batch `x` (in eval mode); a member that fails is a UserError."""
        was_training = self.training
        self.eval()
        try:
            for m, name in enumerate(self.names):
                try:
                    list(self.iter_exits(x, m))
                except RuntimeError as err:
                    raise UserError(f"member {name!r} fails on inputs of shape {tuple(x.shape)}: "
                                    f"{str(err).splitlines()[0]}") from None
        finally:
            self.train(was_training)

    def stage_weights(self, member: int, stage: int) -> list[torch.Tensor]:
        return self.generator.generate(self._slot_ids[member][stage])

    def steps_weights(self, steps: Sequence[tuple[int, int]]) -> list[list[torch.Tensor]]:
        """The weights of several (member, stage) steps from one generator call, so a generator
        reads each bank once for all of them (a batch's members); per step, as `stage_weights`."""
        ids = [self._slot_ids[m][s] for m, s in steps]
        flat = self.generator.generate([i for one in ids for i in one])
        out, start = [], 0
        for one in ids:
            out.append(flat[start:start + len(one)])
            start += len(one)
        return out

    @contextmanager
    def bound(self, member: int, stage: int, weights: Sequence[torch.Tensor] | None = None):
        """Generated weights attached to a stage's shared layers for the duration of the block."""
        layers = self._layers[member][stage]
        if weights is None:
            weights = self.stage_weights(member, stage)
        # straight into the instance dict: `weight` is a plain attribute of a shared layer, never a
        # parameter or buffer, so nn.Module.__setattr__'s checks are pure per-stage overhead here
        for layer, w in zip(layers, weights):
            layer.__dict__["weight"] = w
        try:
            yield
        finally:
            for layer in layers:
                layer.__dict__["weight"] = None

    def run_stage(self, member: int, stage: int, x: torch.Tensor,
                  weights: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """One stage of one member with its weights bound (generated now unless given): the one
        place a member runs with generated weights; exits, evaluation and the engine all call it."""
        with self.bound(member, stage, weights):
            return self.members[member].stages[stage](x)

    def iter_exits(self, x: torch.Tensor, member: int, upto: int | None = None) -> Iterator[torch.Tensor]:
        """Logits of each exit in turn; later exits reuse the earlier stages' activations."""
        mod = self.members[member]
        last = mod.num_exits - 1 if upto is None else upto
        for e in range(last + 1):
            x = self.run_stage(member, e, x)
            yield mod.heads[e](x)

    def forward(self, x: torch.Tensor, members: Sequence[int] | None = None) -> list[list[torch.Tensor]]:
        """Every exit's logits for every (chosen) member: [member][exit] -> (B, C)."""
        chosen = range(len(self.members)) if members is None else members
        return [list(self.iter_exits(x, m)) for m in chosen]

    @torch.no_grad()
    def freeze(self, member: int) -> Member:
        """A plain `Member` with the generated weights baked in: no generator needed to run it."""
        plain = copy.deepcopy(self.members[member])
        for e in range(plain.num_exits):
            weights = self.stage_weights(member, e)
            for slot_id, w in zip(self._slot_ids[member][e], weights):
                _replace(plain, self.slots[slot_id].name, to_plain(_get(plain, self.slots[slot_id].name), w))
        return plain


def resolve_budget(member_numel: Sequence[int], budget: float | None = None,
                   budget_params: int | None = None) -> int:
    """The bank's parameter count: `budget` as a fraction of the largest member's shared
    parameters, or `budget_params` as a count; exactly one of them."""
    if (budget is None) == (budget_params is None):
        raise UserError(f"give a budget as a fraction or as a parameter count, not "
                        f"{'both' if budget is not None else 'neither'} (got {budget} and {budget_params})")
    if budget_params is not None:
        if isinstance(budget_params, bool) or not isinstance(budget_params, int) or budget_params < 1:
            raise UserError(f"budget_params must be a whole number of parameters >= 1, got {budget_params}")
        return budget_params
    if not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise UserError(f"budget must be a finite fraction > 0 of the largest member's shared parameters, "
                        f"got {budget}")
    params = int(budget * max(member_numel))
    if params < 1:
        raise UserError(f"budget {budget} leaves no parameter to build a layer")
    return params


@dataclass(frozen=True)
class Conversion:
    """What `share` (or a user family's builder output) changed: the layers now drawing their
    weights from the bank, and the parameter-holding layers left private to their model.

    The converted layers' own weight values are dropped: the bank generates new ones, so a
    pretrained model's weights do not carry over (biases, norms and heads do).
    """

    converted: list[str]                 # "member.path: Type -> SharedType"
    left_alone: dict[str, list[str]]     # type name -> "member.path" of layers with parameters kept private
    weights_replaced: bool = True        # always: generated weights replace the converted layers' own

    def lines(self) -> list[str]:
        kept = ", ".join(f"{t} x{len(paths)}" for t, paths in sorted(self.left_alone.items())) or "none"
        return [f"{len(self.converted)} layers now draw generated weights (their own weights are replaced)",
                f"left private to their model: {kept}"]


def to_members(models: Sequence[nn.Module], names: Sequence[str]) -> tuple[list[Member], Conversion]:
    """Copies of `models` with every Conv1d/Conv2d/Linear (subclasses too) swapped, on its parent
    module, for its shared twin; a `Member` keeps its exits (its heads stay private), any other
    model becomes a one-exit member. The originals are not changed."""
    members, converted, left_alone = [], [], {}
    for model, member_name in zip(models, names):
        model = copy.deepcopy(model)
        for name, module in list(model.named_modules()):
            shared = None if isinstance(model, Member) and name.startswith("heads.") else to_shared(module)
            # exit heads stay private to their member, like norms
            if shared is None:
                if not isinstance(module, SharedLayer) and any(True for _ in module.parameters(recurse=False)):
                    left_alone.setdefault(type(module).__name__, []).append(f"{member_name}.{name}".rstrip("."))
                continue
            converted.append(f"{member_name}.{name}".rstrip(".") + f": {type(module).__name__} -> "
                             f"{type(shared).__name__}")
            if name:
                _replace(model, name, shared)
            else:   # the model is itself a single layer
                model = shared
        members.append(model if isinstance(model, Member) else Member([model], [nn.Identity()]))
    return members, Conversion(converted, left_alone)


def share(models: Sequence[nn.Module], budget: float | None = None, generator: str = "superweights",
          grouping: str = "shape", names: Sequence[str] | None = None, seed: int = 0,
          budget_params: int | None = None, example: torch.Tensor | None = None,
          **generator_kwargs: Any) -> Family:
    """Turn ordinary modules into one family drawing on one bank.

    The bank holds `budget` times the largest member's shared parameters (default 1.0),
    or `budget_params` parameters.

    Every Conv1d/Conv2d/Linear, or subclass of one, is replaced on its parent module by
    its shared twin, and **its own weight is replaced by generated ones**: the models'
    trained weight values are not used (biases, norms and other layers stay the model's
    own and private to it). `family.conversion` lists the converted layers and the
    parameter-holding layers left alone. A model that is already a `Member` keeps its
    exits; any other model becomes a one-exit member. With `example` (a batch), every
    member runs once on it, so a model the conversion broke fails here, by name.

    Example:
        >>> family = share([small_cnn(), big_cnn()], budget=0.5)
        >>> logits = family(x)[1][-1]    # member 1, last exit
        >>> print("\n".join(family.conversion.lines()))
        >>> family = share([small_cnn(), big_cnn()], budget_params=200_000)
    """
    names = list(names) if names is not None else [f"m{i}" for i in range(len(models))]
    members, conversion = to_members(models, names)
    if budget is None and budget_params is None:
        budget = 1.0
    family = Family(members, names, generator=generator, budget=budget, budget_params=budget_params,
                    grouping=grouping, seed=seed, generator_kwargs=generator_kwargs)
    family.conversion = conversion
    family.spec = FamilySpec(family=SHARED, generator=generator, generator_kwargs=dict(generator_kwargs),
                             budget_params=family.budget_params, grouping=grouping,
                             groups=list(family.generator.groups), seed=seed)
    if example is not None:
        family.check_runs(example)
    return family


def build_family(spec: FamilySpec) -> Family:
    """The family a spec describes; `family.spec` is the spec with its budget and groups resolved."""
    budget = spec.budget
    if budget is None and spec.budget_params is None:
        budget = registry.meta("family", spec.family).get("budget", 1.0)
    torch.manual_seed(spec.seed)
    built = registry.create("family", spec.family, **spec.family_kwargs)
    family = Family(built.members, built.names, generator=spec.generator, budget=budget,
                    budget_params=spec.budget_params, grouping=spec.grouping, groups=spec.groups,
                    seed=spec.seed, generator_kwargs=spec.generator_kwargs)
    family.spec = replace(spec, budget=budget, groups=list(family.generator.groups))
    return family


@dataclass
class BuiltMembers:
    """What a family entrypoint returns: named members, largest first."""

    names: list[str]
    members: list[Member]


def _family_checks(members: Sequence[Member], names: Sequence[str]) -> None:
    if not members:
        raise UserError("a family needs at least one member")
    if len(names) != len(members) or len(set(names)) != len(names):
        raise UserError(f"need {len(members)} distinct member names, got {list(names)}")
    if len({m.num_exits for m in members}) != 1:
        raise UserError("every member must have the same number of exits "
                        f"(got {[m.num_exits for m in members]})")


def _get(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted) if dotted else root


def _replace(root: nn.Module, dotted: str, new: nn.Module) -> None:
    """Replace on the parent module, so nested layers are swapped rather than shadowed."""
    parent, _, child = dotted.rpartition(".")
    setattr(_get(root, parent), child, new)
