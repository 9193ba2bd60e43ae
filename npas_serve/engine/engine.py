"""The engine: holds the shared parameters on a device and answers requests.

It is the only place that decides anything about a request: what to run
(through the planner), in what order, when to stop, and what the answer says.
The TorchServe handler and the embedded gRPC server only translate to and
from it. A request is parsed and planned in the caller's thread, then queued;
one device thread (the scheduler) runs the requests in flight in rounds, one
member per round for every request that needs it, newcomers joining between
rounds (continuous batching), and hands each answer back as soon as it exists.
Generated weights are dropped once nobody in flight needs them, unless the
optional byte-bounded cache keeps them.
"""
from __future__ import annotations

import logging
import math
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Mapping, Sequence

import numpy as np
import torch

from npas_serve.checkpoint import Manifest, load_checkpoint
from npas_serve.engine.answer import Answers
from npas_serve.engine.batch import BatchRunner
from npas_serve.engine.cache import WeightCache
from npas_serve.engine.kernels import ConvKernels, choose
from npas_serve.engine.memory import ResidentBytes, resident_bytes
from npas_serve.engine.planner import SAFETY, CostModel, Planner, Step, finishes_within
from npas_serve.engine.run import (DeadlineExceeded, Delivery, Observation, RequestRun, ResourceExhausted, WaysIn,
                                   expired)
from npas_serve.engine.scheduler import BatchScheduler
from npas_serve.engine.stages import StageResult, StageRunner
from npas_serve.engine.traces import Traces
from npas_serve.ensemble import Temperatures
from npas_serve.family import Family
from npas_serve.protocol.request import InferenceRequest, RequestError, RequestLimits, parse_request
from npas_serve.protocol.response import InferenceResponse


log = logging.getLogger(__name__)

@dataclass
class EngineConfig:
    device: str = "cpu"
    cache_bytes: int = 0                 # LRU of generated weights; 0 keeps only the shared parameters
    max_batch: int = 256                 # examples in one request
    max_payload_bytes: int = 4 * 2**20
    warmup_batch_sizes: tuple[int, ...] = (1, 8, 32)
    model_name: str = "npas"
    model_version: str = "1"
    freeze: bool = False                 # generate every member once at load, then run plain modules
    trust_code: bool = False             # load a checkpoint carrying its family's code (runs that code)
    batch_examples: int = 256            # examples the device thread runs as one batch, at most
    batch_delay_ms: float = 0.0          # wait this long for a batch to fill; 0: run what is queued at once
    queue_examples: int | None = None    # examples waiting at most, past it refused; None: 4 x batch_examples
    threads: int = 1                     # torch intra-op threads (0 leaves torch's default); see set_threads
    trace: bool = True                   # run stages and generation as TorchScript traces (engine/traces.py)


def set_threads(threads: int) -> None:
    """The fast setting by default: one intra-op thread. Under load the device thread runs batches
    back to back while gRPC, parsing and encoding need the other cores; torch's default (a thread
    per core, spinning between ops) made a loaded server about 3x slower (issue 10). 0 keeps torch's
    default, for a machine whose cores serve only this engine."""
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


Submit = Callable[..., Sequence]     # Engine.submit, or a stand-in with its signature (servers/engine_process.py)


def waited_answers(submit: Submit, request: InferenceRequest, intermediate: bool) -> Iterator[InferenceResponse]:
    """The answers `submit` delivers to one request, waited for on this thread, the last one final; the
    error that ends it is raised. Closing the iterator early cancels the request's remaining work."""
    box: queue.SimpleQueue = queue.SimpleQueue()
    run, = submit([request], [box.put], intermediate)
    try:
        while True:
            item = box.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.final:
                return
    finally:
        run.cancel()            # a no-op once it has ended


def final_answer(submit: Submit, request: InferenceRequest) -> InferenceResponse:
    """The final answer alone (`waited_answers` without the refined ones)."""
    last = None
    for last in waited_answers(submit, request, intermediate=False):
        pass
    return last


