"""Weight generators; importing this package registers every one of them."""
from npas_serve.generators.base import Slot, WeightGenerator
from npas_serve.generators import superweights  # noqa: F401  (registers "superweights")

__all__ = ["Slot", "WeightGenerator"]
