"""The latency planner: a per-stage cost model and the choice of work under a budget.

The unit of work is a (member, stage) step: generate the stage's weights, run
it, run its exit head. At load the engine times every step at a few batch
sizes and fits ``ms = a + b * batch`` per step; every executed step then
nudges a per-step correction factor (an exponential moving average of
observed / predicted), so the model follows the machine it runs on. A member
runs as one round of the batch, and a round costs more than its steps (taking
newcomers, building and handing over answers): that overhead is measured on
every round, averaged the same way, and counted once per member.

Choices under a budget, "most accuracy per millisecond first":
- ensemble: members ranked by final-exit accuracy per predicted ms, added
  while the predicted total fits;
- anytime: the (member, exit) with the best accuracy among those predicted to
  fit; its exits then run in order, each refining the answer.
Accuracies come from the evaluation report in the manifest (`Planner.from_manifest`).
"""
from __future__ import annotations

import itertools
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from npas_serve.checkpoint import Manifest
from npas_serve.evaluate import Report

SAFETY = 0.8          # plan to use at most this share of the remaining budget
EMA = 0.1             # weight of a new observation in the correction factor


@dataclass(frozen=True)
class Step:
    member: int
    stage: int


@dataclass
class Plan:
    mode: str
    steps: list[Step]
    members: list[int]            # members whose answers are combined (ensemble) or the anytime member
    last_exit: int | None         # anytime: deepest exit to run
    predicted_ms: float


class _Table:
    """One (members, stages) array of the cost model. Callers read it (a read-only view) or set it
    whole; either way the model's per-step figures stay in step with it (`CostModel._refresh`)."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = "_" + name

    def __get__(self, model: "CostModel | None", owner=None):
        if model is None:
            return self
        view = getattr(model, self.name).view()
        view.flags.writeable = False
        return view

    def __set__(self, model: "CostModel", value) -> None:
        setattr(model, self.name, np.array(value, dtype=float).reshape(model.shape))
        model._refresh(range(model.shape[0]))


class CostModel:
    """Predicted milliseconds of each (member, stage) step, as a function of the batch size.

    Every request is planned with a few dozen predictions, on the event loop that also runs gRPC,
    so a prediction is two list lookups: each step's `intercept x correction` and `slope x correction`,
    and their running sums over a member's stages, kept as Python floats and refreshed when the
    model changes (a new fit, an observation), not recomputed from the arrays on every call.
    """

    intercept = _Table()
    slope = _Table()
    correction = _Table()

    def __init__(self, num_members: int, num_stages: int):
        self.shape = (num_members, num_stages)
        self._intercept = np.zeros(self.shape)
        self._slope = np.zeros(self.shape)
        self._correction = np.ones(self.shape)
        self.round_ms = 0.0            # a round's cost beyond its steps, learnt while serving
        self._lock = threading.Lock()
        self._a: list[list[float]] = [[] for _ in range(num_members)]    # ms at batch 0, per step
        self._b: list[list[float]] = [[] for _ in range(num_members)]    # ms per example, per step
        self._sum_a: list[list[float]] = [[] for _ in range(num_members)]    # running sums over stages
        self._sum_b: list[list[float]] = [[] for _ in range(num_members)]
        self._refresh(range(num_members))

    def _refresh(self, members) -> None:
        """Each member's row is replaced whole, so a reader on another thread sees the old or the new."""
        for m in members:
            a = (self._intercept[m] * self._correction[m]).tolist()
            b = (self._slope[m] * self._correction[m]).tolist()
            self._a[m], self._b[m] = a, b
            self._sum_a[m], self._sum_b[m] = list(itertools.accumulate(a)), list(itertools.accumulate(b))

    def fit(self, measure: Callable[[int, int], list[float]], batch_sizes: Sequence[int] = (1, 8, 32),
            repeats: int = 5) -> None:
        """Least squares over batch sizes of each stage's median time.

        `measure(member, batch)` returns the milliseconds of every stage of one
        pass; the first pass per member is discarded (allocator warm-up).
        """
        sizes = np.array(batch_sizes, dtype=float)
        for m in range(self.shape[0]):
            measure(m, int(batch_sizes[0]))
            medians = np.array([[statistics.median(t) for t in zip(*(measure(m, int(b)) for _ in range(repeats)))]
                                for b in batch_sizes])            # (batch sizes, stages)
            for s in range(self.shape[1]):
                slope, intercept = (np.polyfit(sizes, medians[:, s], 1) if len(sizes) > 1
                                    else (0.0, medians[0, s]))
                self._intercept[m, s] = max(intercept, 0.0)
                self._slope[m, s] = max(slope, 0.0)
            self._refresh([m])

    def predict(self, step: Step, batch: int) -> float:
        return self._a[step.member][step.stage] + self._b[step.member][step.stage] * batch

    def observe(self, step: Step, batch: int, ms: float) -> None:
        m, s = step.member, step.stage
        raw = self._intercept[m, s] + self._slope[m, s] * batch
        if raw <= 0:
            return
        with self._lock:
            self._correction[m, s] = (1 - EMA) * self._correction[m, s] + EMA * (ms / raw)
            self._refresh([m])

    def observe_round(self, ms: float) -> None:
        """A round's wall time beyond the steps it ran."""
        with self._lock:
            self.round_ms = (1 - EMA) * self.round_ms + EMA * max(ms, 0.0)

    def member_ms(self, member: int, batch: int, upto: int | None = None) -> float:
        """One member's round: its steps up to `upto` (default: all), and the round's overhead."""
        last = -1 if upto is None else upto
        return self._sum_a[member][last] + self._sum_b[member][last] * batch + self.round_ms


