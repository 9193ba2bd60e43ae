"""Bad requests, table-driven, against the embedded server and real TorchServe.

Each case is sent as a raw PredictionsRequest (no client-side checks in the
way); the server must refuse it with an error that names the field, and the
very next good request must be answered correctly, by the same process (and,
for TorchServe, by the same worker: a bad request must never kill one).
"""
from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npas_serve.protocol import npas_pb2
from npas_serve.protocol.limits import max_payload_bytes
from npas_serve.protocol.request import KNOBS
from npas_serve.protocol.response import decode_response, encode_request
from tests.reliability.support import expected_answer, matches, raw_predict, worker_pids

SHAPE = (1, 40)
MAX_BATCH = 256                 # EngineConfig's default, used by both servers here
# the largest payload a batch of MAX_BATCH examples of SHAPE can need (protocol.limits), under the 4 MiB cap
MAX_PAYLOAD = max_payload_bytes(SHAPE, MAX_BATCH, 4 * 2**20)
N_MEMBERS, N_EXITS = 3, 3


def js(**obj) -> dict:
    return {"data": json.dumps(obj).encode()}


def good_rows(b: int = 2) -> list:
    return np.linspace(-1, 1, b * 40, dtype=np.float32).reshape(b, *SHAPE).tolist()


def raw_tensor(array: np.ndarray, dtype: str = "float32", shape=None) -> dict:
    return {"data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
            "shape": list(array.shape if shape is None else shape), "dtype": dtype}


def proto(inputs: np.ndarray, **fields) -> dict:
    a = np.ascontiguousarray(inputs, dtype="<f4")
    msg = npas_pb2.InferRequest(inputs=npas_pb2.Tensor(data=a.tobytes(), shape=a.shape, dtype="float32"), **fields)
    return {"data": msg.SerializeToString()}


