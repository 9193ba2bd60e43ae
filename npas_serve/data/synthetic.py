"""Synthetic CIFAR-shaped images (3x32x32), generated offline: the CIFAR-scale family's default data.

No download is possible here, so the wide-ResNet family trains on images whose class is a
fixed smooth colour pattern under strong noise: learnable, the shape of CIFAR-10, and good
for tests and cost figures only. Accuracy on it says nothing about CIFAR.
"""
from __future__ import annotations

import numpy as np

from npas_serve.data.base import Dataset, checked
from npas_serve.registry import register_dataset


def synthetic_images(n: int, seed: int, num_classes: int = 10, shape: tuple[int, int, int] = (3, 32, 32),
                     noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(x of (n, *shape) float32, y of (n,)): class patterns fixed by `shape` and `num_classes` alone,
    the examples (labels and noise) by `seed`."""
    c, h, w = shape
    patterns = np.random.default_rng(1234).standard_normal((num_classes, c, 4, 4))
    patterns = np.kron(patterns, np.ones((1, 1, -(-h // 4), -(-w // 4))))[:, :, :h, :w]   # smooth: 4x4 blocks
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    x = patterns[y] + noise * rng.standard_normal((n, c, h, w))
    return x.astype(np.float32), y


@register_dataset("synthetic-cifar")
def synthetic_cifar(seed: int = 0, n_train: int = 1000, n_test: int = 200) -> Dataset:
    x, y = synthetic_images(n_train + n_test, seed)
    return checked("synthetic-cifar", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes=10)
