"""Evaluation: accuracy, NLL and calibration per member, per exit and per ensemble size.

The validation split recorded in the manifest (training examples held out) chooses
everything: the member order that `ensemble_size=k` takes, the accuracies the
planner reads, and a temperature per ensemble size and per exit that every answer
applies (`npas_serve.ensemble`). The test set only scores, after calibration, with
the uncalibrated NLL and ECE beside. The report also counts FLOPs (to reach each
exit) and parameters: the bank against what the members would need unshared.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from npas_serve.checkpoint import MANIFEST, Manifest, write_json
from npas_serve.data.base import Dataset
from npas_serve.ensemble import Temperatures, calibrate, combine, fit_temperature, nll
from npas_serve.family import Family
from npas_serve.layers import SharedLayer

REPORT = "report.json"


@dataclass
class Scores:
    accuracy: float
    nll: float
    ece: float


@dataclass
class ExitScore(Scores):
    member: str
    exit: int
    flops: int            # to reach this exit, stages 0..exit and this exit's head
    val_accuracy: float | None = None    # on the validation split: what the planner reads
    temperature: float = 1.0             # nll and ece are at it; the uncalibrated ones:
    nll_before: float | None = None
    ece_before: float | None = None

    @property
    def planning_accuracy(self) -> float:
        """What the planner and the member order weigh it by: on validation (test, for reports without one)."""
        return self.accuracy if self.val_accuracy is None else self.val_accuracy


@dataclass
class EnsembleScore(Scores):
    size: int
    members: list[str]
    flops: int
    val_accuracy: float | None = None
    temperature: float = 1.0
    nll_before: float | None = None
    ece_before: float | None = None


@dataclass
class ParamCount:
    bank: int                      # counted against the budget
    coefficients: int
    private: dict[str, int]        # per member: norms, heads, biases
    unshared: dict[str, int]       # per member: all its parameters, were nothing shared
    budget: int

    @property
    def unshared_total(self) -> int:
        return sum(self.unshared.values())

    @property
    def resident(self) -> int:
        """What serving keeps on the device: bank, coefficients, norms and heads."""
        return self.bank + self.coefficients + sum(self.private.values())


@dataclass
class Report:
    data: str
    num_test: int
    member_order: list[str]         # best validation final-exit accuracy first; ensemble size k uses the first k
    exits: list[ExitScore]
    ensembles: list[EnsembleScore]
    params: ParamCount
    diagnostics: dict[str, float] = field(default_factory=dict)   # the generator's own figures, if any
    num_validation: int = 0         # 0: the manifest records no validation split (test chose, as before)
    temperatures: dict[str, Any] = field(default_factory=dict)    # `ensemble.Temperatures`, for every answer

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["diagnostics"]:
            del d["diagnostics"]
        d["params"].update(unshared_total=self.params.unshared_total, resident=self.params.resident,
                           bank_over_unshared_per_member=self.params.bank / (self.params.unshared_total
                                                                             / len(self.params.unshared)))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        p = {k: v for k, v in d["params"].items() if k in ParamCount.__dataclass_fields__}
        return cls(d["data"], d["num_test"], d["member_order"], [ExitScore(**e) for e in d["exits"]],
                   [EnsembleScore(**e) for e in d["ensembles"]], ParamCount(**p), d.get("diagnostics", {}),
                   d.get("num_validation", 0), d.get("temperatures", {}))

    def exit_score(self, member: str, exit: int) -> ExitScore:
        return next(e for e in self.exits if e.member == member and e.exit == exit)

    def planning_accuracy(self, member: str, exit: int) -> float:
        """The accuracy the planner weighs an exit by (`ExitScore.planning_accuracy`)."""
        return self.exit_score(member, exit).planning_accuracy


def scores(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> Scores:
    """Accuracy, mean NLL and expected calibration error (equal-width confidence bins)."""
    conf, pred = probs.max(dim=1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean() * (conf[inside].mean() - correct[inside].mean()).abs()
    return Scores(correct.mean().item(), nll(probs, y), ece.item())


@torch.no_grad()
def exit_probs(family: Family, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Softmax of every exit of every member: (members, exits, N, classes)."""
    family.eval()
    chunks = [torch.stack([torch.stack([o.softmax(-1) for o in exits]) for exits in family(x[i:i + batch])])
              for i in range(0, len(x), batch)]
    return torch.cat(chunks, dim=2)


@torch.no_grad()
def count_flops(family: Family, input_shape: tuple[int, ...]) -> list[list[int]]:
    """FLOPs (2 x multiply-adds of convolutions and linear layers) to reach each exit, per example.

    A later exit pays for every earlier stage but not for the earlier exits' heads.
    """
    head_modules = {id(mod) for member in family.members for head in member.heads for mod in head.modules()}
    macs = {"stages": 0, "head": 0}

    def hook(module: nn.Module, inputs, output) -> None:
        macs["head" if id(module) in head_modules else "stages"] += output.numel() * module.weight[0].numel()

    kinds = (nn.Conv1d, nn.Conv2d, nn.Linear, SharedLayer)
    handles = [m.register_forward_hook(hook) for m in family.modules() if isinstance(m, kinds)]
    try:
        family.eval()
        x = torch.zeros(1, *input_shape)
        result = []
        for m in range(len(family.members)):
            macs["stages"], per_exit = 0, []
            for _ in family.iter_exits(x, m):
                per_exit.append(2 * (macs["stages"] + macs["head"]))
                macs["head"] = 0
            result.append(per_exit)
        return result
    finally:
        for handle in handles:
            handle.remove()


