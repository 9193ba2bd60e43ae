"""Real servers for the tests: the embedded server and TorchServe, on free loopback ports.

Both are started once per session, as separate processes exactly as a user
starts them, and stopped by PID at the end; `server` is parametrized so a
test runs against both. Tests that must break a server (SIGTERM, a killed
worker) start their own or leave it serving again.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from npas_serve.checkpoint import load_checkpoint
from npas_serve.data import load_dataset
from npas_serve.evaluate import evaluate, write_report

CLI = [sys.executable, "-m", "npas_serve.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served_checkpoint(trained_tiny, tmp_path_factory) -> Path:
    """The trained tiny family, evaluated, so the planner has accuracies."""
    path = Path(shutil.copytree(trained_tiny, tmp_path_factory.mktemp("served") / "ckpt"))
    family, manifest = load_checkpoint(path)
    dataset = load_dataset(manifest.data).with_channels(1)
    write_report(evaluate(family, manifest, dataset), manifest, path)
    return path


@dataclass
class Server:
    kind: str
    target: str
    metrics_url: str
    token: str | None
    pid: int
    run_dir: Path | None = None        # TorchServe only: config, logs, key_file.json
    ports: object | None = None        # TorchServe only: npas_serve.servers.torchserve.Ports
    num_members: int = 3
    num_exits: int = 3


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listened on port {port} within {timeout}s")


@contextmanager
def running_embedded(checkpoint: Path) -> Iterator[Server]:
    """`npas-serve serve CHECKPOINT` on free ports; SIGTERM (a graceful drain) at the end."""
    grpc_port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([*CLI, "serve", str(checkpoint), "--grpc-port", str(grpc_port),
                             "--metrics-port", str(metrics_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_port(grpc_port, proc)
        yield Server("embedded", f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics",
                     None, proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


@contextmanager
def running_torchserve(checkpoint: Path, root: Path) -> Iterator[Server]:
    """A fresh .mar of CHECKPOINT under real TorchServe (token auth on); no process may outlive it."""
    from npas_serve.archive import build_archive
    from npas_serve.servers import torchserve as ts

    if shutil.which("java") is None:
        pytest.skip("java is not installed; scripts/setup.sh installs it")
    build_archive(checkpoint, "npas", root / "model_store")
    ports = ts.Ports(*(free_port() for _ in range(5)))
    run_dir = root / "run"
    pid = ts.start(root / "model_store", "npas", run_dir, ports=ports, timeout_s=240)
    try:
        yield Server("torchserve", f"127.0.0.1:{ports.grpc}", f"http://127.0.0.1:{ports.metrics}/metrics",
                     ts.inference_token(run_dir), pid, run_dir, ports)
    finally:
        pgid = os.getpgid(pid) if ts.running_pid(run_dir) else None
        ts.stop(run_dir)
        if pgid is not None:
            leftover = [p for p in ts._pids() if ts._pgid_of(p) == pgid and not ts._zombie(p)]
            assert not leftover, f"TorchServe left processes behind: {leftover}"


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