class Planner:
    def __init__(self, cost: CostModel, final_accuracy: Sequence[float], exit_accuracy: np.ndarray,
                 member_order: Sequence[int]):
        self.cost = cost
        self.final_accuracy = list(final_accuracy)      # per member, last exit
        self.exit_accuracy = exit_accuracy              # (members, exits)
        self.member_order = list(member_order)          # best first: what ensemble_size=k takes

    @classmethod
    def from_report(cls, cost: CostModel, names: Sequence[str], report: Report | None) -> "Planner":
        """Per (member, exit) accuracy and the member order from an evaluation report.

        Without a report (not evaluated yet) members count alike and deeper exits as better.
        """
        m, e = cost.shape
        if report is None:
            acc = np.tile(np.arange(1, e + 1) / e, (m, 1))
            order = list(range(m))
        else:
            acc = np.array([[report.planning_accuracy(n, x) for x in range(e)] for n in names])
            order = [list(names).index(n) for n in report.member_order]
        return cls(cost, acc[:, -1], acc, order)

    @classmethod
    def from_manifest(cls, cost: CostModel, names: Sequence[str], manifest: Manifest) -> "Planner":
        return cls.from_report(cost, names, None if manifest.report is None else Report.from_dict(manifest.report))

    def ensemble(self, batch: int, size: int | None, members: Sequence[int] | None,
                 budget_ms: float | None) -> Plan:
        if members is not None:
            chosen = list(members)
        elif budget_ms is None:
            chosen = self.member_order[: size or len(self.member_order)]
        else:
            ranked = sorted(self.member_order, key=lambda m: -self.final_accuracy[m]
                            / max(self.cost.member_ms(m, batch), 1e-6))
            chosen, spent, limit = [], 0.0, budget_ms * SAFETY
            for m in ranked:
                ms = self.cost.member_ms(m, batch)
                if len(chosen) < (size or len(ranked)) and (not chosen or spent + ms <= limit):
                    chosen.append(m)
                    spent += ms
            # the first member always runs: an answer late beats no answer; if it does not fit,
            # run the fastest one instead
            if self.cost.member_ms(chosen[0], batch) > limit and len(chosen) == 1:
                chosen = [min(ranked, key=lambda m: self.cost.member_ms(m, batch))]
        steps = [Step(m, s) for m in chosen for s in range(self.cost.shape[1])]
        return Plan("ensemble", steps, chosen, None, self._predict(steps, batch))

    def anytime(self, batch: int, member: int | None, exit: int | None, budget_ms: float | None) -> Plan:
        num_exits = self.cost.shape[1]
        candidates = [member] if member is not None else self.member_order
        if budget_ms is None:
            m = candidates[0]
            last = num_exits - 1 if exit is None else exit
        else:
            limit, best = budget_ms * SAFETY, None
            for m in candidates:
                top = num_exits - 1 if exit is None else exit
                for e in range(top + 1):
                    if self.cost.member_ms(m, batch, e) <= limit or e == 0:
                        key = (self.cost.member_ms(m, batch, e) <= limit, self.exit_accuracy[m, e],
                               -self.cost.member_ms(m, batch, e))
                        if best is None or key > best[0]:
                            best = (key, m, e)
            _, m, last = best
        steps = [Step(m, s) for s in range(last + 1)]
        return Plan("anytime", steps, [m], last, self._predict(steps, batch))

    def first_answer_ms(self, plan: Plan, batch: int) -> float:
        """Predicted ms until a plan's first answer: its first member whole (ensemble) or its first
        exit (anytime); what a deadline must leave room for to be worth queueing."""
        first = plan.steps[:1] if plan.mode == "anytime" else [s for s in plan.steps if s.member == plan.members[0]]
        return self._predict(first, batch)

    def _predict(self, steps: Sequence[Step], batch: int) -> float:
        """The steps, and a round's overhead per member they belong to."""
        rounds = len({s.member for s in steps})
        return sum(self.cost.predict(s, batch) for s in steps) + rounds * self.cost.round_ms


def fits_with_margin(predicted_ms: float, started: float, budget_ms: float | None) -> bool:
    """The planner's rule, between steps too: work predicted to take `predicted_ms` may use at most
    SAFETY of what is left of the budget (the rest absorbs prediction error)."""
    return finishes_within(predicted_ms / SAFETY, started, budget_ms)


def finishes_within(predicted_ms: float, started: float, budget_ms: float | None) -> bool:
    """Whether work predicted to take `predicted_ms` from now ends within the budget of a clock
    started at `started` (perf_counter seconds)."""
    if budget_ms is None:
        return True
    return (time.perf_counter() - started) * 1000 + predicted_ms <= budget_ms