def param_count(family: Family) -> ParamCount:
    gen = family.generator
    bank = gen.bank_numel()
    private = dict(zip(family.names, family.member_private_numel()))
    shared = family.member_shared_numel()
    unshared = {n: shared[i] + private[n] for i, n in enumerate(family.names)}
    coefficients = sum(p.numel() for p in gen.parameters()) - bank
    return ParamCount(bank, coefficients, private, unshared, family.budget_params)


def evaluate(family: Family, manifest: Manifest, dataset: Dataset) -> Report:
    """Order, planner accuracies and temperatures from the manifest's validation split; scores on test.

    A manifest without a split (trained before splits existed) is ordered by test accuracy, uncalibrated.
    """
    x = torch.from_numpy(manifest.normalisation.apply(dataset.x_test))
    y = torch.from_numpy(dataset.y_test)
    probs = exit_probs(family, x)
    val = None
    if manifest.validation is not None:
        _, xv, yv = manifest.validation.apply(dataset)
        val = (exit_probs(family, torch.from_numpy(manifest.normalisation.apply(xv))), torch.from_numpy(yv))
    flops = count_flops(family, tuple(manifest.input_shape))
    names = family.names
    num_exits, last = probs.shape[1], probs.shape[1] - 1

    def scored(test: torch.Tensor, held: torch.Tensor | None) -> dict[str, Any]:
        """Test scores at the temperature fitted on the validation probabilities `held`."""
        if held is None:
            return asdict(scores(test, y))
        t = fit_temperature(held, val[1])
        before, after = scores(test, y), scores(calibrate(test, t), y)
        return {**asdict(after), "val_accuracy": scores(held, val[1]).accuracy, "temperature": t,
                "nll_before": before.nll, "ece_before": before.ece}

    exits = [ExitScore(**scored(probs[m, e], None if val is None else val[0][m, e]), member=names[m], exit=e,
                       flops=flops[m][e]) for m in range(len(names)) for e in range(num_exits)]

    # best final exit first; ties go to the cheaper member
    order = sorted(range(len(names)), key=lambda m: (-exits[m * num_exits + last].planning_accuracy, flops[m][last]))
    ensembles = []
    for k in range(1, len(names) + 1):
        chosen = order[:k]
        mean = combine(list(probs[chosen, last])).probabilities
        held = None if val is None else combine(list(val[0][chosen, last])).probabilities
        ensembles.append(EnsembleScore(**scored(mean, held), size=k, members=[names[m] for m in chosen],
                                       flops=sum(flops[m][last] for m in chosen)))
    temperatures = Temperatures([e.temperature for e in ensembles],
                                {n: [e.temperature for e in exits if e.member == n] for n in names})
    return Report(manifest.data, len(y), [names[m] for m in order], exits, ensembles, param_count(family),
                  family.generator.diagnostics(), 0 if val is None else len(val[1]), temperatures.to_dict())


def write_report(report: Report, manifest: Manifest, directory: Path) -> None:
    """report.json, two plots, and the report inside the manifest (where the planner reads it)."""
    directory = Path(directory)
    write_json(directory / REPORT, report.to_dict())
    manifest.report = report.to_dict()
    write_json(directory / MANIFEST, manifest.to_dict())
    plot(report, directory)


def plot(report: Report, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [e.size for e in report.ensembles]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sizes, [100 * e.accuracy for e in report.ensembles], "o-", label="ensemble (mean softmax)")
    best = max(e.accuracy for e in report.exits)
    ax.axhline(100 * best, color="gray", ls="--", label="best single member")
    ax.set(xlabel="ensemble size", ylabel="test accuracy (%)", xticks=sizes,
           title=f"Ensembles from one bank ({report.data})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "ensemble.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in report.member_order:
        pts = [e for e in report.exits if e.member == name]
        ax.plot([p.flops / 1e6 for p in pts], [100 * p.accuracy for p in pts], "o-", label=name)
    ax.plot([e.flops / 1e6 for e in report.ensembles], [100 * e.accuracy for e in report.ensembles],
            "k^--", label="ensembles")
    ax.set(xlabel="MFLOPs per example", ylabel="test accuracy (%)", xscale="log",
           title="Anytime: accuracy against cost")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(directory / "anytime.png", dpi=120)
    plt.close(fig)


def summary_lines(report: Report) -> list[str]:
    """A short human summary for the terminal."""
    p = report.params
    lines = [f"{'member':<16}" + "".join(f"  exit{e} acc" for e in range(max(x.exit for x in report.exits) + 1))]
    for name in report.member_order:
        row = [x for x in report.exits if x.member == name]
        lines.append(f"{name:<16}" + "".join(f"  {100 * x.accuracy:8.2f}%" for x in row))
    for e in report.ensembles:
        calibrated = "" if e.ece_before is None else f" (T {e.temperature:.2f}; before: nll {e.nll_before:.4f}  " \
                                                     f"ece {e.ece_before:.4f})"
        lines.append(f"ensemble of {e.size}: acc {100 * e.accuracy:.2f}%  nll {e.nll:.4f}  ece {e.ece:.4f}"
                     + calibrated)
    lines.append(f"order and temperatures from {report.num_validation} validation examples" if report.num_validation
                 else "no validation split in the manifest: order from test accuracy, uncalibrated")
    lines.append(f"bank {p.bank:,} params (+{p.coefficients:,} coefficients, {sum(p.private.values()):,} "
                 f"norms/heads); members unshared {p.unshared_total:,} "
                 f"(÷{len(p.unshared)} = {p.unshared_total // len(p.unshared):,})")
    if report.diagnostics:
        lines.append("generator: " + ", ".join(f"{k} {v:.4g}" for k, v in report.diagnostics.items()))
    return lines

