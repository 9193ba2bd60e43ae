"""Weight generators; importing this package registers every one of them."""
from npas_serve.generators.base import Slot, WeightGenerator
from npas_serve.generators import arbnet, ssn, superweights  # noqa: F401  (registers each method)

__all__ = ["Slot", "WeightGenerator"]
