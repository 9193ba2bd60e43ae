"""Work nobody waits for is not done (issue 13, defect 6).

TorchServe 0.12 hands its worker calls whose client has already given up: the frontend passes
no deadline and no cancellation. A deadline travels to the worker only in the request itself
(`deadline_unix_ms`), and a request whose deadline has passed is refused unrun, on both servers.
"""
from __future__ import annotations

import time

import grpc
import numpy as np

from npas_serve.protocol import inference_pb2, inference_pb2_grpc
from npas_serve.protocol.response import decode_response, encode_request
from tests.reliability.support import expected_answer, matches, metadata, raw_predict

CALLS = 100
MAX_BATCH = 256


def test_abandoned_max_batch_calls_do_not_delay_the_next_request(server, pool, reference, figures):
    x = np.resize(pool, (MAX_BATCH, *pool.shape[1:]))
    # what one such call costs when run: with its deadline passed, the planner would run one member
    one = raw_predict(server, {"data": encode_request(x, "protobuf", ensemble_size=1)}, timeout=60)
    started = time.monotonic()
    one = raw_predict(server, {"data": encode_request(x, "protobuf", ensemble_size=1)}, timeout=60)
    run_s = time.monotonic() - started
    assert one.code == "OK", one
    with grpc.insecure_channel(server.target) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        futures = []
        for _ in range(CALLS):
            payload = encode_request(x, "protobuf", deadline_unix_ms=time.time() * 1000 + 1)
            request = inference_pb2.PredictionsRequest(model_name="npas", input={"data": payload})
            futures.append(stub.Predictions.future(request, timeout=0.001, metadata=metadata(server)))
        codes = [f.code().name for f in futures]
    # each call ends on its deadline, unanswered: the client's own timer says DEADLINE_EXCEEDED; when the
    # server's reset for the same deadline arrives first (TorchServe's gRPC-java frontend resets the
    # stream on a busy machine), the client says CANCELLED
    assert set(codes) <= {"DEADLINE_EXCEEDED", "CANCELLED"}, codes
    started = time.monotonic()
    reply = raw_predict(server, {"data": encode_request(pool[:2])}, timeout=60)
    took = time.monotonic() - started
    assert reply.code == "OK" and matches(decode_response(reply.prediction), expected_answer(reference, pool[:2]))
    figures.put("abandoned_calls", server.kind, {"calls": CALLS, "batch": MAX_BATCH, "next_request_s": round(took, 2),
                                                "one_call_run_s": round(run_s, 3)})
    # run, the abandoned calls would hold the next request for CALLS x run_s
    assert took < max(1.0, CALLS * run_s / 3), f"the next request waited {took:.1f}s behind work nobody waited for"


def test_a_passed_deadline_is_refused_unrun(server, pool):
    reply = raw_predict(server, {"data": encode_request(pool[:2], deadline_unix_ms=time.time() * 1000 - 1000)})
    assert reply.code == "DEADLINE_EXCEEDED" and reply.details.startswith("deadline_unix_ms:"), reply
