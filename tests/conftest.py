"""Shared fixtures for the core-library tests.

Everything expensive happens once per session: the mnist1d cache lives in a
session temporary directory (never in $HOME), and the tiny family is trained
once (`trained_tiny`) for the checkpoint, evaluation and reload tests.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from npas_serve.family import FamilySpec
from npas_serve.train import TrainConfig, run_training

TINY = "mnist1d-resnet-tiny"

# The test models are tiny: a second intra-op thread buys nothing, and when the
# two cores are shared with other work, OpenMP threads waiting on each other make
# every small op ~80x slower. One thread here and in the CLI subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def npas_cache(tmp_path_factory) -> Path:
    """NPAS_CACHE for this process and the CLI subprocesses it starts."""
    cache = tmp_path_factory.mktemp("npas-cache")
    previous = os.environ.get("NPAS_CACHE")
    os.environ["NPAS_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("NPAS_CACHE", None)
    else:
        os.environ["NPAS_CACHE"] = previous


def separable(n: int = 200, length: int = 40, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic 1-D signals whose class shifts the mean: a network learns them in one epoch."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, length)).astype(np.float32) + 2.0 * y[:, None]
    return x, y


@pytest.fixture
def good_npz(tmp_path) -> Path:
    """200 examples of shape (40,), 3 classes, as a user would hand them in."""
    path = tmp_path / "good.npz"
    x, y = separable()
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory) -> Path:
    """The same synthetic data, shared by the (fast) training tests."""
    path = tmp_path_factory.mktemp("data") / "small.npz"
    x, y = separable()
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory):
    """(checkpoint dir, family, manifest) of the tiny family trained 3 epochs on MNIST-1D."""
    out = tmp_path_factory.mktemp("trained") / "tiny"
    family, manifest = run_training(FamilySpec(family=TINY), TrainConfig(epochs=3), out, progress=False)
    return out, family, manifest


@pytest.fixture(scope="session")
def trained_tiny(trained_tiny_run) -> Path:
    """The trained tiny family's checkpoint directory (treat as read-only: copy before changing)."""
    return trained_tiny_run[0]


@pytest.fixture
def tiny_copy(trained_tiny, tmp_path) -> Path:
    """A private copy of the trained checkpoint that a test may modify."""
    return Path(shutil.copytree(trained_tiny, tmp_path / "ckpt"))


# Real servers (session-wide: one embedded server and one TorchServe for the whole run)
from tests.serving_fixtures import *  # noqa: E402,F401,F403
