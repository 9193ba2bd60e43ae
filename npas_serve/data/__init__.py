"""Datasets; importing this package registers mnist1d, digits, npz and synthetic-cifar."""
from npas_serve.data.base import Dataset, Normalisation, ValidationSplit
from npas_serve.data import digits, mnist1d, npz, synthetic  # noqa: F401
from npas_serve import registry


def is_path(spec: str) -> bool:
    """A data spec naming a file rather than a registered dataset."""
    return spec.endswith(".npz") or "/" in spec


def load_dataset(spec: str, seed: int | None = None, num_classes: int | None = None) -> Dataset:
    """`spec` is a registered name (mnist1d, digits) or a path to an .npz file."""
    if is_path(spec):
        return registry.create("dataset", "npz", spec, seed=seed, num_classes=num_classes)
    return registry.create("dataset", spec, seed=seed)


__all__ = ["Dataset", "Normalisation", "ValidationSplit", "is_path", "load_dataset"]
