"""The engine in a child process answers as the engine does in-process, and nothing waits on it forever."""
from __future__ import annotations

import asyncio
import os
import queue
import signal
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

from npas_serve.engine import Cancelled, DeadlineExceeded, Engine, EngineConfig
from npas_serve.errors import UserError
from npas_serve.protocol import InferenceRequest, RequestError
from npas_serve.servers.engine_process import EngineProcess, EngineProcessError
from tests.support.wait import wait_until

CONFIG = EngineConfig(warmup_batch_sizes=(1,))


@pytest.fixture(scope="module")
def child(served_checkpoint):
    engine = EngineProcess(served_checkpoint, CONFIG, metrics_port=0)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def local(served_checkpoint):
    engine = Engine.load(served_checkpoint, CONFIG)
    yield engine
    engine.close()


def requests_counted(engine: EngineProcess, *labels: str) -> float:
    """`npas_requests_total` on the engine's /metrics, over the series with every label given."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{engine.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("npas_requests_total{") and all(label in line for label in labels))


def answers(engine, request: InferenceRequest, intermediate: bool) -> list:
    box: queue.SimpleQueue = queue.SimpleQueue()
    engine.submit([request], [box.put], intermediate)
    out = [box.get(timeout=60)]
    while not isinstance(out[-1], BaseException) and not out[-1].final:
        out.append(box.get(timeout=60))
    return out


def test_answers_are_the_in_process_engines(child, local):
    x = np.random.default_rng(0).normal(size=(3, 1, 40)).astype(np.float32)
    for request, streamed in [(InferenceRequest(inputs=x, request_id="ens"), True),
                              (InferenceRequest(inputs=x, mode="anytime", request_id="any"), True),
                              (InferenceRequest(inputs=x, ensemble_size=2, request_id="two"), False)]:
        got, want = answers(child, request, streamed), answers(local, request, streamed)
        assert [a.final for a in got] == [a.final for a in want] and got[-1].final
        for a, b in zip(got, want):
            assert a.request_id == b.request_id and a.members_used == b.members_used
            assert a.predictions == b.predictions and a.exit_reached == b.exit_reached
            torch.testing.assert_close(torch.as_tensor(a.probabilities), torch.as_tensor(b.probabilities))
    assert child.answer(InferenceRequest(inputs=x[:1])).final


def test_a_bad_request_is_refused_here_and_counted_there(child):
    with pytest.raises(RequestError):
        child.parse({"data": b"not a tensor"})

    assert wait_until(lambda: requests_counted(child, 'status="invalid"') >= 1, timeout_s=10, interval_s=0.1)


def test_a_request_past_its_deadline_is_refused_here_and_counted_there(child):
    """Refused before the pipe, from the caller's thread (as `Engine.submit` refuses at admission), with
    the engine's error; a live request handed over with it is answered."""
    labels = ('status="deadline"', 'mode="anytime"')
    before = requests_counted(child, *labels)
    x = np.zeros((1, 1, 40), np.float32)
    past, live = queue.SimpleQueue(), queue.SimpleQueue()
    child.submit([InferenceRequest(inputs=x, mode="anytime", deadline_unix_ms=time.time() * 1000 - 1),
                  InferenceRequest(inputs=x)], [past.put, live.put])
    refused = past.get_nowait()                 # already there: decided in this process
    assert isinstance(refused, DeadlineExceeded) and "nothing was computed" in str(refused)
    assert live.get(timeout=60).final
    assert wait_until(lambda: requests_counted(child, *labels) >= before + 1, timeout_s=10, interval_s=0.1)


def test_a_cancelled_request_is_dropped_in_the_child(served_checkpoint):
    """A queue that waits 2 s for its batch to fill: the request cancelled meanwhile is dropped when the
    batch is taken, unrun (an answer would mean the cancellation never reached the child)."""
    engine = EngineProcess(served_checkpoint, EngineConfig(warmup_batch_sizes=(1,), batch_delay_ms=2_000,
                                                           batch_examples=64), metrics_port=0)
    try:
        box: queue.SimpleQueue = queue.SimpleQueue()
        call, = engine.submit([InferenceRequest(inputs=np.zeros((1, 1, 40), np.float32))], [box.put])
        call.cancel()
        assert isinstance(box.get(timeout=30), Cancelled)
    finally:
        engine.close()


