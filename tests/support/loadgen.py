"""A bounded gRPC load: the one runner of the reliability tests and the serving benchmark.

`clients` concurrent clients, each with its own channel (`npas_serve.client.AsyncClient` on one
asyncio loop, so the load generator takes little of the cores it shares with the server; v2: a
thread each), share one queue of calls. A run is bounded by the number of calls and, optionally,
by a deadline (counted, as the pacing, from when every client has connected); it can be paced
(call i leaves at t0 + i / rate) and can give every call a latency
budget with the matching absolute deadline, so time queued anywhere counts.
"""
from __future__ import annotations

import asyncio
import functools
import gc
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from npas_serve.client import AsyncClient
from npas_serve.protocol.response import InferenceResponse
from tests.support.v2client import V2Client

CALL_TIMEOUT_S = 60.0


@dataclass
class Call:
    inputs: np.ndarray
    fmt: str = "json"
    knobs: dict = field(default_factory=dict)
    request_id: str | None = None


@dataclass
class Result:
    call: Call
    started: float                  # time.monotonic()
    ended: float
    answer: InferenceResponse | None = None
    error: Exception | None = None  # a ClientError, or whatever else ended the call

    @property
    def latency_ms(self) -> float:
        return (self.ended - self.started) * 1000


@dataclass
class Run:
    results: list[Result]           # in completion order
    wall_s: float

    @property
    def answered(self) -> list[Result]:
        return [r for r in self.results if r.answer is not None]

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.error is not None]


def frozen_heap(fn: Callable) -> Callable:
    """Run `fn` with this process's existing objects out of the garbage collector's reach.

    The clients share this process with whatever its caller keeps (the serving benchmark, by its
    paced loads, holds about half a million objects of earlier results). A full collection over
    them stopped the clients' one event loop for 109-198 ms in the middle of a paced run, and every
    call then in flight counted as late: the load generator's pause, not the server's. Frozen, the
    collector walks only what the run itself allocates."""
    @functools.wraps(fn)
    def frozen(*args, **kwargs):
        gc.collect()
        gc.freeze()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.unfreeze()
    return frozen


@frozen_heap
def run_load(target: str, token: str | None, calls: Sequence[Call], clients: int, *, model_name: str = "npas",
             deadline_s: float | None = None, rate_per_s: float | None = None, budget_ms: float | None = None,
             during: Callable[[list[Result]], None] | None = None,
             call_timeout_s: float = CALL_TIMEOUT_S, protocol: str = "torchserve") -> Run:
    """Send every call (or as many as `deadline_s` allows) from `clients` concurrent clients, over
    TorchServe's gRPC API (`protocol="torchserve"`: `AsyncClient`s on one asyncio loop, so the load
    costs the shared cores little) or KServe v2's (`"v2"`, tritonclient, a thread per client; the
    embedded server only).

    `during(results)` runs in the calling thread while the clients work (e.g. to kill a
    worker); `results` is the live list the clients append to.
    """
    results: list[Result] = []
    todo = iter(enumerate(calls))
    stop_at = None if deadline_s is None else time.monotonic() + deadline_s
    t0 = time.monotonic()

    def next_call():
        """(index, call), or (None, None) when the calls or the time are used up."""
        if stop_at is not None and time.monotonic() >= stop_at:
            return None, None
        return next(todo, (None, None))

    def knobs(call: Call) -> dict:
        extra = {} if budget_ms is None else {
            "latency_budget_ms": round(budget_ms, 3), "deadline_unix_ms": round(time.time() * 1000 + budget_ms, 3)}
        if call.request_id is not None:
            extra["request_id"] = call.request_id
        return {**call.knobs, **extra}

    if protocol == "v2":
        lock = threading.Lock()

        def client_loop():
            with V2Client(target, model_name, timeout=call_timeout_s) as client:
                while True:
                    with lock:
                        i, call = next_call()
                    if call is None:
                        return
                    if rate_per_s is not None:
                        time.sleep(max(0.0, t0 + i / rate_per_s - time.monotonic()))
                    started = time.monotonic()
                    try:
                        answer = client.predict(call.inputs, fmt=call.fmt, **knobs(call))
                        result = Result(call, started, time.monotonic(), answer=answer)
                    except Exception as err:        # counted, not fatal: the caller judges the run
                        result = Result(call, started, time.monotonic(), error=err)
                    with lock:
                        results.append(result)

        threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    else:
        async def client_loop(client: AsyncClient):
            while True:
                i, call = next_call()               # one thread: no lock
                if call is None:
                    return
                if rate_per_s is not None:
                    await asyncio.sleep(max(0.0, t0 + i / rate_per_s - time.monotonic()))
                started = time.monotonic()
                try:
                    answer = await client.predict(call.inputs, fmt=call.fmt, **knobs(call))
                    results.append(Result(call, started, time.monotonic(), answer=answer))
                except Exception as err:            # counted, not fatal: the caller judges the run
                    results.append(Result(call, started, time.monotonic(), error=err))

        async def main():
            nonlocal t0, stop_at
            pool = [AsyncClient(target, model_name, token=token, timeout=call_timeout_s) for _ in range(clients)]
            try:
                # every connection open before the clock starts: a load of steady clients, not a burst
                # of 64 handshakes in the first paced calls
                await asyncio.gather(*(c.connect() for c in pool))
                t0 = time.monotonic()
                stop_at = None if deadline_s is None else t0 + deadline_s
                await asyncio.gather(*(client_loop(c) for c in pool))
            finally:
                await asyncio.gather(*(c.close() for c in pool))

        threads = [threading.Thread(target=asyncio.run, args=(main(),), daemon=True)]
    for t in threads:
        t.start()
    if during is not None:
        during(results)
    for t in threads:
        t.join(None if deadline_s is None else deadline_s + 2 * call_timeout_s)    # connecting, then the calls
    if any(t.is_alive() for t in threads):
        raise RuntimeError("load clients still running after the deadline")
    return Run(list(results), time.monotonic() - t0)


def percentiles_ms(results: Sequence[Result]) -> dict[str, float]:
    """p50/p95/p99/max client latency of the answered calls."""
    latencies = np.array([r.latency_ms for r in results if r.answer is not None])
    if not len(latencies):
        return {}
    return {f"p{q}_ms": round(float(np.percentile(latencies, q)), 2) for q in (50, 95, 99)} | {
        "max_ms": round(float(latencies.max()), 2)}
