"""Fuzz parse_request: whatever arrives, the only exception is RequestError.

Successful parses must also satisfy the InferenceRequest contract, so a
validator that lets bad values through fails here too.
"""

import json
import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npas_serve.protocol import RequestError, RequestLimits, encode_request, npas_pb2, parse_request
from npas_serve.protocol.request import KNOBS, MODES

LIMITS = RequestLimits(input_shape=(1, 4), member_names=("m0", "m1", "m2"), num_exits=2,
                       max_batch=3, max_payload_bytes=65536, max_budget_ms=500.0)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30)
keys = st.sampled_from(("inputs",) + KNOBS) | st.text(max_size=12)
json_objects = st.dictionaries(keys, json_values, max_size=8)
valid_inputs = st.integers(1, 3).map(lambda b: np.arange(b * 4, dtype=np.float32).reshape(b, 1, 4).tolist())
map_values = st.binary(max_size=40) | st.text(max_size=40)


def check_contract(fields):
    """parse_request either refuses with RequestError or returns a request honouring the contract."""
    try:
        req = parse_request(fields, LIMITS)
    except RequestError as exc:
        assert isinstance(exc.field, str) and len(exc.field) <= 64 and str(exc).endswith(".")
        return
    x = req.inputs
    assert isinstance(x, np.ndarray) and x.dtype == np.float32 and np.isfinite(x).all()
    assert x.shape[1:] == LIMITS.input_shape and 1 <= x.shape[0] <= LIMITS.max_batch
    assert req.mode in MODES and req.payload_format in ("json", "protobuf")
    assert req.ensemble_size is None or 1 <= req.ensemble_size <= len(LIMITS.member_names)
    if req.members is not None:
        assert set(req.members) <= set(LIMITS.member_names) and len(set(req.members)) == len(req.members) > 0
        assert req.ensemble_size in (None, len(req.members))
    assert req.exit is None or 0 <= req.exit < LIMITS.num_exits
    assert req.budget_ms is None or 0 < req.budget_ms <= LIMITS.max_budget_ms
    assert req.deadline_unix_ms is None or (req.deadline_unix_ms > 0 and math.isfinite(req.deadline_unix_ms))
    assert req.min_confidence is None or 0 <= req.min_confidence <= 1
    assert isinstance(req.stream, bool) and isinstance(req.request_id, str) and 0 < len(req.request_id) <= 128


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes(payload):
    check_contract({"data": payload})


@FUZZ
@given(json_objects)
def test_arbitrary_json_objects(obj):
    check_contract({"data": json.dumps(obj).encode()})
    check_contract({"body": obj})  # TorchServe may hand over an already decoded JSON body


@FUZZ
@given(valid_inputs, st.dictionaries(st.sampled_from(KNOBS), json_values, max_size=4))
def test_valid_inputs_with_arbitrary_knob_values(inputs, knobs):
    check_contract({"data": json.dumps({"inputs": inputs, **knobs}).encode()})


@FUZZ
@given(valid_inputs, st.dictionaries(keys, map_values, max_size=4))
def test_arbitrary_map_keys(inputs, extra):
    extra.pop("data", None), extra.pop("body", None)
    check_contract({"data": json.dumps({"inputs": inputs}).encode(), **extra})


@FUZZ
@given(st.data())
def test_mutated_protobuf(data):
    b = data.draw(st.integers(1, 3))
    payload = bytearray(encode_request(np.ones((b, 1, 4)), "protobuf", ensemble_size=2, exit=1,
                                       latency_budget_ms=5.0, members=["m0", "m1"], request_id="abc"))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(payload)))
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "insert":
            payload[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif pos < len(payload):
            if op == "flip":
                payload[pos] ^= data.draw(st.integers(1, 255))
            else:
                del payload[pos]
    check_contract({"data": bytes(payload)})


@FUZZ
@given(st.builds(npas_pb2.Tensor, data=st.binary(max_size=64),
                 shape=st.lists(st.integers(-2, 2**40), max_size=4),
                 dtype=st.sampled_from(["", "float32", "float16", "int8", "float64", "bool", "x"])))
def test_arbitrary_protobuf_tensors(tensor):
    check_contract({"data": npas_pb2.InferRequest(inputs=tensor).SerializeToString()})
