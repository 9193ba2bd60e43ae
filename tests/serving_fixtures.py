"""Real servers for the tests: the embedded server and TorchServe, on free loopback ports.

Both are started once per session, as separate processes exactly as a user
starts them, and stopped by PID at the end; `server` is parametrized so a
test runs against both. Tests that must break a server (SIGTERM, a killed
worker) start their own or leave it serving again.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import pytest

from npas_serve.checkpoint import load_checkpoint
from npas_serve.data import load_dataset
from npas_serve.evaluate import evaluate, write_report
from tests.support import servers as launch


@pytest.fixture(scope="session")
def served_checkpoint(trained_tiny, tmp_path_factory) -> Path:
    """The trained tiny family, evaluated, so the planner has accuracies."""
    path = Path(shutil.copytree(trained_tiny, tmp_path_factory.mktemp("served") / "ckpt"))
    family, manifest = load_checkpoint(path)
    dataset = load_dataset(manifest.data).with_channels(1)
    write_report(evaluate(family, manifest, dataset), manifest, path)
    return path


@dataclass
class Server(launch.Launched):
    """A launched server, plus what the tests know of the tiny family it serves."""

    num_members: int = 3
    num_exits: int = 3


def _as_server(launched: launch.Launched) -> Server:
    return Server(**{f.name: getattr(launched, f.name) for f in fields(launched)})


@contextmanager
def running_embedded(checkpoint: Path) -> Iterator[Server]:
    with launch.running_embedded(checkpoint) as launched:
        yield _as_server(launched)


@contextmanager
def running_torchserve(checkpoint: Path, root: Path) -> Iterator[Server]:
    if shutil.which("java") is None:
        pytest.skip("java is not installed; scripts/setup.sh installs it")
    with launch.running_torchserve(checkpoint, root) as launched:
        yield _as_server(launched)


@pytest.fixture(scope="session")
def embedded(served_checkpoint):
    with running_embedded(served_checkpoint) as server:
        yield server


@pytest.fixture(scope="session")
def torchserve(served_checkpoint, tmp_path_factory):
    with running_torchserve(served_checkpoint, tmp_path_factory.mktemp("torchserve")) as server:
        yield server


@pytest.fixture(params=["embedded", "torchserve"])
def server(request) -> Server:
    return request.getfixturevalue(request.param)
