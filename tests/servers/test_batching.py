"""Concurrent requests share batches, and each still gets exactly the answer it gets alone.

Run against both real servers (the embedded one batches in its engine; TorchServe hands the
worker its own batches). Every loop is bounded and every server is on loopback.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np
import pytest

from npas_serve.client import Client, ClientError
from npas_serve.protocol import encode_request, inference_pb2, inference_pb2_grpc
from tests.support.servers import metric_sum, process_cpu_s, server_pids


def client(server) -> Client:
    return Client(server.target, "npas", token=server.token, timeout=120)


def mixed_requests(num_members: int, num_exits: int) -> list[tuple[str, np.ndarray, dict]]:
    """(call, inputs, knobs): ensemble, anytime, streamed and budgeted requests, each with its own
    inputs and id. Budgets are roomy, so the plan does not depend on the load."""
    rng = np.random.default_rng(10)
    shapes = []
    for i in range(8):
        shapes += [("predict", {"ensemble_size": 1 + i % num_members}),
                   ("predict", {"mode": "anytime", "exit": i % num_exits}),
                   ("stream", {"mode": "anytime"} if i % 2 else {}),
                   ("predict", {"latency_budget_ms": 30_000, **({"mode": "anytime"} if i % 2 else {})})]
    shapes += [("predict", {"mode": "anytime", "min_confidence": 0.0}), ("stream", {"ensemble_size": 2})]
    return [(call, rng.normal(size=(1 + i % 3, 1, 40)).astype(np.float32), {**knobs, "request_id": f"req-{i}"})
            for i, (call, knobs) in enumerate(shapes)]


def ask(server, call: str, x: np.ndarray, knobs: dict):
    with client(server) as c:
        return [c.predict(x, **knobs)] if call == "predict" else list(c.stream(x, **knobs))


def same(got, alone) -> None:
    """The same answers; under a budget the planner may order the same members differently (it ranks
    them by accuracy per predicted millisecond, which moves with the load), without the answer moving."""
    assert len(got) == len(alone)
    for a, b in zip(got, alone):
        assert a.request_id == b.request_id and a.final == b.final and a.exit_reached == b.exit_reached
        if a.budget_ms is None:
            assert a.members_used == b.members_used and a.plan == b.plan
        else:
            assert sorted(a.members_used) == sorted(b.members_used) and sorted(a.plan) == sorted(b.plan)
        assert a.predictions == b.predictions
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
        np.testing.assert_allclose(a.entropy, b.entropy, atol=1e-4)


def test_mixed_concurrent_load_gets_the_answers_each_request_gets_alone(server):
    requests = mixed_requests(server.num_members, server.num_exits)
    alone = [ask(server, *r) for r in requests]
    for _ in range(2):                      # all at once, twice: none lost, none mixed up
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: ask(server, *r), requests))
        for got, expected in zip(together, alone):
            same(got, expected)


def test_concurrent_requests_share_device_batches(embedded):
    """The embedded server's batches: its metrics count more examples than any one request had."""
    url = embedded.metrics_url
    before = metric_sum(url, "npas_batch_examples_sum"), metric_sum(url, "npas_batch_examples_count")
    x = np.random.default_rng(3).normal(size=(32, 1, 1, 40)).astype(np.float32)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: ask(embedded, "predict", x[i], {}), range(32)))
    examples = metric_sum(url, "npas_batch_examples_sum") - before[0]
    requests = metric_sum(url, "npas_batch_examples_count") - before[1]
    assert requests == 32 and examples / requests > 1.5     # batch-1 requests ran several to a batch


def test_a_past_deadline_is_refused_and_a_roomy_one_answered(server):
    x = np.random.default_rng(4).normal(size=(2, 1, 40)).astype(np.float32)
    with client(server) as c:
        with pytest.raises(ClientError) as err:
            c.predict(x, deadline_unix_ms=time.time() * 1000 - 1)
        assert err.value.code == "DEADLINE_EXCEEDED" and "deadline" in err.value.details
        answer = c.predict(x, deadline_unix_ms=time.time() * 1000 + 60_000)
    assert answer.final and answer.budget_met is True


def test_past_deadlines_sent_together_are_each_refused_as_deadline_exceeded(server):
    """Inside a TorchServe batch a refusal travels as an OK reply whose body names its gRPC code."""
    x = np.random.default_rng(6).normal(size=(1, 1, 40)).astype(np.float32)

    def late(i):
        with client(server) as c:
            try:
                c.predict(x, deadline_unix_ms=time.time() * 1000 - 1, request_id=f"late-{i}")
            except ClientError as err:
                return err.code
            return "OK"

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(late, range(16))) == {"DEADLINE_EXCEEDED"}


def predict_timed(server, x: np.ndarray, request_id: str):
    """(the answer, or the ClientError that refused it; the seconds the call took)."""
    with client(server) as c:
        t0 = time.monotonic()
        try:
            result = c.predict(x, request_id=request_id)
        except ClientError as err:
            result = err
        return result, time.monotonic() - t0


