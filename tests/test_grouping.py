from collections import Counter

from npas_serve import registry
from npas_serve.family import FamilySpec, build_family


def slots_of(family_name):
    return build_family(FamilySpec(family=family_name, family_kwargs={"num_classes": 10, "in_channels": 1})).slots


def kernel_of(groups, slots):
    by_group = {}
    for g, s in zip(groups, slots):
        by_group.setdefault(g, set()).add(s.kernel)
    return by_group


def test_shape_grouping_bins_by_kernel_and_depth_across_members():
    slots = slots_of("mnist1d-resnet")
    groups = registry.create("grouping", "shape", slots)
    assert all(len(k) == 1 for k in kernel_of(groups, slots).values())      # never mixes kernels
    assert set(groups) == set(range(len(set(groups))))                       # numbered 0..G-1
    # the same layer of different members (same kernel, same depth bin) shares a group
    stem = [g for g, s in zip(groups, slots) if s.name == "stages.0.0"]
    assert len(stem) == len({s.member for s in slots}) and len(set(stem)) == 1
    # deeper stages do not share with the stem
    last = {g for g, s in zip(groups, slots) if s.stage == 2 and s.kernel == (3,)}
    assert stem[0] not in last


def test_random_grouping_keeps_the_group_count_per_kernel_and_is_seeded():
    slots = slots_of("mnist1d-resnet")
    shape = registry.create("grouping", "shape", slots)
    a = registry.create("grouping", "random", slots, seed=0)
    assert all(len(k) == 1 for k in kernel_of(a, slots).values())
    per_kernel = lambda groups: Counter(next(iter(k)) for k in kernel_of(groups, slots).values())
    assert per_kernel(a) == per_kernel(shape)
    assert a == registry.create("grouping", "random", slots, seed=0)
    assert a != registry.create("grouping", "random", slots, seed=1)
    assert a != shape
