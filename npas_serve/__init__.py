"""npas-serve: one SuperWeight bank, many architectures, served under a latency budget.

Importing the package registers every built-in generator, family, dataset and
plain grouping, so `registry.create(...)` finds them; the groupings searched by
training (`gradient`, `kmeans`) register with `import npas_serve.train`, which
sits above the family and is not loaded by serving.
"""
from npas_serve import data, families, generators, grouping  # noqa: F401  (registration)
from npas_serve.family import Family, FamilySpec, Member, build_family, share
from npas_serve.layers import SharedConv1d, SharedConv2d, SharedLinear

__all__ = ["Family", "FamilySpec", "Member", "SharedConv1d", "SharedConv2d", "SharedLinear",
           "build_family", "share"]
__version__ = "0.1.0"
