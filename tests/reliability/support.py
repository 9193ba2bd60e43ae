"""Helpers for the reliability tests: raw gRPC calls, a mixed workload, /proc probes, the figures file.

Everything here talks to real servers started by tests/serving_fixtures.py,
over loopback only, and every loop is bounded in count and in time. The load
itself is run by tests/support/loadgen.py, which the serving benchmark shares.
"""
from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from npas_serve.engine import Engine
from npas_serve.protocol import inference_pb2, inference_pb2_grpc
from npas_serve.protocol.response import InferenceResponse
from npas_serve.servers.torchserve import launcher as ts
from npas_serve.servers.torchserve.processes import group_pids as live_group_pids
from tests.support.loadgen import CALL_TIMEOUT_S, Call

REPORT_ENV = "NPAS_RELIABILITY_REPORT"
DEFAULT_REPORT = Path(__file__).resolve().parents[2] / "reports" / "reliability.json"


# -- the figures file -----------------------------------------------------------------------

class Figures:
    """Counts and timings the tests record; written as JSON at the end of the session."""

    def __init__(self):
        self.data: dict = {}
        self._lock = threading.Lock()

    def put(self, section: str, key: str, value) -> None:
        with self._lock:
            self.data.setdefault(section, {})[key] = value

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"generated_unix": round(time.time()), "cpu_count": os.cpu_count(),
                "loadavg": [round(v, 2) for v in os.getloadavg()], **self.data}
        path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def report_path() -> Path:
    return Path(os.environ.get(REPORT_ENV) or DEFAULT_REPORT)


# -- raw calls ------------------------------------------------------------------------------

@dataclass
class Outcome:
    code: str                       # "OK" or a grpc.StatusCode name
    details: str = ""
    prediction: bytes = b""


def metadata(server) -> tuple:
    return (("authorization", f"Bearer {server.token}"),) if server.token else ()


def raw_predict(server, inputs: dict, model_name: str = "npas", model_version: str = "",
                meta: tuple | None = None, timeout: float = CALL_TIMEOUT_S) -> Outcome:
    """One Predictions call with a hand-built `input` map: what no well-behaved client would send."""
    request = inference_pb2.PredictionsRequest(model_name=model_name, model_version=model_version, input=inputs)
    with grpc.insecure_channel(server.target) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        try:
            reply = stub.Predictions(request, timeout=timeout, metadata=metadata(server) if meta is None else meta)
        except grpc.RpcError as exc:
            return Outcome(exc.code().name, exc.details() or "")
    return Outcome("OK", prediction=reply.prediction)


def matches(answer: InferenceResponse, expected: InferenceResponse) -> bool:
    """Same work and the same answer as a direct engine call (float tolerance for batch-size effects)."""
    return (answer.predictions == expected.predictions
            and answer.members_used == expected.members_used
            and answer.exit_reached == expected.exit_reached
            and answer.probabilities.shape == expected.probabilities.shape
            and bool(np.allclose(answer.probabilities, expected.probabilities, atol=1e-5)))


def expected_answer(engine: Engine, inputs: np.ndarray, fmt: str = "json", **knobs) -> InferenceResponse:
    from npas_serve.protocol.response import encode_request

    return engine.answer(engine.parse({"data": encode_request(inputs, fmt, **knobs)}))


# -- a mixed workload -------------------------------------------------------------------------

def make_jobs(prefix: str, count: int, pool: np.ndarray, num_members: int, num_exits: int,
              member_names: list[str], seed: int = 0) -> list[Call]:
    """A mixed workload: every ensemble size, explicit members, anytime exits, both payload formats."""
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(count):
        rows = rng.choice(len(pool), size=int(rng.integers(1, 17)), replace=False)
        kind = int(rng.integers(3))
        if kind == 0:
            knobs = {"ensemble_size": int(rng.integers(1, num_members + 1))}
        elif kind == 1:
            k = int(rng.integers(1, num_members + 1))
            knobs = {"members": [member_names[j] for j in rng.choice(num_members, size=k, replace=False)]}
        else:
            knobs = {"mode": "anytime", "exit": int(rng.integers(num_exits)),
                     "members": [member_names[int(rng.integers(num_members))]]}
        jobs.append(Call(pool[rows], ("json", "protobuf")[i % 2], knobs, f"{prefix}-{i:05d}"))
    return jobs


# -- processes and sockets (/proc) ------------------------------------------------------------

def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def group_pids(pid: int) -> list[int]:
    """Live processes in `pid`'s process group (TorchServe: launcher, java, Python workers)."""
    return live_group_pids(os.getpgid(pid))


def worker_pids(server) -> list[int]:
    return [p for p in group_pids(server.pid) if any(a.endswith("model_service_worker.py") for a in cmdline(p))]


def torchserve_run(server) -> tuple[Path, ts.Ports, Path]:
    """(run dir, ports, model store) of the TorchServe behind `server`, read from its own command line."""
    args = cmdline(server.pid)
    run_dir = Path(args[args.index("--ts-config") + 1]).parent
    config = ts.read_config(run_dir)
    return run_dir, config.ports, config.model_store


def wait_worker_ready(server, timeout_s: float = 180.0) -> float:
    """Seconds until the management API shows a READY worker again."""
    run_dir, ports, _ = torchserve_run(server)
    started = time.monotonic()
    ts.wait_ready(run_dir, "npas", ports, "127.0.0.1", timeout_s)
    return time.monotonic() - started


def listening_sockets(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of `pids` holds open."""
    inodes = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            for fd in fd_dir.iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in inodes:
                addr, port = local.split(":")
                found.append((_address(addr, v6), int(port, 16)))
    return found


def _address(hex_addr: str, v6: bool) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_addr)
    if not v6:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # /proc stores IPv6 as four host-order (little-endian) 32-bit words
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def http_status(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