def test_a_full_queue_refuses_with_resource_exhausted_at_once(served_checkpoint):
    """The embedded server with a 4-example queue that waits 3 s for a batch to fill, sent 3 and 2
    examples at once: the queue takes whichever arrives first (an empty queue takes any request), and
    the other would overflow it (5 > 4), so it is refused at once (RESOURCE_EXHAUSTED) while the first
    waits; v2 REST is refused alike (429), and the waiting request is still answered.

    No fixed sleep: the refusal itself says the queue holds the other request, since a queue refuses
    only while it holds something (the server exposes no gauge of queued examples)."""
    from tests.support import servers as launch

    x = np.random.default_rng(8).normal(size=(3, 1, 40)).astype(np.float32)
    args = ["--batch-examples", "4", "--queue-examples", "4", "--batch-delay-ms", "3000"]
    with launch.running_embedded(served_checkpoint, args=args) as server, ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(predict_timed, server, x[:n], f"{n}-examples") for n in (3, 2)]
        done, _ = wait(calls, timeout=60, return_when=FIRST_COMPLETED)
        assert len(done) == 1, [c.result() for c in calls]
        refused, = done
        waiting, = [c for c in calls if c is not refused]
        err, refused_in = refused.result()
        assert isinstance(err, ClientError), err
        assert err.code == "RESOURCE_EXHAUSTED" and "queue is full" in err.details
        assert refused_in < 0.75 and not waiting.done()     # refused before the waiting batch ran
        body = json.dumps({"inputs": [{"name": "inputs", "shape": [3, 1, 40], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        v2 = urllib.request.Request(f"http://{server.http_target}/v2/models/npas/infer", data=body,
                                    headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as http_err:     # v2 REST: 429, the same message
            urllib.request.urlopen(v2, timeout=60)
        assert http_err.value.code == 429 and "queue is full" in json.loads(http_err.value.read())["error"]
        assert not waiting.done()
        answer, _ = waiting.result(timeout=60)
        assert not isinstance(answer, ClientError) and answer.final, answer


def threads(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{p}/task")) for p in server_pids(pid))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc to read a process's CPU and threads")
def test_cancelled_calls_stop_costing(embedded):
    """200 calls cancelled or timed out by their clients: dropped from the queue, and the server is back at
    its idle CPU and thread count. Each asks for the whole ensemble on 256 examples, so running them all
    would cost the server far more CPU than the calls that happened to start."""
    import grpc

    pid = embedded.pid
    x = np.random.default_rng(5).normal(size=(256, 1, 40)).astype(np.float32)
    message = inference_pb2.PredictionsRequest(model_name="npas", input={"data": encode_request(x, "protobuf")})
    with grpc.insecure_channel(embedded.target) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        stub.Predictions(message, timeout=120)                  # warm: the first big batch allocates
        cpu, idle_threads = process_cpu_s(pid), threads(pid)
        stub.Predictions(message, timeout=120)
        one = process_cpu_s(pid) - cpu
        cpu = process_cpu_s(pid)
        calls = []
        for i in range(200):
            if i % 2:
                calls.append(stub.Predictions.future(message, timeout=0.02))   # its gRPC deadline expires
            else:
                call = stub.Predictions.future(message, timeout=120)
                calls.append(call)
                call.cancel()
        codes = set()
        for call in calls:
            try:
                call.result(timeout=120)
                codes.add("OK")
            except grpc.RpcError as err:                       # cancelled calls raise too
                codes.add(err.code().name)
            except grpc.FutureCancelledError:
                codes.add("CANCELLED")
        # a flood of 256-example calls outgrows the bounded queue: the overflow is refused at once
        assert codes <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
        end = time.monotonic() + 30                            # whatever started finishes, then idles
        while time.monotonic() < end:
            before = process_cpu_s(pid)
            time.sleep(0.5)
            if process_cpu_s(pid) - before < 0.05:
                break
        spent = process_cpu_s(pid) - cpu
        idle_cpu = process_cpu_s(pid)
        time.sleep(1.0)
        assert process_cpu_s(pid) - idle_cpu < 0.05            # idle again: nothing left running
        assert threads(pid) <= idle_threads                    # no thread left behind per call
        assert spent < 0.25 * 200 * one, (spent, one)          # most of the work was never done
        assert stub.Predictions(message, timeout=120).prediction   # and it still serves


def test_the_archive_declares_torchserve_batching(served_checkpoint, tmp_path):
    import zipfile

    from npas_serve.cli import main
    from npas_serve.servers.torchserve.archive import BATCH_SIZE, MODEL_CONFIG

    assert BATCH_SIZE > 1
    assert main(["archive", str(served_checkpoint), "--model-store", str(tmp_path), "--batch-size", "8",
                 "--max-batch-delay-ms", "3", "--batch-delay-ms", "1", "--threads", "2",
                 "--queue-examples", "16", "--eager"]) == 0
    with zipfile.ZipFile(tmp_path / "npas.mar") as mar:
        names = {n.rsplit("/", 1)[-1]: n for n in mar.namelist()}
        model_config = mar.read(names[MODEL_CONFIG]).decode()
        engine_config = json.loads(mar.read(names["npas_config.json"]))
    assert "batchSize: 8" in model_config.splitlines() and "maxBatchDelay: 3" in model_config.splitlines()
    assert (engine_config["batch_delay_ms"], engine_config["threads"], engine_config["queue_examples"]) == (1, 2, 16)
    assert engine_config["trace"] is False
