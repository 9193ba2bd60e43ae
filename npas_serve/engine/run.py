"""One request in flight: its clock, its budget, its plan, and what it has done so far.

The engine carries one `RequestRun` through a request's execution instead of
passing the clock, budget and tallies around; when the request ends it becomes
the `Observation` that adapters turn into metrics.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from npas_serve.engine.planner import Plan
from npas_serve.engine.stages import StageResult
from npas_serve.protocol.request import InferenceRequest
from npas_serve.protocol.response import InferenceResponse


@dataclass
class Observation:
    """What one request did; adapters turn it into their metrics."""

    mode: str
    status: str                 # ok | invalid | error
    latency_s: float
    members_run: list[str]
    exit_depth: int | None
    budget_missed: bool
    generation_s: float
    cache_hits: int = 0         # stages this request took from the weight cache


def effective_budget_ms(budget_ms: float | None, deadline_unix_ms: float | None,
                        now_unix_ms: float) -> float | None:
    """The tighter of a latency budget and the time left until an absolute deadline (None: neither)."""
    if deadline_unix_ms is None:
        return budget_ms
    left = deadline_unix_ms - now_unix_ms
    return left if budget_ms is None else min(budget_ms, left)


@dataclass
class RequestRun:
    request: InferenceRequest
    started: float                                  # time.perf_counter() at arrival
    budget_ms: float | None                         # what is left of the budget at arrival
    plan: Plan | None = None
    members_run: list[str] = field(default_factory=list)
    last: InferenceResponse | None = None           # the latest answer given
    generation_s: float = 0.0
    cache_hits: int = 0

    @classmethod
    def start(cls, request: InferenceRequest) -> "RequestRun":
        return cls(request, time.perf_counter(),
                   effective_budget_ms(request.budget_ms, request.deadline_unix_ms, time.time() * 1000))

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def count(self, result: StageResult) -> None:
        self.generation_s += result.generation_s
        self.cache_hits += result.cache_hits

    def observation(self, status: str) -> Observation:
        missed = bool(self.last is not None and self.last.budget_met is False)
        return Observation(self.request.mode, status, self.elapsed_ms() / 1000, self.members_run,
                           self.last.exit_reached if self.last else None, missed, self.generation_s,
                           self.cache_hits)
