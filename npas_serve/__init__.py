"""npas-serve: one SuperWeight bank, many architectures, served under a latency budget.

Importing the package registers every built-in generator, grouping, family and
dataset, so `registry.create(...)` always finds them.
"""
from npas_serve import data, families, generators, grouping  # noqa: F401  (registration)
from npas_serve.family import Family, FamilySpec, Member, build_family, share
from npas_serve.layers import SharedConv1d, SharedConv2d, SharedLinear

__all__ = ["Family", "FamilySpec", "Member", "SharedConv1d", "SharedConv2d", "SharedLinear",
           "build_family", "share"]
__version__ = "0.1.0"
