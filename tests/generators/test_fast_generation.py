"""SuperWeights generation through the assembly plan (npas_serve/generators/assembly.py) against the
method's definition, piece by piece: ``W_w = cat(cat(W_{w-1}, in_slab_w, dim=1), out_slab_w, dim=0)``,
cropped to the layer's lead channels. Values and gradients must agree, whatever set of slots a call
asks for (one stage, one member, every member at once) and in any order."""
from __future__ import annotations

import math

import pytest
import torch

from npas_serve.family import Family, FamilySpec, build_family
from npas_serve.generators.assembly import AssemblyPlan


def reference_weight(gen, slot: int) -> torch.Tensor:
    """The definition, one cat per slab (what generation computed before the assembly plan)."""
    weight = None
    for b, row in gen.pieces(slot):
        bank = gen._banks[b]
        flat = gen.coefficients[b][row] @ gen.templates(b)
        if weight is None:
            weight = flat.view(bank.in_shape)
            continue
        cut = math.prod(bank.in_shape)
        weight = torch.cat([weight, flat[:cut].view(bank.in_shape)], dim=1)
        weight = torch.cat([weight, flat[cut:].view(bank.out_shape)], dim=0)
    out, inp = gen.slots[slot].shape[:2]
    return weight[:out, :inp]


FAMILIES = {
    "default (one template or more per width)": FamilySpec(family="mnist1d-resnet"),
    "tiny (pooled group banks)": FamilySpec(family="mnist1d-resnet-tiny"),
    "bench (pooled, tiled windows)": FamilySpec(family="mnist1d-resnet-bench", budget=0.02),
    "2-D convolutions and a linear layer": FamilySpec(family="digits-cnn"),
}


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request) -> Family:
    return build_family(FAMILIES[request.param])


def stage_calls(family: Family) -> list[list[int]]:
    return [ids for member in family._slot_ids for ids in member]


def test_every_call_equals_the_definition(family):
    gen = family.generator
    every = [s for ids in stage_calls(family) for s in ids]
    calls = stage_calls(family) + [every, every[::-1], every[1::3]]
    with torch.no_grad():
        for ids in calls:
            for slot, w in zip(ids, gen.generate(ids)):
                assert w.shape == gen.slots[slot].shape
                torch.testing.assert_close(w, reference_weight(gen, slot), rtol=1e-5, atol=1e-6)


def test_gradients_reach_bank_and_coefficients_as_defined(family):
    gen = family.generator
    every = [s for ids in stage_calls(family) for s in ids]
    probes = [torch.randn(gen.slots[s].shape, generator=torch.Generator().manual_seed(s)) for s in every]

    def grads(weights):
        gen.zero_grad(set_to_none=True)
        sum((w * p).sum() for w, p in zip(weights, probes)).backward()
        return [p.grad.clone() for p in gen.parameters() if p.grad is not None]

    fast = grads(gen.generate(every))
    ref = grads([reference_weight(gen, s) for s in every])
    assert len(fast) == len(ref) == len(list(gen.parameters()))
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    gen.zero_grad(set_to_none=True)


def test_shared_coefficient_classes_generate_the_same_piece():
    spec = FamilySpec(family="mnist1d-resnet-tiny")
    plain = build_family(spec)
    ids = list(range(len(plain.slots)))
    ids[1] = ids[0] = 0        # slots 0 and 1 (one shape class in the shape grouping) share rows
    family = build_family(FamilySpec(family="mnist1d-resnet-tiny",
                                     generator_kwargs={"coefficient_ids": ids}))
    gen = family.generator
    with torch.no_grad():
        for calls in stage_calls(family):
            for slot, w in zip(calls, gen.generate(calls)):
                torch.testing.assert_close(w, reference_weight(gen, slot), rtol=1e-5, atol=1e-6)


def test_plans_hold_no_index_of_weight_size(family):
    gen = family.generator
    every = [s for ids in stage_calls(family) for s in ids]
    gen.generate(every)
    plan = gen._plans[tuple(every), torch.device("cpu")]
    assert isinstance(plan, AssemblyPlan)
    held = sum(w.rows.numel() for g in plan.groups for w in g.widths if isinstance(w.rows, torch.Tensor))
    assert held <= len(every) * len(gen._banks)      # at most one row number per (slot, bank)


def test_one_call_for_every_member_costs_fewer_operations_than_one_per_stage():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    family = build_family(FamilySpec(family="mnist1d-resnet"))
    gen, calls = family.generator, stage_calls(family)
    with torch.inference_mode():
        with Count():
            for ids in calls:
                gen.generate(ids)
        per_stage, Count.n = Count.n, 0
        with Count():
            gen.generate([s for ids in calls for s in ids])
        at_once = Count.n
    plan = gen._plans[tuple(s for ids in calls for s in ids), torch.device("cpu")]
    buffers = sum(len(g.shapes) for g in plan.groups)
    blocks = sum(len(w.blocks) for g in plan.groups for w in g.widths)
    # each bank read once for every member: a product per bank (rows picked, templates viewed), a buffer
    # made and split per layer shape, two views and a copy per region; nothing per layer
    assert at_once <= 3 * len(gen._banks) + 2 * buffers + 3 * blocks and at_once < per_stage


def test_every_weight_is_contiguous(family):
    """A convolution given a strided weight copies it at every call: generated weights must not be."""
    gen = family.generator
    every = [s for ids in stage_calls(family) for s in ids]
    with torch.no_grad():
        for ids in stage_calls(family) + [every, every[::-1]]:
            assert all(w.is_contiguous() for w in gen.generate(ids))


def test_prepared_weights_run_each_step_as_generated_alone_until_released():
    from npas_serve.engine.cache import WeightCache
    from npas_serve.engine.planner import Step
    from npas_serve.engine.stages import StageRunner

    family = build_family(FamilySpec(family="mnist1d-resnet-tiny")).eval()
    runner = StageRunner(family, torch.device("cpu"), WeightCache(0), None)
    steps = [Step(m, s) for m in range(len(family.members)) for s in range(family.num_exits)]
    x = torch.randn(3, 1, 40, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        alone = {}
        for m in range(len(family.members)):
            h = x
            for s in range(family.num_exits):
                result = runner.run(Step(m, s), h)
                alone[Step(m, s)], h = result, result.hidden
        runner.prepare(steps)
        assert set(runner._prepared) == set(steps)
        for use in range(2):        # prepared weights serve every run until release; generated once
            for m in range(len(family.members)):
                h = x
                for s in range(family.num_exits):
                    result = runner.run(Step(m, s), h)
                    torch.testing.assert_close(result.probs, alone[Step(m, s)].probs, rtol=1e-5, atol=1e-6)
                    # the step's share of the one generation call the first time, nothing after
                    assert (result.generation_s > 0) == (use == 0) and result.ms >= result.generation_s * 1000
                    h = result.hidden
        assert set(runner._prepared) == set(steps)
        runner.release()
        assert runner._prepared == {}
