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
from dataclasses import asdict, dataclass, field
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


@dataclass
class FamilySpec:
    """Everything needed to rebuild a family; stored verbatim in the checkpoint manifest."""

    family: str = "mnist1d-resnet"
    family_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "superweights"
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    budget: float | None = None  # <= 10: fraction of the largest member's shared params; else a count.
                                 # None: the family's registered default
    grouping: str = "shape"
    groups: list[int] | None = None   # resolved grouping (filled in by build_family)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Family(nn.Module):
    def __init__(self, members: Sequence[Member], names: Sequence[str], method: str = "superweights",
                 budget: float = 1.0, grouping: str = "shape", groups: Sequence[int] | None = None,
                 seed: int = 0, method_kwargs: dict[str, Any] | None = None):
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
        self.budget_params = resolve_budget(budget, self.member_shared_numel())
        if groups is None:
            if registry.defaults("grouping", grouping).get("trains"):
                raise UserError(f"grouping {grouping!r} is searched by training: train with "
                                f"`npas-serve train --grouping {grouping}` (run_training), or pass its groups")
            groups = registry.create("grouping", grouping, self.slots, seed=seed)
        try:
            self.generator: WeightGenerator = registry.create(
                "generator", method, self.slots, list(groups), self.budget_params, **(method_kwargs or {}))
        except TypeError as err:    # an option the generator does not take (e.g. a mistyped --method-arg)
            raise UserError(f"method {method!r} cannot take options {sorted(method_kwargs or {})}: {err}") from None

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
    def stage_weights(self, member: int, stage: int) -> list[torch.Tensor]:
        return self.generator.generate(self._slot_ids[member][stage])

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

    def iter_exits(self, x: torch.Tensor, member: int, upto: int | None = None) -> Iterator[torch.Tensor]:
        """Logits of each exit in turn; later exits reuse the earlier stages' activations."""
        mod = self.members[member]
        last = mod.num_exits - 1 if upto is None else upto
        for e in range(last + 1):
            with self.bound(member, e):
                x = mod.stages[e](x)
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


def resolve_budget(budget: float, member_numel: Sequence[int]) -> int:
    """A budget <= 10 is a fraction of the largest member's shared parameters; above, a count."""
    if not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise UserError(f"budget must be a finite number > 0 (a fraction of the largest member, "
                        f"or a parameter count), got {budget}")
    params = int(budget * max(member_numel)) if budget <= 10 else int(budget)
    if params < 1:
        raise UserError(f"budget {budget} leaves no parameter to build a layer")
    return params


def share(models: Sequence[nn.Module], budget: float = 1.0, method: str = "superweights",
          grouping: str = "shape", names: Sequence[str] | None = None, seed: int = 0,
          **method_kwargs: Any) -> Family:
    """Turn ordinary modules into one family drawing on one bank under `budget`.

    Every Conv1d/Conv2d/Linear is replaced, on its parent module, by its shared
    twin; other layers stay private to their model. A model that is already a
    `Member` keeps its exits; any other model becomes a one-exit member.

    Example:
        >>> family = share([small_cnn(), big_cnn()], budget=0.5)
        >>> logits = family(x)[1][-1]    # member 1, last exit
    """
    members = []
    for model in models:
        model = copy.deepcopy(model)
        for name, module in list(model.named_modules()):
            shared = to_shared(module)
            if shared is None or isinstance(model, Member) and name.startswith("heads."):
                continue   # exit heads stay private to their member, like norms
            if name:
                _replace(model, name, shared)
            else:   # the model is itself a single layer
                model = shared
        members.append(model if isinstance(model, Member) else Member([model], [nn.Identity()]))
    names = list(names) if names is not None else [f"m{i}" for i in range(len(members))]
    return Family(members, names, method=method, budget=budget, grouping=grouping, seed=seed,
                  method_kwargs=method_kwargs)


def build_family(spec: FamilySpec) -> Family:
    """The family a spec describes; fills in `spec.groups` the first time."""
    if spec.budget is None:
        spec.budget = registry.defaults("family", spec.family).get("budget", 1.0)
    torch.manual_seed(spec.seed)
    built = registry.create("family", spec.family, **spec.family_kwargs)
    family = Family(built.members, built.names, method=spec.method, budget=spec.budget,
                    grouping=spec.grouping, groups=spec.groups, seed=spec.seed,
                    method_kwargs=spec.method_kwargs)
    spec.groups = list(family.generator.groups)
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
