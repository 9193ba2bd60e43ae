"""One request in flight: its clock, its budget, its plan, what it has done, and where its answers go.

The engine carries one `RequestRun` through a request's life (queue, batch, answer)
instead of passing the clock, budget and tallies around. Answers leave through
`deliver` as soon as they exist (the caller decides how: a queue for a thread, the
event loop for grpc.aio); when the request ends it becomes the `Observation` that
adapters turn into metrics.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from npas_serve.engine.planner import Plan
from npas_serve.engine.stages import StageResult
from npas_serve.protocol.request import InferenceRequest
from npas_serve.protocol.response import InferenceResponse

log = logging.getLogger(__name__)


class DeadlineExceeded(Exception):
    """The request's deadline passed before it had any answer: servers say DEADLINE_EXCEEDED / 504."""

    @classmethod
    def on_arrival(cls) -> "DeadlineExceeded":
        """Its deadline had passed when it came (`expired`): nothing was computed."""
        return cls("deadline_unix_ms: the deadline passed before the request was run; nothing was computed")


class ResourceExhausted(Exception):
    """Refused at admission, nothing computed: the queue is full, or the request's deadline is predicted
    to pass before its first answer given the queue ahead (servers say RESOURCE_EXHAUSTED / 429)."""


class Cancelled(Exception):
    """The caller gave up (cancelled call, expired gRPC deadline): its work was dropped."""


@dataclass
class Observation:
    """What one request did; adapters turn it into their metrics."""

    mode: str
    status: str                 # ok | invalid | error | deadline | cancelled | overloaded
    latency_s: float
    members_run: list[str]
    exit_depth: int | None
    budget_missed: bool
    generation_s: float
    cache_hits: int = 0         # stages this request took from the weight cache
    queue_s: float | None = None          # from arrival to its batch starting on the device
    batch_examples: int | None = None     # examples in the batch it ran in (its own included)


def way_back_ms(deadline_unix_ms: float | None, sent_unix_ms: float | None, now_unix_ms: float,
                recent_ms: float = 0.0) -> float:
    """What to keep of a deadline for the answer's way back to the client: as long as the request's way
    in took (now - sent_unix_ms, both on the client's clock), or `recent_ms` (what the ways in of recent
    requests say, `WaysIn`) if longer, at most half the time left; 0 without a deadline or a send time.
    The client sees the deadline, not the engine: an answer the engine finishes at the deadline
    reaches the client after it."""
    if deadline_unix_ms is None or sent_unix_ms is None:
        return 0.0
    way_in = max(0.0, now_unix_ms - sent_unix_ms)
    return min(max(way_in, recent_ms), max(0.0, deadline_unix_ms - now_unix_ms) / 2)


class WaysIn:
    """The ways in of recent requests (arrival at the engine minus `sent_unix_ms`), to predict an
    answer's way back from the slowest tenth of them rather than from its own request's alone.

    Why: the way back crosses the same event loops, pipes and cores a moment later, and on a loaded
    machine how long it takes depends on what else is in flight then, not on how fast this request
    came in. On 2 shared cores at 90% of capacity, answers the engine finished within the budget
    left after their own way in still reached the client late: 322 of the 400 late ones in one run.
    Written and read on whichever thread submits; a lost update shifts a percentile, nothing more."""

    SIZE, QUANTILE, EVERY = 256, 0.9, 16      # ways kept, the quantile kept for the way back, its refresh

    def __init__(self):
        self._ms: list[float] = []
        self._next = 0
        self.reserve_ms = 0.0

    def add(self, ms: float) -> None:
        if len(self._ms) < self.SIZE:
            self._ms.append(ms)
        else:
            self._ms[self._next % self.SIZE] = ms
        self._next += 1
        if self._next % self.EVERY == 0 or self._next < self.EVERY:
            ways = sorted(self._ms)
            self.reserve_ms = ways[min(len(ways) - 1, int(self.QUANTILE * len(ways)))]


def expired(request: InferenceRequest, now_unix_ms: float) -> bool:
    """Its absolute deadline has passed: the client has gone and nobody waits for an answer, so no
    work is done for it. Only an absolute deadline is hard; a bare budget is a target."""
    return request.deadline_unix_ms is not None and now_unix_ms >= request.deadline_unix_ms


def effective_budget_ms(budget_ms: float | None, deadline_unix_ms: float | None,
                        now_unix_ms: float) -> float | None:
    """The tighter of a latency budget and the time left until an absolute deadline (None: neither)."""
    if deadline_unix_ms is None:
        return budget_ms
    left = deadline_unix_ms - now_unix_ms
    return left if budget_ms is None else min(budget_ms, left)


NO_BUDGET_DUE_S = 10.0     # when a request without a budget or deadline counts as due

