"""Building answers from the voters requests have so far: the one place responses are made.

Ensemble: the mean of the members' probabilities. Anytime: the latest exit's, with
the exits run so far as the voters of its disagreement. Either is calibrated at its
temperature (per ensemble size, or per member's exit), fitted on validation by `eval`.

A batch answers many requests at the same step, so answers are built together
(`respond_many`): one `combine` per group of requests with the same number of voters,
mode and temperature, on their concatenated rows. A batch of 64 single-example
requests then pays the maths and the copies to the host once, not 64 times.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Sequence

import torch

from npas_serve.engine.run import RequestRun
from npas_serve.ensemble import Temperatures, combine
from npas_serve.protocol.response import InferenceResponse


@dataclass(frozen=True)
class Due:
    """An answer to build: the request, its voters so far ((B, C) each), the exit it reached
    (anytime; None for an ensemble), whether it is the request's last, and the members it names
    (taken when it became due: a later member of the same step must not appear in it)."""

    run: RequestRun
    voters: Sequence[torch.Tensor]
    exit_reached: int | None
    final: bool
    members_used: tuple[str, ...]

    @classmethod
    def of(cls, run: RequestRun, voters: Sequence[torch.Tensor], exit_reached: int | None, final: bool) -> "Due":
        return cls(run, voters, exit_reached, final, tuple(run.members_run))


class Answers:
    def __init__(self, names: Sequence[str], temperatures: Temperatures, model_name: str, model_version: str):
        self.names = list(names)
        self.temperatures = temperatures
        self.model_name, self.model_version = model_name, model_version

    def respond(self, run: RequestRun, voters: Sequence[torch.Tensor], exit_reached: int | None,
                final: bool) -> InferenceResponse:
        return self.respond_many([Due.of(run, voters, exit_reached, final)])[0]

    def respond_many(self, due: Sequence[Due]) -> list[InferenceResponse]:
        """The answers of `due`, in its order."""
        groups: dict[tuple[int, bool, float], list[int]] = {}
        for i, d in enumerate(due):
            groups.setdefault((len(d.voters), d.exit_reached is None, self._temperature(d)), []).append(i)
        answers: list[InferenceResponse | None] = [None] * len(due)
        for (num_voters, ensemble, temperature), members in groups.items():
            voters = [torch.cat([due[i].voters[v] for i in members]) if len(members) > 1 else due[members[0]].voters[v]
                      for v in range(num_voters)]
            c = combine(voters, None if ensemble else voters[-1], temperature)
            predictions, entropy = c.predictions.cpu().tolist(), c.entropy.cpu().tolist()
            disagreement, probabilities = c.disagreement.cpu().tolist(), c.probabilities.float().cpu().numpy()
            start = 0
            for i in members:
                rows = slice(start, start + due[i].run.examples)
                start = rows.stop
                answers[i] = self._response(due[i], predictions[rows], probabilities[rows], entropy[rows],
                                            disagreement[rows])
        return answers

    def _temperature(self, d: Due) -> float:
        if d.exit_reached is None:
            return self.temperatures.for_ensemble(len(d.voters))
        return self.temperatures.for_exit(self.names[d.run.plan.members[0]], d.exit_reached)

    def _response(self, d: Due, predictions, probabilities, entropy, disagreement) -> InferenceResponse:
        run, request, plan = d.run, d.run.request, d.run.plan
        latency = run.elapsed_ms()
        if d.exit_reached is None:
            plan_names = [self.names[m] for m in plan.members]
        else:
            plan_names = [f"{self.names[s.member]}:e{s.stage}" for s in plan.steps]
        return InferenceResponse(
            request_id=request.request_id or uuid.uuid4().hex, model_name=self.model_name,
            model_version=self.model_version, mode=request.mode, predictions=predictions,
            probabilities=probabilities, entropy=entropy, disagreement=disagreement,
            members_used=list(d.members_used), exit_reached=d.exit_reached, plan=plan_names, latency_ms=latency,
            budget_ms=request.budget_ms,
            budget_met=None if run.budget_ms is None else latency <= run.budget_ms, final=d.final)
