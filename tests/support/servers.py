"""Start the real servers as child processes on free loopback ports, and stop them by PID.

Used by the tests (tests/serving_fixtures.py) and the benchmarks (benchmarks/serving.py),
which must talk to the servers exactly as a user does: `npas-serve serve` in its own
process, and TorchServe from a freshly built .mar with token auth on. It calls only
the public API of `npas_serve.servers.torchserve`.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from npas_serve.servers.torchserve import launcher as ts
from npas_serve.servers.torchserve.archive import build_archive
from npas_serve.servers.torchserve.keys import run_dir_key
from npas_serve.servers.torchserve.processes import group_pids

CLI = [sys.executable, "-m", "npas_serve.cli"]


@dataclass
class Launched:
    kind: str                        # embedded | torchserve
    target: str                      # host:port of the gRPC inference API
    metrics_url: str
    token: str | None                # TorchServe's inference key (None: no auth)
    pid: int
    run_dir: Path | None = None      # TorchServe only: config, logs, key_file.json
    ports: ts.Ports | None = None    # TorchServe only
    http_target: str | None = None   # embedded only: host:port of the v2 REST endpoints


def server_pids(pid: int) -> list[int]:
    """A server's process, then its descendants (`npas-serve serve` runs its engine in a child)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:       # the process ended while we looked: not listed
            continue
        pids.append(p)
        for task in tasks:
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except FileNotFoundError:   # a thread that ended between the listing and the read
                continue
    return pids


def process_cpu_s(pid: int) -> float:
    """User and system CPU seconds of a server so far, its children included (`server_pids`)."""
    total = 0
    for p in server_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:       # ended since it was listed: its time went with it
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def metric_sum(url: str, name: str) -> float:
    """The sum of metric `name` over its series on a server's /metrics (0 when it has none yet)."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{") or
               line.startswith(name + " "))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Until something listens on `port`; fails early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listened on port {port} within {timeout:.0f}s")


@contextmanager
def running_embedded(checkpoint: Path, env: dict[str, str] | None = None,
                     args: Sequence[str] = ()) -> Iterator[Launched]:
    """`npas-serve serve CHECKPOINT [ARGS]`; SIGTERM (a graceful drain) at the end, SIGKILL after 60 s.

    `env` is added to this process's environment for the server (as for TorchServe).
    """
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    proc = subprocess.Popen([*CLI, "serve", str(checkpoint), "--grpc-port", str(grpc_port),
                             "--metrics-port", str(metrics_port), "--http-port", str(http_port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    try:
        wait_port(grpc_port, proc)
        wait_port(http_port, proc)
        yield Launched("embedded", f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics",
                       None, proc.pid, http_target=f"127.0.0.1:{http_port}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def running_torchserve(checkpoint: Path, root: Path | None = None,
                       env: dict[str, str] | None = None) -> Iterator[Launched]:
    """A fresh .mar of CHECKPOINT under TorchServe (token auth on); no process may outlive it."""
    with tempfile.TemporaryDirectory(prefix="npas-ts-") as tmp:
        root = Path(root or tmp)
        build_archive(checkpoint, "npas", root / "model_store")
        ports = ts.Ports(*(free_port() for _ in range(5)))
        run_dir = root / "run"
        pid = ts.start(root / "model_store", "npas", run_dir, ports=ports, timeout_s=240, env=env)
        try:
            yield Launched("torchserve", f"127.0.0.1:{ports.grpc}", f"http://127.0.0.1:{ports.metrics}/metrics",
                           run_dir_key(run_dir, "inference"), pid, run_dir, ports)
        finally:
            pgid = os.getpgid(pid) if ts.running_pid(run_dir) else None
            ts.stop(run_dir)
            leftover = [] if pgid is None else group_pids(pgid)
            if leftover:
                raise RuntimeError(f"TorchServe left processes behind: {leftover}")