def garbled_proto() -> dict:
    whole = proto(np.ones((2, *SHAPE)), ensemble_size=2)["data"]
    return {"data": whole[: len(whole) // 2]}      # cut inside the tensor bytes: not a message any more


def oversized() -> dict:
    body = json.dumps({"inputs": good_rows(1)}).encode()
    return {"data": body[:-1] + b" " * (MAX_PAYLOAD - len(body) + 8) + b"}"}   # valid JSON, 8 bytes too many


NAN = np.full((2, *SHAPE), 0.5, dtype=np.float32)
NAN[1, 0, 7] = np.nan
INF = np.full((2, *SHAPE), 0.5, dtype=np.float32)
INF[0, 0, 0] = np.inf

# (case id, field the error must name, the request's input map)
CASES = [
    ("not JSON", "data", lambda: {"data": b'{"inputs": [[[1.0, 2.0'}),
    ("not JSON or protobuf", "data", lambda: {"data": b"\xff\xfe garbage \x00\x01"}),
    ("garbled protobuf", "data", garbled_proto),
    ("empty payload", "data", lambda: {"data": b""}),
    ("no payload", "data", lambda: {"ensemble_size": b"2"}),
    ("missing inputs (JSON)", "inputs", lambda: js(mode="ensemble", ensemble_size=2)),
    ("missing inputs (protobuf)", "inputs",
     lambda: {"data": npas_pb2.InferRequest(ensemble_size=1).SerializeToString()}),
    ("wrong feature shape", "inputs", lambda: js(inputs=np.zeros((2, 1, 39)).tolist())),
    ("wrong rank", "inputs", lambda: js(inputs=np.zeros((2, 1, 1, 40)).tolist())),   # (2, 40) is accepted
    ("ragged batch", "inputs", lambda: js(inputs=[[[0.0] * 40], [[0.0] * 39]])),
    ("wrong dtype: strings", "inputs", lambda: js(inputs=[[["0.1"] * 40]])),
    ("wrong dtype: complex64 raw", "inputs",
     lambda: js(inputs=raw_tensor(np.zeros((1, *SHAPE), np.complex64), dtype="complex64"))),
    ("raw bytes disagree with shape", "inputs",
     lambda: js(inputs=raw_tensor(np.zeros((1, *SHAPE), np.float32), shape=[2, *SHAPE]))),
    ("NaN in inputs (JSON)", "inputs", lambda: {"data": json.dumps({"inputs": NAN.tolist()}).encode()}),
    ("NaN in inputs (raw)", "inputs", lambda: js(inputs=raw_tensor(NAN))),
    ("Inf in inputs (protobuf)", "inputs", lambda: proto(INF)),
    ("float64 beyond float32 range", "inputs",
     lambda: js(inputs=raw_tensor(np.full((1, *SHAPE), 1e300), dtype="float64"))),
    ("empty batch (JSON)", "inputs", lambda: js(inputs=[])),
    ("empty batch (protobuf)", "inputs", lambda: proto(np.zeros((0, *SHAPE)))),
    ("batch over the maximum", "inputs", lambda: js(inputs=raw_tensor(np.zeros((MAX_BATCH + 1, *SHAPE), np.float32)))),
    ("payload over the size limit", "data", oversized),
    ("ensemble_size 0", "ensemble_size", lambda: js(inputs=good_rows(), ensemble_size=0)),
    ("ensemble_size above N", "ensemble_size", lambda: js(inputs=good_rows(), ensemble_size=N_MEMBERS + 1)),
    ("ensemble_size not an integer", "ensemble_size", lambda: js(inputs=good_rows(), ensemble_size=1.5)),
    ("ensemble_size text", "ensemble_size", lambda: js(inputs=good_rows(), ensemble_size="two")),
    ("ensemble_size map key", "ensemble_size", lambda: {**js(inputs=good_rows()), "ensemble_size": b"9"}),
    ("ensemble_size vs members", "ensemble_size",
     lambda: js(inputs=good_rows(), ensemble_size=2, members=["wide"])),
    ("unknown member", "members", lambda: js(inputs=good_rows(), members=["wide", "nobody"])),
    ("duplicate member", "members", lambda: js(inputs=good_rows(), members=["wide", "wide"])),
    ("members map key", "members", lambda: {**js(inputs=good_rows()), "members": b"mid,ghost"}),
    ("exit above range", "exit", lambda: js(inputs=good_rows(), mode="anytime", exit=N_EXITS)),
    ("exit negative", "exit", lambda: js(inputs=good_rows(), mode="anytime", exit=-1)),
    ("budget negative", "latency_budget_ms", lambda: js(inputs=good_rows(), latency_budget_ms=-5)),
    ("budget zero", "latency_budget_ms", lambda: js(inputs=good_rows(), latency_budget_ms=0)),
    ("budget absurdly large", "latency_budget_ms", lambda: js(inputs=good_rows(), latency_budget_ms=1e12)),
    ("budget not a number", "latency_budget_ms",
     lambda: {**js(inputs=good_rows()), "latency_budget_ms": b"soon"}),
    ("min_confidence below 0", "min_confidence",
     lambda: js(inputs=good_rows(), mode="anytime", min_confidence=-0.1)),
    ("min_confidence above 1", "min_confidence",
     lambda: js(inputs=good_rows(), mode="anytime", min_confidence=1.5)),
    ("unknown mode", "mode", lambda: js(inputs=good_rows(), mode="fastest")),
    ("unknown mode (protobuf enum)", "mode", lambda: proto(np.ones((1, *SHAPE)), mode=7)),
    ("stream not a boolean", "stream", lambda: js(inputs=good_rows(), stream="maybe")),
    ("request_id too long", "request_id", lambda: js(inputs=good_rows(), request_id="x" * 500)),
    ("unknown payload field", "ensembel_size", lambda: js(inputs=good_rows(), ensembel_size=2)),
    ("unknown map key", "temperature", lambda: {**js(inputs=good_rows()), "temperature": b"0.5"}),
]

# Routing errors happen before the engine. TorchServe 0.12's gRPC frontend maps its
# ModelNotFoundException / ModelVersionNotFoundException to INTERNAL; the embedded server
# answers the same, so a client sees one behaviour (docs/reliability.md).
ROUTING = [
    ("unknown model", {"model_name": "nope"}, {"embedded": "INTERNAL", "torchserve": "INTERNAL"}, "nope"),
    ("unknown version", {"model_version": "9"}, {"embedded": "INTERNAL", "torchserve": "INTERNAL"}, "9"),
]
# Over the transport's message limit nothing reaches our code: gRPC itself refuses.
TRANSPORT_LIMIT = {"embedded": "RESOURCE_EXHAUSTED", "torchserve": "CANCELLED"}


@pytest.fixture(scope="module")
def good(pool, reference):
    x = pool[:4]
    return x, expected_answer(reference, x, ensemble_size=2)


def assert_still_serving(server, good) -> None:
    x, expected = good
    reply = raw_predict(server, {"data": encode_request(x, "json", ensemble_size=2)})
    assert reply.code == "OK", f"{server.kind} stopped answering: {reply}"
    assert matches(decode_response(reply.prediction), expected)


def field_of(details: str) -> str:
    return details.split(":", 1)[0]


def test_bad_requests_name_their_field_and_serving_goes_on(server, good, figures):
    workers_before = worker_pids(server) if server.kind == "torchserve" else []
    codes = {}
    for case, field, build in CASES:
        reply = raw_predict(server, build())
        assert reply.code == "INVALID_ARGUMENT", f"{case}: {reply}"
        assert field_of(reply.details) == field, f"{case}: error does not name {field!r}: {reply.details!r}"
        assert len(reply.details) > len(field) + 10, f"{case}: no explanation: {reply.details!r}"
        codes[case] = {"field": field, "code": reply.code}
        assert_still_serving(server, good)
    for case, target, expected_code, name in ROUTING:
        reply = raw_predict(server, {"data": encode_request(good[0])}, **target)
        assert reply.code == expected_code[server.kind], f"{case}: {reply}"
        assert repr(name)[1:-1] in reply.details and ("model" in reply.details.lower()), reply.details
        codes[case] = {"field": next(iter(target)), "code": reply.code}
        assert_still_serving(server, good)
    reply = raw_predict(server, {"data": b" " * (8 * 2**20)})
    assert reply.code == TRANSPORT_LIMIT[server.kind], reply
    codes["payload over the transport limit (8 MiB)"] = {"field": "(transport)", "code": reply.code}
    assert_still_serving(server, good)

    os.kill(server.pid, 0)                                   # the same server process
    if server.kind == "torchserve":
        assert worker_pids(server) == workers_before, "a bad request cost a TorchServe worker"
    figures.put("bad_requests", server.kind, {"cases": len(codes), "refused_as_expected": len(codes),
                                              "good_answers_after": len(codes), "codes": codes})


# -- fuzzing over the wire --------------------------------------------------------------------

WIRE_FUZZ = settings(max_examples=int(os.environ.get("NPAS_WIRE_FUZZ_EXAMPLES", "60")), deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
map_keys = st.sampled_from(("data", "body") + KNOBS) | st.text(max_size=12)
map_values = st.binary(max_size=200) | st.text(max_size=60).map(str.encode)


def test_fuzzed_requests_are_refused_cleanly(server, good, figures):
    seen = {"INVALID_ARGUMENT": 0}

    @WIRE_FUZZ
    @given(st.one_of(st.binary(max_size=400).map(lambda b: {"data": b}),
                     st.dictionaries(map_keys, map_values, max_size=5)))
    def fuzz(inputs):
        reply = raw_predict(server, inputs)
        # random bytes never make a valid batch of (1, 40) examples: always a refusal naming a field
        assert reply.code == "INVALID_ARGUMENT", f"{inputs!r}: {reply}"
        assert ": " in reply.details and len(reply.details) > 20, reply.details
        seen["INVALID_ARGUMENT"] += 1

    fuzz()
    assert_still_serving(server, good)
    if server.kind == "torchserve":
        assert len(worker_pids(server)) == 1
    figures.put("wire_fuzz", server.kind, {"examples": seen["INVALID_ARGUMENT"]})
