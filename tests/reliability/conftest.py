"""Reliability fixtures: the real servers of tests/serving_fixtures.py, a reference engine, the figures file."""
from __future__ import annotations

import numpy as np
import pytest

from npas_serve.data import load_dataset
from npas_serve.engine import Engine, EngineConfig
from tests.reliability.support import Figures, report_path


@pytest.fixture(scope="session")
def figures():
    """What the run measured; written to reports/reliability.json (or $NPAS_RELIABILITY_REPORT) at the end."""
    recorded = Figures()
    yield recorded
    if recorded.data:
        recorded.write(report_path())


@pytest.fixture(scope="session")
def pool() -> np.ndarray:
    """MNIST-1D test examples, shaped (N, 1, 40) as the servers expect."""
    return load_dataset("mnist1d").x_test[:256, None].astype(np.float32)


@pytest.fixture(scope="module")
def reference(served_checkpoint) -> Engine:
    """The same checkpoint in-process: what every server answer is checked against."""
    return Engine.load(served_checkpoint, EngineConfig(warmup_batch_sizes=(1, 8)))