def test_a_child_that_dies_ends_every_waiting_request(served_checkpoint):
    engine = EngineProcess(served_checkpoint, EngineConfig(warmup_batch_sizes=(1,), batch_delay_ms=30_000,
                                                           batch_examples=64), metrics_port=0)
    try:
        box: queue.SimpleQueue = queue.SimpleQueue()
        engine.submit([InferenceRequest(inputs=np.zeros((1, 1, 40), np.float32))], [box.put])
        assert engine.ready()
        os.kill(engine._process.pid, signal.SIGKILL)
        assert isinstance(box.get(timeout=10), EngineProcessError)
        assert not engine.ready()
        box2: queue.SimpleQueue = queue.SimpleQueue()
        engine.submit([InferenceRequest(inputs=np.zeros((1, 1, 40), np.float32))], [box2.put])
        assert isinstance(box2.get(timeout=10), EngineProcessError)     # refused at once, not left waiting
    finally:
        engine.close()


def test_answers_read_on_an_event_loop_reach_calls_from_any_thread_and_end_when_the_child_dies(served_checkpoint):
    """`read_on(loop)`, as the embedded server does: no reading thread; each answer is handed out on the
    loop's thread, to a call submitted on the loop and to one from another thread (the v2 REST
    server's) alike; a child that dies ends the requests still waiting."""
    x = np.zeros((1, 1, 40), np.float32)
    # a batch waits 2 s to fill: the request submitted just before the kill is still waiting then
    engine = EngineProcess(served_checkpoint, EngineConfig(warmup_batch_sizes=(1,), batch_delay_ms=2_000,
                                                           batch_examples=64), metrics_port=0)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        engine.read_on(loop)
        with pytest.raises(RuntimeError):
            engine.read_on(loop)
        threads: list[int] = []
        done = asyncio.Event()

        def deliver(item) -> None:
            threads.append(threading.get_ident())
            done.set()

        engine.submit([InferenceRequest(inputs=x)], [deliver])
        await asyncio.wait_for(done.wait(), 30)
        other = await asyncio.to_thread(engine.answer, InferenceRequest(inputs=x, ensemble_size=1))
        assert other.final and len(other.members_used) == 1
        assert threads == [threading.get_ident()] and engine._reader is None

        ended: asyncio.Future = loop.create_future()
        engine.submit([InferenceRequest(inputs=x, ensemble_size=1)], [lambda item: ended.set_result(item)])
        os.kill(engine._process.pid, signal.SIGKILL)
        assert isinstance(await asyncio.wait_for(ended, 10), EngineProcessError)
        assert not engine.ready()          # marked before the waiting requests were ended

    try:
        asyncio.run(main())
    finally:
        engine.close()


def test_a_checkpoint_that_cannot_load_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load"):
        EngineProcess(tmp_path / "missing", CONFIG, metrics_port=0)


def test_a_server_whose_engine_process_dies_says_so_and_fails_calls_at_once(served_checkpoint):
    """`npas-serve serve`: the engine's child killed, gRPC health turns NOT_SERVING and a call fails
    with an error instead of waiting for an engine that is gone."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from npas_serve.client import Client, ClientError
    from tests.support import servers as launch

    x = np.zeros((1, 1, 40), np.float32)
    with launch.running_embedded(served_checkpoint) as server, grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status

        assert status() == health_pb2.HealthCheckResponse.SERVING
        engine_pid, = [p for p in launch.server_pids(server.pid)[1:] if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        os.kill(engine_pid, signal.SIGKILL)
        assert wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=15, interval_s=0.1)
        with Client(server.target, timeout=30) as c, pytest.raises(ClientError) as err:
            c.predict(x)
        assert err.value.code == "INTERNAL" and "engine" in err.value.details
        with Client(server.target, timeout=30) as c:
            assert "Unhealthy" in c.ping()


def test_sigterm_to_the_whole_group_is_left_to_the_server(served_checkpoint):
    """A container's init (`tini -g`) signals the server's whole process group, the engine's child
    included. The child leaves SIGTERM to the server (which drains its calls, then closes the child):
    signalled alone, it keeps serving; the group signalled, the server exits 0."""
    import subprocess
    import sys

    from npas_serve.client import Client
    from tests.support import servers as launch

    port = launch.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "npas_serve.cli", "serve", str(served_checkpoint),
                             "--grpc-port", str(port), "--metrics-port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        launch.wait_port(port, proc)
        child, = [p for p in launch.server_pids(proc.pid)[1:] if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        os.kill(child, signal.SIGTERM)
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            assert c.predict(np.zeros((1, 1, 40), np.float32)).final
        assert os.path.exists(f"/proc/{child}") and proc.poll() is None
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert wait_until(lambda: not os.path.exists(f"/proc/{child}"), timeout_s=10, interval_s=0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
