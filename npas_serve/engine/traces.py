"""The device's work as TorchScript traces: each stage, and the generation of each stage's weights,
runs as one graph call, without Python between its operators.

Why: at the batch sizes serving sees, a stage is tens of small operators. Run eagerly,
each one returns to Python and takes the GIL back, so the Python around the operators
costs about as much as the arithmetic, and whenever another thread of the server holds
the GIL (the gRPC loop parsing a request), the device thread waits at every operator.
A trace runs the same operators, with the same results, in one call. Each member is also traced
whole (every stage, then its last exit), for a batch that takes it whole.

Traces are made at load and checked before use: a stage traced at one batch size must
give the eager stage's results at another (a family whose Python bakes a batch size or
a value into its trace fails the check), and a stage that cannot be traced or fails the
check runs eagerly, with a warning. Generation is traced at load too: a generation trace
takes no input, it replays the generator's operators on the shared parameters, which do
not change while serving, and is checked once against the eager generation. There is one
for each step, one for each member whole and one for every member at once: a set of steps
generated together reads each bank once and fills one buffer per layer shape, and the sets the
engine asks for are mostly those (a request's members, or all of them). Any other set is
covered by the largest of these it contains, then step by step; tracing each new set on
first use instead took up to 110 ms of a request's time.

`torch.jit.trace` rather than `torch.compile`: a trace is made in milliseconds at load,
needs no compiler on the serving machine, is not specialised to a batch size (the check
proves it), and where it is missing or fails, the eager path serves. torch 2.13 marks it
deprecated; the warning is silenced here, and a torch without it runs everything eagerly.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from npas_serve.engine.planner import Step
from npas_serve.family import Family, Member

log = logging.getLogger(__name__)

TRACE_BATCH, CHECK_BATCH = 2, 3

StageFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]     # (h, *weights) -> (hidden, probs)
# (h, *every stage's weights in order) -> (the last stage's hidden, the last exit's probs)
MemberFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class Traces:
    def __init__(self, family: Family, device: torch.device, frozen: list[Member] | None,
                 input_shape: Sequence[int]):
        self.family, self.frozen = family, frozen
        self._stages: dict[Step, StageFn] = {}
        self._members: dict[int, MemberFn] = {}     # each member whole, where every stage traced
        # generation traces, largest set of steps first: every member at once, each member whole, each step
        self._generation: list[tuple[frozenset[Step], list[Step], Callable[[], tuple]]] = []
        self._counts: dict[Step, int] = {}          # weights per step
        self.eager_stages: list[Step] = []          # those that run eagerly (could not be traced)
        members = [[Step(m, s) for s in range(family.num_exits)] for m in range(len(family.names))]
        with torch.no_grad():
            for member in range(len(family.names)):
                self._trace_member(member, torch.randn(CHECK_BATCH, *input_shape, device=device))
            if frozen is None:                      # frozen members generate nothing
                self._counts = {step: len(family.stage_weights(step.member, step.stage)) for one in members
                                for step in one}
                sets = {frozenset(steps): steps                        # one trace per distinct set
                        for steps in [sum(members, []), *members, *([s] for one in members for s in one)]}
                self._generation = [(covered, steps, self._trace_generation(steps))
                                    for covered, steps in sorted(sets.items(), key=lambda item: -len(item[0]))]

    # --- stages -----------------------------------------------------------------------------
    def stage(self, step: Step) -> StageFn | None:
        """The traced stage, or None when it runs eagerly."""
        return self._stages.get(step)

    def member(self, member: int) -> MemberFn | None:
        """The whole member as one trace, or None: the stages' operators in one call, with neither
        Python nor a hand-back of the GIL between stages, for a batch that takes the member whole."""
        return self._members.get(member)

    def _trace_member(self, member: int, x: torch.Tensor) -> None:
        """Trace each stage of `member` on its real inputs (`x` through the stages before it), then
        the member whole when every stage traced."""
        first, stages, weights_by_stage, want = x, [], [], None
        for stage in range(self.family.num_exits):
            step = Step(member, stage)
            eager = eager_stage(self.family, self.frozen, step)
            weights = () if self.frozen is not None else tuple(self.family.stage_weights(member, stage))
            want = eager(x, *weights)
            stages.append(eager)
            weights_by_stage.append(weights)
            try:
                self._stages[step] = _checked_trace(eager, x, weights, want)
            except Exception as err:        # anything a trace cannot hold: that stage stays eager
                log.warning("stage %s of member %s runs eagerly: %s", stage, self.family.names[member], _why(err))
                self.eager_stages.append(step)
            x = want[0]                     # the next stage's input
        if not any(step.member == member for step in self.eager_stages):
            self._trace_whole(member, first, stages, weights_by_stage, want)

    def _trace_whole(self, member: int, x: torch.Tensor, stages: list[StageFn],
                     weights_by_stage: list[tuple[torch.Tensor, ...]], want: tuple[torch.Tensor, torch.Tensor]) -> None:
        """One trace of every stage of `member` in turn, checked against the stages one by one (`want`,
        at CHECK_BATCH). The earlier exits' heads are left out of it: nothing reads them."""
        counts = [len(w) for w in weights_by_stage]
        flat = tuple(w for ws in weights_by_stage for w in ws)

        def whole(h: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            start = 0
            for stage, count in zip(stages, counts):
                h, probs = stage(h, *weights[start:start + count])
                start += count
            return h, probs
        try:
            traced = _checked_trace(whole, x, flat, want)
            traced(x, *flat)        # optimised at load, as the generation traces below
            self._members[member] = traced
        except Exception as err:    # its stages still run one by one
            log.warning("member %s runs stage by stage: %s", self.family.names[member], _why(err))

    # --- generation -------------------------------------------------------------------------
    def weights(self, steps: Sequence[Step]) -> list[list[torch.Tensor]]:
        """`Family.steps_weights` of `steps`: every member at once, or whole members, each through one
        trace, the rest step by step. A trace generates a set of steps from one product per bank and
        one buffer per layer shape; step by step, each step's trace builds its own (for the default family's
        whole ensemble, 0.37 ms against 0.46 ms, bit for bit the same weights)."""
        wanted, made = set(steps), {}
        for covered, order, generate in self._generation:
            if covered <= wanted and not covered & made.keys():
                flat, start = generate(), 0
                for step in order:
                    count = self._counts[step]
                    made[step] = list(flat[start:start + count])
                    start += count
        return [made[step] for step in steps]

    def _trace_generation(self, steps: list[Step]) -> Callable[[], tuple]:
        """One trace of the weights of `steps`, flat, in their order (checked once against `generate`)."""
        def generate() -> tuple:
            return tuple(w for ws in self.family.steps_weights([(s.member, s.stage) for s in steps]) for w in ws)
        try:
            with _quiet():
                traced = torch.jit.trace(generate, (), strict=False, check_trace=False)
            if _same(traced(), generate()):
                traced()     # TorchScript optimises a graph on its second call: 4-9 ms for a member's
                return traced     # weights, spent here at load, not on the first request that needs them
            raise ValueError("its trace differs from it")
        except Exception as err:
            log.warning("the weights of %s are generated eagerly: %s",
                        ", ".join(f"stage {s.stage} of {self.family.names[s.member]}" for s in steps), _why(err))
            return generate


def eager_stage(family: Family, frozen: list[Member] | None, step: Step) -> StageFn:
    """A step as plain Python: its weights bound (none for a frozen member), the stage, the softmax
    of its exit head."""
    member = frozen[step.member] if frozen is not None else family.members[step.member]
    head = member.heads[step.stage]

    def run(h: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if frozen is not None:
            h = member.stages[step.stage](h)
        else:
            h = family.run_stage(step.member, step.stage, h, weights)
        return h, head(h).softmax(dim=-1)
    return run


def _checked_trace(fn: Callable, x: torch.Tensor, weights: Sequence[torch.Tensor], want) -> Callable:
    """`fn` traced at batch TRACE_BATCH of `x`, checked against `want` (`fn` eagerly on all of `x`, at
    CHECK_BATCH): a trace that baked in its batch size or a value raises ValueError."""
    with _quiet():
        traced = torch.jit.trace(fn, (x[:TRACE_BATCH], *weights), check_trace=False)
    if not _same(traced(x, *weights), want):
        raise ValueError(f"its trace at batch {TRACE_BATCH} differs from it at batch {CHECK_BATCH}")
    return traced


def _why(err: Exception) -> str:
    """The first line of an error, for the warning that a piece runs eagerly."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


@contextmanager
def _quiet() -> Iterator[None]:
    """Tracing without its warnings: constants the trace records (checked instead) and the deprecation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated", category=DeprecationWarning)
        yield


def _same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.allclose(x, y, rtol=1e-4, atol=1e-6)
                                    for x, y in zip(a, b))