Delivery = Callable[["InferenceResponse | BaseException"], None]


@dataclass(eq=False)
class RequestRun:
    request: InferenceRequest
    started: float                                  # time.perf_counter() at arrival
    budget_ms: float | None                         # what is left of the budget at arrival
    plan: Plan | None = None
    members_run: list[str] = field(default_factory=list)
    last: InferenceResponse | None = None           # the latest answer given
    generation_s: float = 0.0
    cache_hits: int = 0
    inputs: torch.Tensor | None = None              # normalised, on the device
    intermediate: bool = False                      # build and deliver the refined answers too
    deliver: Delivery | None = None                 # where answers (or the error that ends it) go
    on_end: Callable[[Observation], None] | None = None
    seq: int = 0                                    # arrival order, the tie-break after the deadline
    queue_s: float | None = None
    batch_examples: int | None = None
    done: bool = False
    deadline_at: float = math.inf                   # perf_counter() time of the absolute deadline, if any
    way_back_ms: float = 0.0                        # kept of the deadline for the answer's way back
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, request: InferenceRequest, ways_in: WaysIn | None = None, **fields) -> "RequestRun":
        """`ways_in`: the recent ways in this request's adds to and whose slowest tenth it keeps for
        its way back (without it, its own way in alone)."""
        started, now_unix_ms = time.perf_counter(), time.time() * 1000
        deadline = request.deadline_unix_ms
        back = way_back_ms(deadline, request.sent_unix_ms, now_unix_ms, ways_in.reserve_ms if ways_in else 0.0)
        if ways_in is not None and request.sent_unix_ms is not None:
            ways_in.add(max(0.0, now_unix_ms - request.sent_unix_ms))
        return cls(request, started,
                   effective_budget_ms(request.budget_ms, None if deadline is None else deadline - back, now_unix_ms),
                   deadline_at=math.inf if deadline is None else started + (deadline - now_unix_ms) / 1000,
                   way_back_ms=back, **fields)

    @staticmethod
    def end_together(runs: "Sequence[RequestRun]") -> None:
        """Budgets of requests whose answers leave together, cut to end when the tightest ends: an
        answer ready before its neighbours' waits for them anyway, so a neighbour that plans to the
        end of a longer budget makes it late. Requests without a budget keep none."""
        ends = [r.started + r.budget_ms / 1000 for r in runs if r.budget_ms is not None]
        if ends:
            for r in runs:
                if r.budget_ms is not None:
                    r.budget_ms = (min(ends) - r.started) * 1000

    # --- clock ---------------------------------------------------------------------------------
    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    @property
    def examples(self) -> int:
        return len(self.request.inputs)

    @property
    def due(self) -> float:
        """perf_counter() time its budget or deadline ends: the order of the queue and of the rounds.
        Without either it is due NO_BUDGET_DUE_S after arrival: behind budgeted requests, but never
        starved by a steady stream of them."""
        return self.started + (NO_BUDGET_DUE_S if self.budget_ms is None else self.budget_ms / 1000)

    def deadline_passed(self) -> bool:
        """Only an absolute deadline is hard (nobody waits after it); a bare budget is a target."""
        return time.perf_counter() >= self.deadline_at

    # --- cancellation --------------------------------------------------------------------------
    def cancel(self) -> None:
        """Thread-safe: the scheduler drops it from the queue, or from its batch at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # --- tallies and the end -------------------------------------------------------------------
    def count(self, result: StageResult) -> None:
        self.generation_s += result.generation_s
        self.cache_hits += result.cache_hits

    def give(self, answer: InferenceResponse) -> None:
        """Deliver an answer; a final one ends the request, observed first: a caller holding its final
        answer finds the request in the metrics (TorchServe's handler sends them when its batch ends)."""
        if self.done:
            return
        self.last = answer
        if answer.final:
            self._end("ok")
        self._deliver(answer)

    def fail(self, error: BaseException, status: str) -> None:
        if self.done:
            return
        self._end(status)
        self._deliver(error)

    def _deliver(self, item: "InferenceResponse | BaseException") -> None:
        """A delivery that fails is its caller's loss alone: logged, never the batch's failure."""
        if self.deliver is None:
            return
        try:
            self.deliver(item)
        except Exception:
            log.exception("delivering to request %s failed", self.request.request_id)

    def _end(self, status: str) -> None:
        self.done = True
        if self.on_end is not None:
            self.on_end(self.observation(status))

    def observation(self, status: str) -> Observation:
        missed = bool(self.last is not None and self.last.budget_met is False)
        return Observation(self.request.mode, status, self.elapsed_ms() / 1000, self.members_run,
                           self.last.exit_reached if self.last else None, missed, self.generation_s,
                           self.cache_hits, self.queue_s, self.batch_examples)
