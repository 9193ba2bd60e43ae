"""The device's work: each needed member once, on the examples of every request in flight that needs it.

The scheduler hands over the requests it took from the queue, and the runner goes on
until none is left, taking newcomers from the queue between members (continuous
batching at member granularity): a request that arrives while others run waits for the
member being run, not for the others' whole plans. Each round runs one member, the next
one the most urgent request still needs, with its stages once on the concatenated examples
of every request in flight needing it. When a round's member has no weights yet, those of
every member the requests in flight still need are generated in one call; they serve every
round until the device goes idle (`run` returns), so a steady load generates a member once
per busy period, and an idle engine holds only the shared parameters.

Urgency: first answers before refinements, then earliest due, then arrival. An ensemble
request that has an answer can end at any step with it, one that has none cannot, so a
newcomer's first member goes before other requests' later members (until those are
overdue: a request without a budget is never starved). Every round then ends, with the
answer it has, each request whose next member no longer fits its budget behind the work
now ahead of it: refinements give way to first answers instead of finishing late.

Between steps a request can leave:

- anytime: at its planned exit, at `min_confidence`, or when its next exit no longer fits;
- ensemble: when the members of its plan are done, or its next member no longer fits;
- any: cancelled (dropped), or past its deadline (its best answer so far, or DeadlineExceeded).

A member that nothing can leave in the middle of (no anytime request, no deadline it may outlast)
runs whole, all its stages in one call: the checks between its stages would find nothing to do.

Answers leave as soon as they exist: an ensemble's answer after the members of its plan
order that are done (a member done out of its order waits for the ones before it), an
anytime answer after each exit. Every request has ended when `run` returns.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Protocol, Sequence

import torch

from npas_serve.engine.answer import Answers, Due
from npas_serve.engine.planner import CostModel, Step, fits_with_margin
from npas_serve.engine.run import Cancelled, DeadlineExceeded, RequestRun
from npas_serve.engine.stages import StageResult, StageRunner


class Queue(Protocol):
    """What the runner asks of the scheduler between steps."""

    def expire(self) -> None:
        """Refuse queued requests nobody waits for any more."""

    def join(self, examples_in_flight: int) -> list[RequestRun]:
        """Queued requests that fit beside `examples_in_flight`, most urgent first."""

    def busy_for(self, ms: float, examples: int) -> None:
        """The work in flight (`examples`) is predicted to end in `ms`: what a newcomer waits for."""


class _NoQueue:
    def expire(self) -> None:
        pass

    def join(self, examples_in_flight: int) -> list[RequestRun]:
        return []

    def busy_for(self, ms: float, examples: int) -> None:
        pass


@dataclass(eq=False)
class _Progress:
    """What one request has in flight: per member probabilities (ensemble) or per exit (anytime)."""

    run: RequestRun
    by_member: dict[int, torch.Tensor] = field(default_factory=dict)
    exits: list[torch.Tensor] = field(default_factory=list)
    given: int = 0                        # ensemble: members of its plan order answered so far

    @property
    def anytime(self) -> bool:
        return self.run.request.mode == "anytime"

    @property
    def answered(self) -> bool:
        """It has an answer it could end with."""
        return self.given > 0 or bool(self.exits)

    def urgency(self, now: float) -> tuple:
        """Sort key, most urgent first: no answer yet (or overdue), then due, then arrival."""
        return self.answered and now < self.run.due, self.run.due, self.run.seq

    def needs(self, member: int) -> bool:
        return not self.run.done and member in self.run.plan.members and member not in self.by_member

    def next_member(self) -> int | None:
        """The first member of its plan it has not had yet."""
        return next((m for m in self.run.plan.members if m not in self.by_member), None)

    def depth(self, num_exits: int) -> int:
        return self.run.plan.last_exit if self.anytime else num_exits - 1

    def voters(self) -> list[torch.Tensor]:
        if self.anytime:
            return list(self.exits)
        return [self.by_member[m] for m in self.run.plan.members[: self.given]]


class DeviceTime:
    """The device thread's time in rounds: wall, and of it on a CPU. The rest it waited: for a core
    (a shared machine) or for the GIL (the gRPC loop's Python, between every operator it runs), so a
    server whose CPU share is low is slowed by its neighbours, not by its own work. On CUDA, time
    waiting for the device counts as waiting too. Read by the metrics (`take`) on any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._wall_s = self._cpu_s = 0.0

    def add(self, wall_s: float, cpu_s: float) -> None:
        with self._lock:
            self._wall_s += wall_s
            self._cpu_s += cpu_s

    def take(self) -> tuple[float, float]:
        """(wall, CPU) seconds since the last `take`."""
        with self._lock:
            out, self._wall_s, self._cpu_s = (self._wall_s, self._cpu_s), 0.0, 0.0
        return out


class BatchRunner:
    def __init__(self, stages: StageRunner, cost: CostModel, answers: Answers, num_exits: int,
                 queue: Queue | None = None):
        self.stages = stages
        self.cost = cost
        self.answers = answers
        self.num_exits = num_exits
        self.queue: Queue = queue or _NoQueue()     # the scheduler, once it exists
        self._due: list[Due] = []                   # answers of the current step, built together by `_send`
        self.time = DeviceTime()
        self.together: Callable[[], ContextManager] = contextlib.nullcontext   # around a step's deliveries

    # --- prediction -------------------------------------------------------------------------
    def predict_ms(self, runs: Sequence[RequestRun]) -> float:
        """Queued requests' work: each member once, at the examples of the requests needing it."""
        return self._work_ms([(r, r.plan.members) for r in runs])

    def _work_ms(self, needs: Sequence[tuple[RequestRun, Sequence[int]]]) -> float:
        total = 0.0
        for m in dict.fromkeys(m for _, members in needs for m in members):
            group = [r for r, members in needs if m in members]
            depth = max(r.plan.last_exit if r.request.mode == "anytime" else self.num_exits - 1 for r in group)
            total += self.cost.member_ms(m, sum(r.examples for r in group), depth)
        return total

    def _newcomer_wait_ms(self, member: int, group: Sequence[_Progress], flight: Sequence[_Progress]) -> float:
        """What a request arriving now waits for before its first member runs: this round, and the
        first members of the requests in flight still without an answer (refinements come after it)."""
        first = [(p.run, [m]) for p in flight if not p.answered and (m := p.next_member()) not in (None, member)]
        return self.cost.member_ms(member, sum(p.run.examples for p in group)) + self._work_ms(first)

    # --- running ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, runs: Sequence[RequestRun]) -> None:
        flight = [_Progress(r) for r in runs]
        failure: BaseException = RuntimeError("the device stopped before this request's plan did")
        try:
            while True:
                flight = [p for p in flight if not p.run.done]
                flight += [_Progress(r) for r in self.queue.join(sum(p.run.examples for p in flight))]
                flight = [p for p in flight if self._still_wanted(p)]
                if not flight:
                    return
                now, cpu = time.perf_counter(), time.thread_time()    # the round starts: its overhead from here
                flight.sort(key=lambda p: p.urgency(now))
                self._settle(flight)
                flight = [p for p in flight if not p.run.done]
                if not flight:
                    return
                member = next((m for p in flight if (m := p.next_member()) is not None), None)
                if member is None:      # a request in flight that needs nothing: the finally below fails it
                    return
                self._prepare(flight, member)
                group = [p for p in flight if p.needs(member)]
                self.queue.busy_for(self._newcomer_wait_ms(member, group, flight), sum(p.run.examples for p in flight))
                steps_ms = self._member(member, group, flight)
                wall_s = time.perf_counter() - now
                self.cost.observe_round(wall_s * 1000 - steps_ms)
                self.time.add(wall_s, time.thread_time() - cpu)
        except BaseException as err:    # every request in flight, joined ones included, says so
            failure = err
            raise
        finally:
            self.stages.release()
            self._due = []              # a failed step's answers are not built: the scheduler fails its requests
            self.queue.busy_for(0.0, 0)
            for p in flight:            # nothing may be left waiting
                if not p.run.done:
                    p.run.fail(failure, "error")

    def _prepare(self, flight: list[_Progress], member: int) -> None:
        """When a step of `member` the round runs has no weights yet, generate in one call those of
        every step the requests in flight still need (each bank read once for all of them)."""
        needed = {}
        for p in flight:
            for m in p.run.plan.members:
                if p.needs(m):
                    needed[m] = max(needed.get(m, -1), p.depth(self.num_exits))
        missing = [Step(m, s) for m, depth in needed.items() for s in range(depth + 1)
                   if not self.stages.prepared(Step(m, s))]
        if any(s.member == member for s in missing):
            self.stages.prepare(missing)

    def _member(self, member: int, group: list[_Progress], flight: list[_Progress]) -> float:
        """All stages of one member, each once on the rows of the requests still needing it (or all in
        one call, `_whole`); the milliseconds its steps took."""
        depth = max(p.depth(self.num_exits) for p in group)
        h = torch.cat([p.run.inputs for p in group]) if len(group) > 1 else group[0].run.inputs
        steps_ms, stage = 0.0, 0
        while stage <= depth:
            self.queue.expire()
            group, h = self._keep(group, h, [p for p in group if self._still_wanted(p)])
            if not group:
                return steps_ms
            result = self._whole(member, group, h) if stage == 0 and depth == self.num_exits - 1 else None
            if result is not None:
                stage = depth               # the member ran whole: its last stage's answers follow
            else:
                step = Step(member, stage)
                result = self.stages.run(step, h)
                self.cost.observe(step, h.shape[0], result.ms)
            steps_ms += result.ms
            start, finished = 0, []
            for p in group:
                rows = slice(start, start + p.run.examples)
                start = rows.stop
                p.run.count(result)
                if p.anytime:
                    self._exit(p, stage, result.probs[rows], len(h))
                elif stage == self.num_exits - 1:
                    p.by_member[member] = result.probs[rows]
                    finished.append(p)
            if finished:
                ahead = self._ahead(flight)
                for p in finished:
                    self._members_done(p, ahead[id(p)])
            self._send()
            if stage < depth:
                group, h = self._keep(group, result.hidden,
                                      [p for p in group if not p.run.done and p.depth(self.num_exits) > stage])
            stage += 1
        return steps_ms

    def _whole(self, member: int, group: list[_Progress], h: torch.Tensor) -> StageResult | None:
        """The member's every stage in one call (`StageRunner.run_member`), when nothing would leave the
        batch between its stages: no anytime request (each leaves at its exits) and no deadline that
        can pass before the member ends. A cancelled call then leaves at the member's end, not at the
        next stage. The cost model sees each step's share of the time (by its prediction)."""
        n = len(h)
        ends = time.perf_counter() + self.cost.member_ms(member, n) / 1000
        if any(p.anytime or p.run.deadline_at <= ends for p in group):
            return None
        result = self.stages.run_member(member, h)
        if result is not None:
            predicted = [self.cost.predict(Step(member, s), n) for s in range(self.num_exits)]
            total = sum(predicted)
            if total > 0:
                for s, share in enumerate(predicted):
                    self.cost.observe(Step(member, s), n, result.ms * share / total)
        return result

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
        if stage == 0:
            run.members_run.append(self.answers.names[run.plan.members[0]])
        confident = (request.min_confidence is not None
                     and bool((probs.max(dim=-1).values >= request.min_confidence).all()))
        last = (confident or stage == run.plan.last_exit
                or not self._fits(run, self.cost.predict(Step(run.plan.members[0], stage + 1), batch)))
        if last or run.intermediate:
            self._due.append(Due.of(run, p.voters(), stage, last))

    def _settle(self, flight: list[_Progress]) -> None:
        """End now, with the answer it has, each answered ensemble request whose next member no
        longer fits behind the work ahead of it (`flight` in urgency order)."""
        ahead = self._ahead(flight)
        for p in flight:
            if p.answered and not p.anytime and not p.run.done and not self._fits(p.run, self._ms_until_next(p, ahead[id(p)])):
                self._due.append(Due.of(p.run, p.voters(), None, True))
        self._send()

    def _ahead(self, flight: Sequence[_Progress]) -> dict[int, dict[int, tuple[int, int]]]:
        """For each request in flight (by id; `flight` in urgency order), the work of the more urgent
        ones that goes before its next member: member -> (examples, deepest stage). That is the first
        member of one without an answer, and every member another still needs. One pass, so a round
        of n requests costs O(n), not O(n^2)."""
        out, work = {}, {}
        for p in flight:
            out[id(p)] = dict(work)
            for m in [m for m in p.run.plan.members if p.needs(m)][: None if p.answered else 1]:
                examples, depth = work.get(m, (0, -1))
                work[m] = (examples + p.run.examples, max(depth, p.depth(self.num_exits)))
        return out

    def _members_done(self, p: _Progress, ahead: dict[int, tuple[int, int]]) -> None:
        """Answer every member of its plan order now available; the last one it gets is final. Its next
        member is predicted to end after the work that goes before it (`ahead`)."""
        run, plan = p.run, p.run.plan
        while p.given < len(plan.members) and plan.members[p.given] in p.by_member:
            p.given += 1
            run.members_run.append(self.answers.names[plan.members[p.given - 1]])
            last = p.given == len(plan.members) or not self._fits(run, self._ms_until_next(p, ahead))
            if last or run.intermediate:
                self._due.append(Due.of(run, p.voters(), None, last))
            if last:
                return

    def _ms_until_next(self, p: _Progress, ahead: dict[int, tuple[int, int]]) -> float:
        """Predicted ms until the next member of `p`'s plan order has run: the work ahead of it, then it
        (on its examples and those ahead that need it too)."""
        nxt = p.run.plan.members[p.given]
        if nxt in p.by_member:          # it already ran (another request put it first): nothing to wait for
            return 0.0
        before = sum(self.cost.member_ms(m, examples, depth) for m, (examples, depth) in ahead.items() if m != nxt)
        return before + self.cost.member_ms(nxt, ahead.get(nxt, (0, -1))[0] + p.run.examples)

    def _send(self) -> None:
        """Build the step's answers together (one `combine` per kind) and give them, in order."""
        due, self._due = self._due, []
        if due:
            with self.together():
                for d, answer in zip(due, self.answers.respond_many(due)):
                    d.run.give(answer)

    @staticmethod
    def _fits(run: RequestRun, predicted_ms: float) -> bool:
        return fits_with_margin(predicted_ms, run.started, run.budget_ms)
