"""Building an answer from the voters a request has so far: the one place responses are made.

Ensemble: the mean of the members' probabilities. Anytime: the latest exit's, with
the exits run so far as the voters of its disagreement. Either is calibrated at its
temperature (per ensemble size, or per member's exit), fitted on validation by `eval`.
"""
from __future__ import annotations

import uuid
from typing import Sequence

import torch

from npas_serve.engine.run import RequestRun
from npas_serve.ensemble import Temperatures, combine
from npas_serve.protocol.response import InferenceResponse


class Answers:
    def __init__(self, names: Sequence[str], temperatures: Temperatures, model_name: str, model_version: str):
        self.names = list(names)
        self.temperatures = temperatures
        self.model_name, self.model_version = model_name, model_version

    def respond(self, run: RequestRun, voters: Sequence[torch.Tensor], exit_reached: int | None,
                final: bool) -> InferenceResponse:
        request, plan = run.request, run.plan
        temperature = (self.temperatures.for_ensemble(len(voters)) if exit_reached is None
                       else self.temperatures.for_exit(self.names[plan.members[0]], exit_reached))
        c = combine(voters, None if exit_reached is None else voters[-1], temperature)
        latency = run.elapsed_ms()
        if exit_reached is None:
            plan_names = [self.names[m] for m in plan.members]
        else:
            plan_names = [f"{self.names[s.member]}:e{s.stage}" for s in plan.steps]
        return InferenceResponse(
            request_id=request.request_id or uuid.uuid4().hex, model_name=self.model_name,
            model_version=self.model_version, mode=request.mode,
            predictions=c.predictions.cpu().tolist(), probabilities=c.probabilities.float().cpu().numpy(),
            entropy=c.entropy.cpu().tolist(), disagreement=c.disagreement.cpu().tolist(),
            members_used=list(run.members_run), exit_reached=exit_reached, plan=plan_names, latency_ms=latency,
            budget_ms=request.budget_ms,
            budget_met=None if run.budget_ms is None else latency <= run.budget_ms, final=final)
