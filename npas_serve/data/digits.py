"""scikit-learn's bundled 8x8 digits (no download), split 80/20 by a seeded, stratified shuffle."""
from __future__ import annotations

import numpy as np

from npas_serve.data.base import Dataset, checked
from npas_serve.registry import register_dataset


@register_dataset("digits")
def digits(seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.float32)            # (1797, 8, 8), values 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(x, bunch.target, test_size=0.2, random_state=seed,
                                              stratify=bunch.target)
    return checked("digits", x_tr, y_tr, x_te, y_te, num_classes=10)
