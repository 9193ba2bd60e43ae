"""The engine: holds the shared parameters on a device and answers requests.

It is the only place that decides anything about a request: what to run
(through the planner), in what order, when to stop, and what the answer says.
The TorchServe handler and the embedded gRPC server only translate to and
from it. Per request it runs decode -> plan -> run -> encode; each member's
stage weights are generated just before the stage and dropped after it,
unless the optional byte-bounded cache keeps them. Turns on the device come
from the scheduler, one member (or exit) at a time.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

from npas_serve.checkpoint import Manifest, load_checkpoint
from npas_serve.engine.cache import WeightCache
from npas_serve.engine.memory import ResidentBytes, resident_bytes
from npas_serve.engine.planner import SAFETY, CostModel, Planner, Step
from npas_serve.engine.run import Observation, RequestRun
from npas_serve.engine.scheduler import FifoScheduler
from npas_serve.engine.stages import StageResult, StageRunner
from npas_serve.ensemble import Temperatures, combine
from npas_serve.family import Family
from npas_serve.protocol.request import InferenceRequest, RequestError, RequestLimits, parse_request
from npas_serve.protocol.response import InferenceResponse


@dataclass
class EngineConfig:
    device: str = "cpu"
    cache_bytes: int = 0                 # LRU of generated weights; 0 keeps only the shared parameters
    max_batch: int = 256
    max_payload_bytes: int = 4 * 2**20
    warmup_batch_sizes: tuple[int, ...] = (1, 8, 32)
    model_name: str = "npas"
    model_version: str = "1"
    freeze: bool = False                 # generate every member once at load, then run plain modules
    trust_code: bool = False             # load a checkpoint carrying its family's code (runs that code)


class Engine:
    def __init__(self, family: Family, manifest: Manifest, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.device = torch.device(self.config.device)
        self.family = family.to(self.device).eval()
        self.manifest = manifest
        self.names = list(family.names)
        self.num_exits = family.num_exits
        self.limits = RequestLimits(tuple(manifest.input_shape), tuple(self.names), self.num_exits,
                                    self.config.max_batch, self.config.max_payload_bytes,
                                    example_shapes=tuple(manifest.request_shapes))
        self.cache = WeightCache(self.config.cache_bytes)
        # frozen: any generator's weights baked once into plain members (Family.freeze); no generation per request
        self._frozen = ([family.freeze(m).eval() for m in range(len(self.names))]
                        if self.config.freeze else None)
        self._stages = StageRunner(self.family, self.device, self.cache, self._frozen)
        self._resident = resident_bytes(self.family, self._frozen, 0)   # fixed at load, but for the cache
        self._scheduler = FifoScheduler()
        self._observers: list[Callable[[Observation], None]] = []
        self.cost = CostModel(len(self.names), self.num_exits)
        self.cost.fit(self._time_member, self.config.warmup_batch_sizes)
        self.planner = Planner.from_manifest(self.cost, self.names, manifest)
        self.temperatures = Temperatures.from_report(manifest.report)   # fitted on validation by `eval`

    @classmethod
    def load(cls, checkpoint: str | Path, config: EngineConfig | None = None) -> "Engine":
        config = config or EngineConfig()
        family, manifest = load_checkpoint(Path(checkpoint), config.device, trust_code=config.trust_code)
        return cls(family, manifest, config)

    # --- public surface ---------------------------------------------------------------------
    def add_observer(self, observer: Callable[[Observation], None]) -> None:
        self._observers.append(observer)

    def parse(self, fields: Mapping[str, bytes | str]) -> InferenceRequest:
        """Validate a request map; a bad one is counted (status "invalid") and raises RequestError."""
        try:
            return parse_request(fields, self.limits)
        except RequestError:
            self._notify(Observation("unknown", "invalid", 0.0, [], None, False, 0.0))
            raise

    def answer(self, request: InferenceRequest) -> InferenceResponse:
        """The final answer only."""
        last = None
        for last in self.answers(request, intermediate=False):
            pass
        return last

    def answers(self, request: InferenceRequest, intermediate: bool = True) -> Iterator[InferenceResponse]:
        """One refined answer per finished member (ensemble) or exit (anytime), the last one final.

        `intermediate=False` yields the final answer alone, without building the others
        (each costs a stack, entropy and votes: per-request overhead at batch 1).
        """
        run = RequestRun.start(request)
        status = "error"
        try:
            execute = self._anytime if request.mode == "anytime" else self._ensemble
            for run.last in execute(run, intermediate):
                yield run.last
            status = "ok"
        except RequestError:
            status = "invalid"
            raise
        finally:
            self._notify(run.observation(status))

    def resident_bytes(self) -> ResidentBytes:
        """What stays on the device: fixed at load, except the cache (read on every request)."""
        return ResidentBytes(self._resident.bank, self._resident.coefficients, self._resident.norms_heads,
                             self.cache.bytes, self._resident.frozen)

    # --- running ----------------------------------------------------------------------------
    def _inputs(self, request: InferenceRequest) -> torch.Tensor:
        return torch.from_numpy(self.manifest.normalisation.apply(request.inputs)).to(self.device)

    def _stage(self, step: Step, h: torch.Tensor) -> StageResult:
        """Run one step; its time corrects the cost model."""
        result = self._stages.run(step, h)
        self.cost.observe(step, h.shape[0], result.ms)
        return result

    def _ensemble(self, run: RequestRun, intermediate: bool) -> Iterator[InferenceResponse]:
        request = run.request
        x = self._inputs(request)
        members = None if request.members is None else [self.names.index(n) for n in request.members]
        plan = run.plan = self.planner.ensemble(len(x), request.ensemble_size, members, run.budget_ms)
        steps = {m: [s for s in plan.steps if s.member == m] for m in plan.members}
        done: list[torch.Tensor] = []
        for i, m in enumerate(plan.members):
            h = x
            with self._scheduler.turn(), torch.inference_mode():
                for step in steps[m]:
                    result = self._stage(step, h)
                    run.count(result)
                    h = result.hidden
            done.append(result.probs)
            run.members_run.append(self.names[m])
            # stop before a member that would break the budget; the answer so far is final
            last = i == len(plan.members) - 1 or not self._fits(run, steps[plan.members[i + 1]], len(x))
            if last or intermediate:
                yield self._respond(run, done, None, final=last)
            if last:
                return

    def _anytime(self, run: RequestRun, intermediate: bool) -> Iterator[InferenceResponse]:
        request = run.request
        x = self._inputs(request)
        member = None if request.members is None else self.names.index(request.members[0])
        plan = run.plan = self.planner.anytime(len(x), member, request.exit, run.budget_ms)
        run.members_run.append(self.names[plan.members[0]])
        h, seen = x, []
        for i, step in enumerate(plan.steps):
            with self._scheduler.turn(), torch.inference_mode():
                result = self._stage(step, h)
            run.count(result)
            h = result.hidden
            seen.append(result.probs)
            confident = (request.min_confidence is not None
                         and bool((result.probs.max(dim=-1).values >= request.min_confidence).all()))
            last = (confident or i == len(plan.steps) - 1
                    or not self._fits(run, [plan.steps[i + 1]], len(x)))
            if last or intermediate:
                yield self._respond(run, seen, step.stage, final=last)
            if last:
                return

    def _fits(self, run: RequestRun, steps: list[Step], batch: int) -> bool:
        """`Planner.fits`, with the expected wait for a turn counted as time already spent.

        Under concurrent load the next member or exit first waits for other requests'
        stages; a check that ignored the wait would start work that ends past the budget.
        Like the initial plan, it keeps 1 - SAFETY of the budget for prediction error.
        """
        return self.planner.fits(steps, batch, run.started - self._scheduler.expected_wait_ms / 1000,
                                 None if run.budget_ms is None else run.budget_ms * SAFETY)

    def _respond(self, run: RequestRun, voters: Sequence[torch.Tensor], exit_reached: int | None,
                 final: bool) -> InferenceResponse:
        """Ensemble: the mean of the members' probabilities. Anytime: the latest exit's,
        with the exits run so far as the voters of its disagreement. Either is calibrated at
        its temperature (per ensemble size, or per member's exit)."""
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
            request_id=request.request_id or uuid.uuid4().hex, model_name=self.config.model_name,
            model_version=self.config.model_version, mode=request.mode,
            predictions=c.predictions.cpu().tolist(), probabilities=c.probabilities.float().cpu().numpy(),
            entropy=c.entropy.cpu().tolist(), disagreement=c.disagreement.cpu().tolist(),
            members_used=list(run.members_run), exit_reached=exit_reached, plan=plan_names, latency_ms=latency,
            budget_ms=request.budget_ms,
            budget_met=None if run.budget_ms is None else latency <= run.budget_ms, final=final)

    def _notify(self, observation: Observation) -> None:
        for observer in self._observers:
            observer(observation)

    # --- warm-up ------------------------------------------------------------------------------
    @torch.inference_mode()
    def _time_member(self, member: int, batch: int) -> list[float]:
        """Milliseconds of each stage (generation + stage + head) of `member` at `batch`."""
        h = torch.randn(batch, *self.limits.input_shape, device=self.device)
        times = []
        for s in range(self.num_exits):
            result = self._stage(Step(member, s), h)
            h = result.hidden
            times.append(result.ms)
        return times
