"""MNIST-1D, generated offline (never downloaded) and cached on disk by seed."""
from __future__ import annotations

import numpy as np

from npas_serve.data.base import Dataset, cache_dir, checked, save_npz_atomic
from npas_serve.registry import register_dataset


@register_dataset("mnist1d")
def mnist1d(seed: int = 42) -> Dataset:
    """The standard 4000/1000 split; `seed` 42 is the package's own default."""
    path = cache_dir() / f"mnist1d-seed{seed}.npz"
    if not path.exists():
        # mnist1d's get_dataset() downloads by default; make_dataset() generates locally.
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.seed = seed
        data = make_dataset(args)
        save_npz_atomic(path, x=data["x"], y=data["y"], x_test=data["x_test"], y_test=data["y_test"])
    with np.load(path) as d:
        return checked("mnist1d", d["x"], d["y"], d["x_test"], d["y_test"], num_classes=10)
