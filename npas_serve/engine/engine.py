"""The engine: holds the shared parameters on a device and answers requests.

It is the only place that decides anything about a request: what to run
(through the planner), in what order, when to stop, and what the answer says.
The TorchServe handler and the embedded gRPC server only translate to and
from it. Per request it runs decode -> plan -> run -> encode; each member's
stage weights are generated just before the stage and dropped after it,
unless the optional byte-bounded cache keeps them.
"""
from __future__ import annotations

import math
import statistics
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch

from npas_serve.checkpoint import Manifest, load_checkpoint
from npas_serve.engine.cache import WeightCache
from npas_serve.engine.planner import SAFETY, CostModel, Plan, Planner, Step
from npas_serve.evaluate import Report
from npas_serve.family import Family
from npas_serve.protocol.request import InferenceRequest, RequestError, RequestLimits, parse_request
from npas_serve.protocol.response import InferenceResponse

WAIT_EMA = 0.2        # weight of a new lock wait in the expected wait


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


@dataclass(frozen=True)
class ResidentBytes:
    bank: int             # the templates / table counted against the budget
    coefficients: int     # everything else the generator holds
    norms_heads: int      # per-member norms, heads and biases
    cache: int            # generated weights kept by the optional cache
    frozen: int = 0       # the plain members built by `freeze` (their own weights, norms and heads)

    @property
    def total(self) -> int:
        return self.bank + self.coefficients + self.norms_heads + self.cache + self.frozen


