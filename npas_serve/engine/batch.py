"""One batch on the device: each needed member once, on the examples of every request that needs it.

The scheduler hands over the requests it took from the queue (deadline order). Members
run in the order they first appear in those requests' plans; each (member, stage) step
runs once on the concatenated examples of the requests whose plan includes it, so its
weights are generated once for the whole batch. Between steps a request can leave:

- anytime: at its planned exit, at `min_confidence`, or when its next exit no longer fits;
- ensemble: when the members of its plan are done, or its next member no longer fits;
- any: cancelled (dropped), or past its deadline (its best answer so far, or DeadlineExceeded).

Answers leave as soon as they exist: an ensemble's answer after the members of its plan
order that are done (a member done out of its order waits for the ones before it), an
anytime answer after each exit. Every request has ended when `run` returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from npas_serve.engine.answer import Answers
from npas_serve.engine.planner import SAFETY, CostModel, Step, finishes_within
from npas_serve.engine.run import Cancelled, DeadlineExceeded, RequestRun
from npas_serve.engine.stages import StageRunner


@dataclass(eq=False)
class _Progress:
    """What one request has in this batch: per member probabilities (ensemble) or per exit (anytime)."""

    run: RequestRun
    by_member: dict[int, torch.Tensor] = field(default_factory=dict)
    exits: list[torch.Tensor] = field(default_factory=list)
    given: int = 0                        # ensemble: members of its plan order answered so far

    @property
    def anytime(self) -> bool:
        return self.run.request.mode == "anytime"

    def needs(self, member: int) -> bool:
        return not self.run.done and member in self.run.plan.members and member not in self.by_member

    def depth(self, num_exits: int) -> int:
        return self.run.plan.last_exit if self.anytime else num_exits - 1

    def voters(self) -> list[torch.Tensor]:
        if self.anytime:
            return list(self.exits)
        return [self.by_member[m] for m in self.run.plan.members[: self.given]]


class BatchRunner:
    def __init__(self, stages: StageRunner, cost: CostModel, answers: Answers, num_exits: int,
                 between_steps: Callable[[], None] = lambda: None):
        self.stages = stages
        self.cost = cost
        self.answers = answers
        self.num_exits = num_exits
        self.between_steps = between_steps      # the scheduler's expire: the queue is not left waiting

    # --- prediction -------------------------------------------------------------------------
    @staticmethod
    def member_order(runs: Sequence[RequestRun]) -> list[int]:
        order: list[int] = []
        for run in runs:
            order += [m for m in run.plan.members if m not in order]
        return order

    def predict_ms(self, runs: Sequence[RequestRun]) -> float:
        """The whole batch: each member once, at the examples of the requests needing it."""
        total = 0.0
        for m in self.member_order(runs):
            group = [r for r in runs if m in r.plan.members]
            depth = max(r.plan.last_exit if r.request.mode == "anytime" else self.num_exits - 1 for r in group)
            total += self.cost.member_ms(m, sum(r.examples for r in group), depth)
        return total

    # --- running ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, runs: Sequence[RequestRun]) -> None:
        progress = [_Progress(r) for r in runs]
        order = [(m, sum(r.examples for r in runs if m in r.plan.members)) for m in self.member_order(runs)]
        # every planned step's weights in one generator call: each bank is read once for the batch
        self.stages.prepare([Step(m, s) for m, _ in order
                             for s in range(max((p.depth(self.num_exits) for p in progress if p.needs(m)), default=-1) + 1)])
        try:
            for position, (member, _) in enumerate(order):
                group = [p for p in progress if p.needs(member)]
                if group:
                    self._member(member, group, order[position + 1:])
        finally:
            self.stages.release()
        for p in progress:          # nothing may be left waiting: a plan the batch could not finish is a bug
            if not p.run.done:
                p.run.fail(RuntimeError("the batch ended before this request's plan did"), "error")

    def _member(self, member: int, group: list[_Progress], later: list[tuple[int, int]]) -> None:
        """All stages of one member, each once on the rows of the requests still needing it;
        `later`: the (member, examples) this batch runs after it, for the budget checks."""
        depth = max(p.depth(self.num_exits) for p in group)
        h = torch.cat([p.run.inputs for p in group]) if len(group) > 1 else group[0].run.inputs
        for stage in range(depth + 1):
            self.between_steps()
            group, h = self._keep(group, h, [p for p in group if self._still_wanted(p)])
            if not group:
                return
            step = Step(member, stage)
            result = self.stages.run(step, h)
            self.cost.observe(step, h.shape[0], result.ms)
            start = 0
            for p in group:
                rows = slice(start, start + p.run.examples)
                start = rows.stop
                p.run.count(result)
                if p.anytime:
                    self._exit(p, stage, result.probs[rows], len(h))
                elif stage == self.num_exits - 1:
                    p.by_member[member] = result.probs[rows]
                    self._members_done(p, later)
            if stage < depth:
                group, h = self._keep(group, result.hidden,
                                      [p for p in group if not p.run.done and p.depth(self.num_exits) > stage])

    def _keep(self, group: list[_Progress], h: torch.Tensor, kept: list[_Progress]) -> tuple[list[_Progress], torch.Tensor]:
        """The rows of `h` that belong to the requests still in the batch."""
        if len(kept) == len(group):
            return group, h
        spans, start = {}, 0
        for p in group:
            spans[id(p)] = (start, start + p.run.examples)
            start += p.run.examples
        if not kept:
            return kept, h[:0]
        return kept, torch.cat([h[slice(*spans[id(p)])] for p in kept])

    def _still_wanted(self, p: _Progress) -> bool:
        """False when it leaves before the next step: cancelled, or its deadline passed."""
        run = p.run
        if run.done:
            return False
        if run.cancelled:
            run.fail(Cancelled("the call was cancelled"), "cancelled")
            return False
        if run.deadline_passed():
            voters = p.voters()
            if voters:       # the best answer it already has, now final
                exit_reached = len(voters) - 1 if p.anytime else None
                run.give(self.answers.respond(run, voters, exit_reached, final=True))
            else:
                run.fail(DeadlineExceeded("deadline_unix_ms: the deadline passed before any answer was ready"),
                         "deadline")
            return False
        return True

    def _exit(self, p: _Progress, stage: int, probs: torch.Tensor, batch: int) -> None:
        run, request = p.run, p.run.request
        p.exits.append(probs)
        confident = (request.min_confidence is not None
                     and bool((probs.max(dim=-1).values >= request.min_confidence).all()))
        last = (confident or stage == run.plan.last_exit
                or not self._fits(run, self.cost.predict(Step(run.plan.members[0], stage + 1), batch)))
        if last or run.intermediate:
            run.give(self.answers.respond(run, p.voters(), stage, final=last))

    def _members_done(self, p: _Progress, later: list[tuple[int, int]]) -> None:
        """Answer every member of its plan order now available; the last one it gets is final."""
        run, plan = p.run, p.run.plan
        while p.given < len(plan.members) and plan.members[p.given] in p.by_member:
            p.given += 1
            run.members_run.append(self.answers.names[plan.members[p.given - 1]])
            last = p.given == len(plan.members) or not self._fits(run, self._ms_until(plan.members[p.given], later))
            if last or run.intermediate:
                run.give(self.answers.respond(run, p.voters(), None, final=last))
            if last:
                return

    def _ms_until(self, member: int, later: list[tuple[int, int]]) -> float:
        """Predicted time until `member` finishes in this batch: the members ordered before it run first."""
        total = 0.0
        for m, examples in later:
            total += self.cost.member_ms(m, examples)
            if m == member:
                break
        return total

    @staticmethod
    def _fits(run: RequestRun, predicted_ms: float) -> bool:
        """Like the initial plan, it keeps 1 - SAFETY of the budget for prediction error."""
        return finishes_within(predicted_ms, run.started, None if run.budget_ms is None else run.budget_ms * SAFETY)