class Engine:
    def __init__(self, family: Family, manifest: Manifest, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        set_threads(self.config.threads)
        self.device = torch.device(self.config.device)
        # serving never trains: no autograd state, and traces may hold the parameters as constants
        self.family = family.to(self.device).eval().requires_grad_(False)
        self.manifest = manifest
        self.names = list(family.names)
        self.num_exits = family.num_exits
        self.limits = RequestLimits(tuple(manifest.input_shape), tuple(self.names), self.num_exits,
                                    self.config.max_batch, self.config.max_payload_bytes,
                                    example_shapes=tuple(manifest.request_shapes))
        self.cache = WeightCache(self.config.cache_bytes)
        # frozen: any generator's weights baked once into plain members (Family.freeze); no generation per request
        self._frozen = ([family.freeze(m).eval().requires_grad_(False) for m in range(len(self.names))]
                        if self.config.freeze else None)
        traces = (Traces(self.family, self.device, self._frozen, self.limits.input_shape)
                  if self.config.trace else None)
        self._stages = StageRunner(self.family, self.device, self.cache, self._frozen, traces)
        self._resident = resident_bytes(self.family, self._frozen, 0)   # fixed at load, but for the cache
        self._stages.kernels = self._choose_kernels()
        self._observers: list[Callable[[Observation], None]] = []
        self._ways_in = WaysIn()      # what an answer's way back is predicted from (engine/run.py)
        self.cost = CostModel(len(self.names), self.num_exits)
        self.cost.fit(self._time_member, self.config.warmup_batch_sizes)
        self.planner = Planner.from_manifest(self.cost, self.names, manifest)
        self.temperatures = Temperatures.from_report(manifest.report)   # fitted on validation by `eval`
        self._batches = BatchRunner(self._stages, self.cost,
                                    Answers(self.names, self.temperatures, self.config.model_name,
                                            self.config.model_version), self.num_exits)
        self.scheduler = BatchScheduler(self._batches.run, self._batches.predict_ms,
                                        self.config.batch_examples, self.config.batch_delay_ms,
                                        self.config.queue_examples)
        self._batches.queue = self.scheduler          # newcomers join between steps; expired ones leave
        self._warm = self.answer(InferenceRequest(  # one request through the whole path before serving
            inputs=np.zeros((1, *self.limits.input_shape), np.float32), request_id="warm-up")).final

    @classmethod
    def load(cls, checkpoint: str | Path, config: EngineConfig | None = None) -> "Engine":
        config = config or EngineConfig()
        family, manifest = load_checkpoint(Path(checkpoint), config.device, trust_code=config.trust_code)
        return cls(family, manifest, config)

    def close(self) -> None:
        """Finish the queued work and stop the device thread."""
        self.scheduler.close()

    def ready(self) -> bool:
        """Serving: it answered its warm-up request and the scheduler is taking work (v2 readiness)."""
        return self._warm and self.scheduler.running

    # --- public surface ---------------------------------------------------------------------
    def add_observer(self, observer: Callable[[Observation], None]) -> None:
        self._observers.append(observer)

    def deliver_together(self, group: Callable[[], ContextManager]) -> None:
        """Give the answers of each step inside `group()`, on the device thread: a step ends many
        requests at once, and a delivery that writes elsewhere (the engine's process, to the
        server's) can keep them until the group ends and write them once."""
        self._batches.together = group

    def parse(self, fields: Mapping[str, bytes | str]) -> InferenceRequest:
        """Validate a request map; a bad one is counted (status "invalid") and raises RequestError."""
        try:
            return parse_request(fields, self.limits)
        except RequestError:
            self.count_invalid()
            raise

    def count_invalid(self) -> None:
        """A request refused as invalid (here, or by a server that parsed it elsewhere): status "invalid"."""
        self._notify(Observation("unknown", "invalid", 0.0, [], None, False, 0.0))

    def count_expired(self, mode: str) -> None:
        """A request refused because its deadline had passed when it came, by a server that checked
        before handing it over (`EngineProcess`): status "deadline", as when refused here."""
        self._notify(Observation(mode, "deadline", 0.0, [], None, False, 0.0))

    def submit(self, requests: Sequence[InferenceRequest], deliveries: Sequence[Delivery],
               intermediate: bool | Sequence[bool] = False, together: bool = False) -> list[RequestRun]:
        """The batched entry: plan each request and queue them together; answers (and the error that
        ends a request: DeadlineExceeded, Cancelled, or the batch's failure) go to its delivery, from
        the device thread, the last answer with `final`. A request refused at admission gets its error
        there at once, from the caller's thread: ResourceExhausted (the queue is full, or its deadline is
        predicted to pass before its first answer) or DeadlineExceeded (its deadline has passed).
        `RequestRun.cancel()` drops a request.

        `together`: their answers leave together (TorchServe sends its batch's replies at once), so
        every request with a budget is planned to end when the tightest of them must."""
        flags = [intermediate] * len(requests) if isinstance(intermediate, bool) else list(intermediate)
        runs = [RequestRun.start(request, self._ways_in, intermediate=flag, deliver=deliver, on_end=self._notify)
                for request, deliver, flag in zip(requests, deliveries, flags, strict=True)]
        if together:
            RequestRun.end_together(runs)
        ahead = self.scheduler.ahead_examples()
        admitted, now_unix_ms = [], time.time() * 1000
        for run in runs:
            if expired(run.request, now_unix_ms):   # the client has gone: no work for an answer nobody waits for
                run.fail(DeadlineExceeded.on_arrival(), "deadline")
                continue
            run.inputs = self._inputs(run.request)
            idle = ahead == 0                # nothing queued or running: it would run at once
            ahead += run.examples
            batch, wait_ms = min(ahead, self.config.batch_examples), self.scheduler.expected_wait_ms(run.examples)
            self._plan(run, batch, wait_ms)
            if self._admit(run, batch, wait_ms, idle):
                admitted.append(run)
            else:
                ahead -= run.examples
        self.scheduler.submit(admitted)
        return runs

    def answer(self, request: InferenceRequest) -> InferenceResponse:
        """The final answer only."""
        return final_answer(self.submit, request)

    def answers(self, request: InferenceRequest, intermediate: bool = True) -> Iterator[InferenceResponse]:
        """One refined answer per finished member (ensemble) or exit (anytime), the last one final.

        `intermediate=False` yields the final answer alone, without building the others
        (each costs a stack, entropy and votes: per-request overhead at batch 1). Closing
        the iterator early drops the request's remaining work.
        """
        return waited_answers(self.submit, request, intermediate)

    def answer_batch(self, requests: Sequence[InferenceRequest]) -> list[InferenceResponse | Exception]:
        """Final answers of requests queued together (TorchServe's batch), returned together, so
        planned to end together (`submit(together=True)`); each request's own error
        (DeadlineExceeded, a failed batch) in its place."""
        boxes = [queue.SimpleQueue() for _ in requests]
        self.submit(requests, [box.put for box in boxes], together=True)
        results = []
        for box in boxes:
            while not (isinstance(item := box.get(), BaseException) or item.final):
                pass
            results.append(item)
        return results

    def take_device_time(self) -> tuple[float, float]:
        """Seconds the device thread spent in rounds of work since the last call, and of them on a CPU
        (`DeviceTime`): the metrics' `npas_device_*_seconds_total`."""
        return self._batches.time.take()

    def resident_bytes(self) -> ResidentBytes:
        """What stays on the device: fixed at load, except the cache (read on every request)."""
        return ResidentBytes(self._resident.bank, self._resident.coefficients, self._resident.norms_heads,
                             self.cache.bytes, self._resident.frozen)

    # --- planning -----------------------------------------------------------------------------
    def _inputs(self, request: InferenceRequest) -> torch.Tensor:
        return torch.from_numpy(self.manifest.normalisation.apply(request.inputs)).to(self.device)

    def _plan(self, run: RequestRun, batch: int, wait_ms: float) -> None:
        """Plan for the batch it will join, with the predicted wait in the queue counted as spent."""
        request = run.request
        budget = None if run.budget_ms is None else run.budget_ms - wait_ms
        if request.mode == "anytime":
            member = None if request.members is None else self.names.index(request.members[0])
            run.plan = self.planner.anytime(batch, member, request.exit, budget)
        else:
            members = None if request.members is None else [self.names.index(n) for n in request.members]
            run.plan = self.planner.ensemble(batch, request.ensemble_size, members, budget)

    def _admit(self, run: RequestRun, batch: int, wait_ms: float, idle: bool) -> bool:
        """Refuse at once (ResourceExhausted) a request whose deadline is predicted to pass, given the
        queue ahead, before its first answer: it would only cost work and end in DEADLINE_EXCEEDED.
        The prediction is the optimistic one (SAFETY x the planned time, the planner's margin turned
        the other way): a refusal is a certain miss, a request that may still make it is run.
        A bare budget is a target, not a refusal: its late answer still reaches the caller.

        On an `idle` device the prediction is not asked: running costs no other request anything, and
        the run corrects the cost model. The model learns only from what runs, so one that a burst
        inflated (an overload, a noisy neighbour) would otherwise refuse every tight deadline forever,
        learning nothing: a benchmark run after an overload had every call of a 10 ms budget refused,
        each predicted at 13 ms for a member that takes 1-3."""
        if run.deadline_at == math.inf or idle:
            return True
        first_ms = wait_ms + self.planner.first_answer_ms(run.plan, batch)
        if finishes_within(first_ms * SAFETY, run.started, (run.deadline_at - run.started) * 1000 - run.way_back_ms):
            return True
        run.fail(ResourceExhausted(f"deadline_unix_ms: the queue ahead ({wait_ms:.0f} ms predicted) and the "
                                   f"first answer ({first_ms - wait_ms:.0f} ms) end after the deadline; nothing "
                                   f"was computed, retry later or with a later deadline"), "overloaded")
        return False

    def _notify(self, observation: Observation) -> None:
        """Observers run on the device thread: one that fails is logged, never the batch's failure."""
        for observer in self._observers:
            try:
                observer(observation)
            except Exception:
                log.exception("an observer failed on %s", observation)

    # --- warm-up ------------------------------------------------------------------------------
    @torch.inference_mode()
    def _choose_kernels(self) -> ConvKernels:
        """The convolution kernels by batch size that run this family fastest here (engine/kernels.py),
        timed on every member's stages with their weights generated beforehand."""
        steps = [Step(m, s) for m in range(len(self.names)) for s in range(self.num_exits)]

        def seconds(kernels: ConvKernels, batch: int) -> float:
            self._stages.kernels = kernels
            t0 = time.perf_counter()
            for m in range(len(self.names)):
                self._run_member(m, batch)
            return time.perf_counter() - t0

        self._stages.prepare(steps)
        try:
            kernels = choose(seconds, self.device)
        finally:
            self._stages.release()
        log.info("convolutions: PyTorch's own kernels up to batch %d, then torch's choice (oneDNN)",
                 kernels.direct_up_to)
        return kernels

    @torch.inference_mode()
    def _time_member(self, member: int, batch: int) -> list[float]:
        """Milliseconds of each stage (generation + stage + head) of `member` at `batch`."""
        results = self._run_member(member, batch)
        for s, result in enumerate(results):
            self.cost.observe(Step(member, s), batch, result.ms)
        return [result.ms for result in results]

    def _run_member(self, member: int, batch: int) -> list[StageResult]:
        """Every stage of `member` on `batch` random examples, each on the one before's output."""
        h = torch.randn(batch, *self.limits.input_shape, device=self.device)
        results = []
        for s in range(self.num_exits):
            results.append(self._stages.run(Step(member, s), h))
            h = results[-1].hidden
        return results