class FifoLock:
    """A lock granted in arrival order.

    Requests take the engine lock once per member (or exit), so concurrent requests
    interleave. With a plain lock the thread that just released it usually wins it
    back, so a request waits for whole other requests, by luck; in arrival order it
    waits for the work queued ahead of it, which `Engine._fits` can expect.
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._next = 0                    # next ticket to hand out
        self._serving = 0                 # ticket that holds the lock
        self._abandoned: set[int] = set() # tickets whose waiter gave up (an exception while waiting)

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            try:
                while ticket != self._serving:
                    self._cond.wait()
            except BaseException:
                self._abandoned.add(ticket)
                self._advance(0)
                raise

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._advance(1)

    def _advance(self, step: int) -> None:
        self._serving += step
        while self._serving in self._abandoned:
            self._abandoned.remove(self._serving)
            self._serving += 1
        self._cond.notify_all()


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


@dataclass
class _Tally:
    """What a request's stages add up to, for its Observation."""

    generation_s: float = 0.0
    cache_hits: int = 0


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
        self._static_bytes = self._count_static_bytes()
        self._mean = manifest.normalisation.mean
        self._std = manifest.normalisation.std
        self._lock = FifoLock()                  # one forward at a time; torch already uses every core
        self._wait_ms = 0.0                      # expected wait for the lock (EMA): other requests' work
        self._observers: list[Callable[[Observation], None]] = []
        self.cost = CostModel(len(self.names), self.num_exits)
        self.cost.fit(self._time_member, self.config.warmup_batch_sizes)
        self.planner = self._make_planner(manifest.report)

    @classmethod
    def load(cls, checkpoint: str | Path, config: EngineConfig | None = None) -> "Engine":
        config = config or EngineConfig()
        family, manifest = load_checkpoint(Path(checkpoint), config.device, trust_code=config.trust_code)
        return cls(family, manifest, config)

    def _make_planner(self, report_dict: dict | None) -> Planner:
        m, e = len(self.names), self.num_exits
        if report_dict is None:   # no evaluation yet: treat members alike, deeper exits as better
            acc = np.tile(np.arange(1, e + 1) / e, (m, 1))
            order = list(range(m))
        else:
            report = Report.from_dict(report_dict)
            acc = np.array([[report.exit_score(n, x).accuracy for x in range(e)] for n in self.names])
            order = [self.names.index(n) for n in report.member_order]
        return Planner(self.cost, acc[:, -1], acc, order)

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
        started = time.perf_counter()
        budget = self._effective_budget(request)
        members_run: list[str] = []
        tally = _Tally()
        final: InferenceResponse | None = None
        status = "error"
        try:
            run = self._run_anytime if request.mode == "anytime" else self._run_ensemble
            for final in run(request, started, budget, members_run, tally, intermediate):
                yield final
            status = "ok"
        except RequestError:
            status = "invalid"
            raise
        finally:
            latency = time.perf_counter() - started
            missed = bool(final is not None and final.budget_met is False)
            self._notify(Observation(request.mode, status, latency, members_run,
                                     final.exit_reached if final else None, missed, tally.generation_s,
                                     tally.cache_hits))

    def resident_bytes(self) -> ResidentBytes:
        """What stays on the device: fixed at load, except the cache (read on every request)."""
        return ResidentBytes(*self._static_bytes[:3], self.cache.bytes, self._static_bytes[3])

    def _count_static_bytes(self) -> tuple[int, int, int, int]:
        """(bank, the generator's other tensors, norms and heads, frozen members) in bytes."""
        bank = coeffs = private = 0
        for name, t in self.family.state_dict().items():
            size = t.numel() * t.element_size()
            if name.startswith("generator.banks."):
                bank += size
            elif name.startswith("generator."):
                coeffs += size
            else:
                private += size
        if bank == 0:   # a generator without `banks`: count what it reports against the budget
            gen_bytes = coeffs
            bank = self.family.generator.bank_numel() * 4
            coeffs = gen_bytes - bank
        frozen = sum(t.numel() * t.element_size() for m in self._frozen or [] for t in m.state_dict().values())
        return bank, coeffs, private, frozen

    # --- running ----------------------------------------------------------------------------
    def _effective_budget(self, request: InferenceRequest) -> float | None:
        budget = request.latency_budget_ms
        if request.deadline_unix_ms is not None:
            left = request.deadline_unix_ms - time.time() * 1000
            budget = left if budget is None else min(budget, left)
        return budget

    def _inputs(self, request: InferenceRequest) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(request.inputs, dtype=np.float32))
        return ((x - self._mean) / self._std).to(self.device)

    def _stage(self, step: Step, h: torch.Tensor, tally: _Tally) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Generate a stage's weights, run the stage and its exit head; returns (h, probs, ms)."""
        t0 = time.perf_counter()
        if self._frozen is not None:          # weights baked in at load: nothing to generate
            member = self._frozen[step.member]
            t1 = t0
            h = member.stages[step.stage](h)
        else:
            member = self.family.members[step.member]
            if self.cache.max_bytes:
                hits = self.cache.hits       # exact: stages run one at a time under the engine lock
                weights = self.cache.get((step.member, step.stage),
                                         lambda: self.family.stage_weights(step.member, step.stage))
                tally.cache_hits += self.cache.hits - hits
            else:
                weights = self.family.stage_weights(step.member, step.stage)
            t1 = time.perf_counter()
            with self.family.bound(step.member, step.stage, weights):
                h = member.stages[step.stage](h)
        probs = member.heads[step.stage](h).softmax(dim=-1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        ms = (time.perf_counter() - t0) * 1000
        tally.generation_s += t1 - t0
        self.cost.observe(step, h.shape[0], ms)
        return h, probs, ms

    def _run_ensemble(self, request, started, budget, members_run, tally,
                      intermediate: bool = True) -> Iterator[InferenceResponse]:
        x = self._inputs(request)
        members = None if request.members is None else [self.names.index(n) for n in request.members]
        plan = self.planner.ensemble(len(x), request.ensemble_size, members, budget)
        steps = {m: [s for s in plan.steps if s.member == m] for m in plan.members}
        done: list[torch.Tensor] = []
        for i, m in enumerate(plan.members):
            h = x
            with self._locked(), torch.inference_mode():
                for step in steps[m]:
                    h, probs, _ = self._stage(step, h, tally)
            done.append(probs)
            members_run.append(self.names[m])
            # stop before a member that would break the budget; the answer so far is final
            last = i == len(plan.members) - 1 or not self._fits(
                steps[plan.members[i + 1]], len(x), started, budget)
            if last or intermediate:
                yield self._response(request, plan, done, list(members_run), None, started, budget, final=last)
            if last:
                return

    def _run_anytime(self, request, started, budget, members_run, tally,
                     intermediate: bool = True) -> Iterator[InferenceResponse]:
        x = self._inputs(request)
        member = None if request.members is None else self.names.index(request.members[0])
        plan = self.planner.anytime(len(x), member, request.exit, budget)
        members_run.append(self.names[plan.members[0]])
        h, seen = x, []
        for i, step in enumerate(plan.steps):
            with self._locked(), torch.inference_mode():
                h, probs, _ = self._stage(step, h, tally)
            seen.append(probs)
            confident = (request.min_confidence is not None
                         and bool((probs.max(dim=-1).values >= request.min_confidence).all()))
            last = (confident or i == len(plan.steps) - 1
                    or not self._fits([plan.steps[i + 1]], len(x), started, budget))
            if last or intermediate:
                yield self._response(request, plan, seen, list(members_run), step.stage, started, budget,
                                     final=last)
            if last:
                return

    @contextmanager
    def _locked(self):
        """The engine lock; how long it took to get feeds the expected wait that `_fits` counts."""
        t0 = time.perf_counter()
        with self._lock:
            waited = (time.perf_counter() - t0) * 1000
            self._wait_ms = (1 - WAIT_EMA) * self._wait_ms + WAIT_EMA * waited
            yield

    def _fits(self, steps: list[Step], batch: int, started: float, budget: float | None) -> bool:
        """`Planner.fits`, with the expected wait for the lock counted as time already spent.

        Under concurrent load the next member or exit first waits for other requests'
        stages; a check that ignored the wait would start work that ends past the budget.
        Like the initial plan, it keeps 1 - SAFETY of the budget for prediction error.
        """
        return self.planner.fits(steps, batch, started - self._wait_ms / 1000,
                                 None if budget is None else budget * SAFETY)

    def _response(self, request: InferenceRequest, plan: Plan, probs: list[torch.Tensor], members: list[str],
                  exit_reached: int | None, started: float, budget: float | None, final: bool) -> InferenceResponse:
        """Ensemble: the mean of the members' probabilities. Anytime: the latest exit's.

        Disagreement is the share of voters (members, or the exits run so far) whose
        top class differs from the answer's.
        """
        answer = probs[-1] if exit_reached is not None else torch.stack(probs).mean(dim=0)
        pred = answer.argmax(dim=-1)
        entropy = -(answer * answer.clamp_min(1e-12).log()).sum(dim=-1)
        votes = torch.stack([p.argmax(dim=-1) for p in probs])
        disagreement = (votes != pred).float().mean(dim=0)
        latency = (time.perf_counter() - started) * 1000
        if exit_reached is None:
            plan_names = [self.names[m] for m in plan.members]
        else:
            plan_names = [f"{self.names[s.member]}:e{s.stage}" for s in plan.steps]
        return InferenceResponse(
            request_id=request.request_id or uuid.uuid4().hex, model_name=self.config.model_name,
            model_version=self.config.model_version, mode=request.mode,
            predictions=pred.cpu().tolist(), probabilities=answer.float().cpu().numpy(),
            entropy=entropy.cpu().tolist(), disagreement=disagreement.cpu().tolist(),
            members_used=members, exit_reached=exit_reached, plan=plan_names, latency_ms=latency,
            latency_budget_ms=request.latency_budget_ms,
            budget_met=None if budget is None else latency <= budget, final=final)

    def _notify(self, observation: Observation) -> None:
        for observer in self._observers:
            observer(observation)

    # --- warm-up ------------------------------------------------------------------------------
    @torch.inference_mode()
    def _time_member(self, member: int, batch: int) -> list[float]:
        """Milliseconds of each stage (generation + stage + head) of `member` at `batch`."""
        x = torch.randn(batch, *self.limits.input_shape, device=self.device)
        times, h = [], x
        for s in range(self.num_exits):
            h, _, ms = self._stage(Step(member, s), h, _Tally())
            times.append(ms)
        return times
