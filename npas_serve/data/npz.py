"""User data: an .npz holding `x` and `y` (and optionally `x_test`, `y_test`)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from npas_serve.data.base import Dataset, checked
from npas_serve.errors import UserError
from npas_serve.registry import register_dataset


@register_dataset("npz")
def npz(path: str, seed: int = 0, num_classes: int | None = None, test_fraction: float = 0.2) -> Dataset:
    """Without `x_test`/`y_test`, a seeded shuffle holds out `test_fraction` for testing."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file {path} does not exist")
    try:
        # allow_pickle=False: an .npz must never run code while it loads
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"data file {path} is not a readable .npz ({err})") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise UserError(f"data file {path} lacks array(s) {missing}; it holds {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"]
    if "x_test" in arrays and "y_test" in arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"]
    else:
        if len(x) != len(y) or len(x) < 2:
            raise UserError(f"data file {path}: 'x' and 'y' need the same length >= 2, got {len(x)} and {len(y)}")
        order = np.random.default_rng(seed).permutation(len(x))
        cut = max(1, int(round(len(x) * test_fraction)))
        x_test, y_test, x, y = x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
    return checked(p.name, x, y, x_test, y_test, num_classes)
