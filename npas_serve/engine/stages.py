"""One step of work on the device: a (member, stage) with its weights, then its exit head.

The weights come from the generator (on the fly), from the optional cache, or
are already baked into a frozen member; the stage itself runs through the
family's `run_stage`, the one place that binds generated weights to layers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from npas_serve.engine.cache import WeightCache
from npas_serve.engine.planner import Step
from npas_serve.family import Family, Member


@dataclass(frozen=True)
class StageResult:
    hidden: torch.Tensor      # the stage's output, the next stage's input
    probs: torch.Tensor       # softmax of the stage's exit head, (B, C)
    ms: float                 # wall time of the whole step, generation included
    generation_s: float       # of which: getting the weights
    cache_hits: int           # 1 if the weights came from the cache


class StageRunner:
    def __init__(self, family: Family, device: torch.device, cache: WeightCache, frozen: list[Member] | None):
        self.family = family
        self.device = device
        self.cache = cache
        self.frozen = frozen      # plain members with their weights baked in at load, or None

    def run(self, step: Step, h: torch.Tensor) -> StageResult:
        """Callers hold the scheduler's turn, so the cache's hit count is this step's alone."""
        t0 = time.perf_counter()
        hits = 0
        if self.frozen is not None:          # weights baked in at load: nothing to generate
            member = self.frozen[step.member]
            t1 = t0
            h = member.stages[step.stage](h)
        else:
            member = self.family.members[step.member]
            if self.cache.max_bytes:
                before = self.cache.hits
                weights = self.cache.get((step.member, step.stage),
                                         lambda: self.family.stage_weights(step.member, step.stage))
                hits = self.cache.hits - before
            else:
                weights = self.family.stage_weights(step.member, step.stage)
            t1 = time.perf_counter()
            h = self.family.run_stage(step.member, step.stage, h, weights)
        probs = member.heads[step.stage](h).softmax(dim=-1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StageResult(h, probs, (time.perf_counter() - t0) * 1000, t1 - t0, hits)
