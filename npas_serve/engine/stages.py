"""One step of work on the device: a (member, stage) with its weights, then its exit head.

The weights come from the generator (on the fly), from the optional cache, or
are already baked into a frozen member; the stage itself runs through the
family's `run_stage`, the one place that binds generated weights to layers, as a
TorchScript trace of it when there is one (`traces`: the same operators without
Python between them). A member that a batch takes whole runs in one call (`run_member`,
its whole trace), its weights got step by step as for `run`.
The steps in flight can be generated together first (`prepare`: eagerly, one generator
call reads each bank once for every member needed; with traces, each step's own trace
runs in turn). Prepared weights serve every step that runs them until `release`, which
the batch calls when the device goes idle: under a steady load a member's weights are
generated once per busy period, not once per round.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from npas_serve.engine.cache import WeightCache
from npas_serve.engine.kernels import ConvKernels
from npas_serve.engine.planner import Step
from npas_serve.engine.traces import Traces, eager_stage
from npas_serve.family import Family, Member


@dataclass(frozen=True)
class StageResult:
    hidden: torch.Tensor      # the stage's output, the next stage's input
    probs: torch.Tensor       # softmax of the stage's exit head, (B, C)
    ms: float                 # wall time of the whole step, generation included
    generation_s: float       # of which: getting the weights
    cache_hits: int           # 1 if the weights came from the cache


class StageRunner:
    def __init__(self, family: Family, device: torch.device, cache: WeightCache, frozen: list[Member] | None,
                 traces: Traces | None = None):
        self.family = family
        self.device = device
        self.cache = cache
        self.frozen = frozen      # plain members with their weights baked in at load, or None
        self.traces = traces      # traced stages and generation, or None: everything eager
        self.kernels = ConvKernels()    # the convolution kernels by batch size (engine/kernels.py)
        self._eager = {Step(m, s): eager_stage(family, frozen, Step(m, s))
                       for m in range(len(family.names)) for s in range(family.num_exits)}
        self._prepared: dict[Step, tuple[list[torch.Tensor], float]] = {}   # step -> (weights, its generation s)

    def prepare(self, steps: Sequence[Step]) -> None:
        """Generate the weights of `steps` (those not prepared yet) in one call; each step's share of
        the time (by weights generated) is counted in its own `ms`, so the cost model still sees what
        a step costs."""
        steps = [s for s in steps if s not in self._prepared]
        if self.frozen is not None or self.cache.max_bytes or not steps:
            return
        t0 = time.perf_counter()
        weights = self._generate(steps)
        elapsed = time.perf_counter() - t0
        numel = [sum(w.numel() for w in ws) for ws in weights]
        total = sum(numel) or 1
        self._prepared.update({s: (ws, elapsed * n / total) for s, ws, n in zip(steps, weights, numel)})

    def prepared(self, step: Step) -> bool:
        return step in self._prepared

    def release(self) -> None:
        """Drop every prepared weight."""
        self._prepared = {}

    def run(self, step: Step, h: torch.Tensor) -> StageResult:
        """Callers hold the scheduler's turn, so the cache's hit count is this step's alone."""
        t0 = time.perf_counter()
        weights, generated_s, hits, before_s = self._weights(step)
        stage = (self.traces and self.traces.stage(step)) or self._eager[step]
        with self.kernels.used_for(h.shape[0]):
            h, probs = stage(h, *weights)
        return self._result(h, probs, t0, before_s, generated_s, hits)

    def run_member(self, member: int, h: torch.Tensor) -> StageResult | None:
        """Every stage of `member` in one call (`Traces.member`), or None where it has no whole trace:
        the last stage's `run`, as stage by stage, and its `ms` the whole member's."""
        whole = self.traces.member(member) if self.traces is not None else None
        if whole is None:
            return None
        t0 = time.perf_counter()
        weights, generated_s, hits, before_s = [], 0.0, 0, 0.0
        for stage in range(self.family.num_exits):
            w, g, c, b = self._weights(Step(member, stage))
            weights += w
            generated_s, hits, before_s = generated_s + g, hits + c, before_s + b
        with self.kernels.used_for(h.shape[0]):
            h, probs = whole(h, *weights)
        return self._result(h, probs, t0, before_s, generated_s, hits)

    def _weights(self, step: Step) -> tuple[list[torch.Tensor], float, int, float]:
        """A step's weights: (weights, seconds generating them, cache hits, of those seconds the ones
        spent before this call: prepared weights count in the first step that uses them)."""
        t0 = time.perf_counter()
        prepared = self._prepared.get(step)
        if self.frozen is not None:          # weights baked in at load: nothing to generate
            return [], 0.0, 0, 0.0
        if prepared is not None:
            weights, generated_s = prepared
            self._prepared[step] = (weights, 0.0)
            return weights, generated_s, 0, generated_s
        if self.cache.max_bytes:
            before = self.cache.hits
            weights = self.cache.get((step.member, step.stage), lambda: self._generate([step])[0])
            return weights, time.perf_counter() - t0, self.cache.hits - before, 0.0
        weights = self._generate([step])[0]
        return weights, time.perf_counter() - t0, 0, 0.0

    def _result(self, h: torch.Tensor, probs: torch.Tensor, t0: float, before_s: float, generated_s: float,
                hits: int) -> StageResult:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StageResult(h, probs, (time.perf_counter() - t0 + before_s) * 1000, generated_s, hits)

    def _generate(self, steps: Sequence[Step]) -> list[list[torch.Tensor]]:
        if self.traces is not None:
            return self.traces.weights(steps)
        return self.family.steps_weights([(s.member, s.stage) for s in steps])
