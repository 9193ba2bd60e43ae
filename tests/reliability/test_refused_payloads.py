"""Refused payloads cost the servers almost nothing (issue 13, defect 4).

Four clients keep sending the largest payloads a refusal can come from (a 4 MiB JSON batch of
tiny lists, and one of those just under the payload limit, which a byte count refuses before
any parsing); meanwhile a good request must still be answered within 10x its unloaded latency,
and the serving process's memory must stay within 2x of idle.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from statistics import median

import grpc

from npas_serve.protocol import inference_pb2, inference_pb2_grpc
from npas_serve.protocol.limits import max_payload_bytes
from npas_serve.protocol.response import encode_request
from tests.reliability.support import metadata, raw_predict, worker_pids

CLIENTS = 4
ROUNDS = 12                       # refused payloads per client
GOOD = 5


def hostile(size: int) -> bytes:
    """Valid JSON of about `size` bytes whose inputs are a huge batch of one-number lists."""
    count = (size - 20) // 7
    return b'{"inputs": [' + b"[[0]], " * count + b"[[0]]]}"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def good_latency_s(server, x) -> float:
    started = time.perf_counter()
    reply = raw_predict(server, {"data": encode_request(x, "json")})
    assert reply.code == "OK", reply
    return time.perf_counter() - started


def test_refused_payloads_do_not_starve_good_requests(server, pool, figures):
    x = pool[:1]
    pid = worker_pids(server)[0] if server.kind == "torchserve" else server.pid
    limit = max_payload_bytes((1, 40), 256, 4 * 2**20)
    payloads = [hostile(4 * 2**20 - 64), hostile(limit - 64)]
    good_latency_s(server, x)                                  # warm
    idle_s = median(good_latency_s(server, x) for _ in range(GOOD))
    idle_rss = rss_bytes(pid)
    codes: dict[str, int] = {}
    codes_lock = threading.Lock()         # four attackers count into one dict: no lost update
    stop = threading.Event()
    peak = [idle_rss]

    def attacker(i: int) -> None:
        request_of = [inference_pb2.PredictionsRequest(model_name="npas", input={"data": p}) for p in payloads]
        with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 8 * 2**20)]) as ch:
            stub = inference_pb2_grpc.InferenceAPIsServiceStub(ch)
            for r in range(ROUNDS):
                try:
                    reply = stub.Predictions(request_of[(r + i) % 2], timeout=60, metadata=metadata(server))
                    # TorchServe batches calls: its gRPC frontend drops a per-request status, so a
                    # refusal inside a batch is an OK reply holding the error (Client raises it)
                    code = "OK (error body)" if b'"error"' in reply.prediction[:64] else "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                with codes_lock:
                    codes[code] = codes.get(code, 0) + 1

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=attacker, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    loaded = []
    while any(t.is_alive() for t in threads) and len(loaded) < 50:
        loaded.append(good_latency_s(server, x))
    for t in threads:
        t.join(timeout=300)
    stop.set()
    sampler.join(timeout=5)
    assert "OK" not in codes and sum(codes.values()) == CLIENTS * ROUNDS, codes
    figures.put("refused_payloads", server.kind, {
        "clients": CLIENTS, "refused": codes, "good_requests_under_load": len(loaded),
        "good_ms_idle_p50": round(idle_s * 1000, 1), "good_ms_loaded_p50": round(median(loaded) * 1000, 1),
        "good_ms_loaded_max": round(max(loaded) * 1000, 1),
        "rss_mb_idle": round(idle_rss / 2**20), "rss_mb_peak": round(peak[0] / 2**20)})
    assert loaded and median(loaded) <= 10 * idle_s, (idle_s, loaded)
    assert peak[0] <= 2 * idle_rss, (idle_rss, peak[0])
