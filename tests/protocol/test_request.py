"""parse_request: every refusal names the right field; good requests in every form."""

import base64
import json

import numpy as np
import pytest

from npas_serve.protocol import InferenceRequest, RequestError, RequestLimits, npas_pb2, parse_request

LIMITS = RequestLimits(input_shape=(1, 8), member_names=("m0", "m1", "m2", "m3"), num_exits=3,
                       max_batch=4, max_payload_bytes=4096, max_budget_ms=1000.0)
ONE = [[[0.5] * 8]]  # one example, shape (1, 1, 8)


def js(**obj) -> dict:
    """A request map whose JSON payload is `obj` (inputs default to ONE)."""
    obj.setdefault("inputs", ONE)
    return {"data": json.dumps(obj).encode()}


def raw(array, dtype="float32", **extra) -> dict:
    a = np.asarray(array, dtype=dtype)
    return {"data": base64.b64encode(a.tobytes()).decode(), "shape": list(a.shape), "dtype": dtype, **extra}


def pb(**fields) -> dict:
    fields.setdefault("inputs", npas_pb2.Tensor(data=np.zeros((1, 1, 8), "<f4").tobytes(),
                                                shape=[1, 1, 8], dtype="float32"))
    return {"data": npas_pb2.InferRequest(**fields).SerializeToString()}


def with_map(fields: dict, **keys) -> dict:
    return {**fields, **{k: v.encode() if isinstance(v, str) else v for k, v in keys.items()}}


BAD = {
    # payload
    "no payload": ({}, "data"),
    "data and body": ({"data": b"{}", "body": b"{}"}, "body"),
    "empty data": ({"data": b""}, "data"),
    "blank body": ({"body": b"  \n"}, "body"),
    "payload too big": ({"data": b"{" + b" " * 5000 + b"}"}, "data"),
    "not json nor proto": ({"data": b"hello world"}, "data"),
    "truncated json": ({"data": b'{"inputs": [[['}, "data"),
    "json array": ({"data": b"[[[0.5]]]"}, "data"),
    "payload of wrong type": ({"data": [1, 2]}, "data"),
    "proto unknown field": ({"data": pb()["data"] + b"\xa8\x06\x01"}, "data"),
    # inputs
    "missing inputs": ({"data": b'{"mode": "anytime"}'}, "inputs"),
    "null inputs": (js(inputs=None), "inputs"),
    "decoded dict without inputs": ({"body": {"mode": "anytime"}}, "inputs"),
    "proto without inputs": ({"data": npas_pb2.InferRequest(ensemble_size=2).SerializeToString()}, "inputs"),
    "feature shape": (js(inputs=[[[0.5] * 7]]), "inputs"),
    "no batch dim": (js(inputs=[[0.5] * 8]), "inputs"),
    "scalar": (js(inputs=5), "inputs"),
    "string": (js(inputs="0.5"), "inputs"),
    "ragged": (js(inputs=[[[0.5] * 8], [[0.5] * 7]]), "inputs"),
    "strings inside": (js(inputs=[[["a"] * 8]]), "inputs"),
    "bools inside": (js(inputs=[[[True] * 8]]), "inputs"),
    "null inside": (js(inputs=[[[None] * 8]]), "inputs"),
    "nan": ({"data": b'{"inputs": [[[NaN, 0, 0, 0, 0, 0, 0, 0]]]}'}, "inputs"),
    "inf": ({"data": b'{"inputs": [[[Infinity, 0, 0, 0, 0, 0, 0, 0]]]}'}, "inputs"),
    "beyond float32": (js(inputs=[[[1e39] * 8]]), "inputs"),
    "empty batch": (js(inputs=[]), "inputs"),
    "empty raw batch": (js(inputs=raw(np.zeros((0, 1, 8)))), "inputs"),
    "batch too big": (js(inputs=ONE * 5), "inputs"),
    "raw dtype complex": (js(inputs=raw(np.zeros((1, 1, 8)), "complex64")), "inputs"),
    "raw dtype bool": (js(inputs=raw(np.zeros((1, 1, 8)), "bool")), "inputs"),
    "raw bad base64": (js(inputs={"data": "***", "shape": [1, 1, 8], "dtype": "float32"}), "inputs"),
    "raw length mismatch": (js(inputs={**raw(np.zeros((1, 1, 8))), "shape": [2, 1, 8]}), "inputs"),
    "raw negative shape": (js(inputs={**raw(np.zeros((1, 1, 8))), "shape": [-1, 1, 8]}), "inputs"),
    "raw huge shape": (js(inputs={**raw(np.zeros((1, 1, 8))), "shape": [2**40, 2**40, 8]}), "inputs"),
    "raw unknown key": (js(inputs=raw(np.zeros((1, 1, 8)), order="C")), "inputs"),
    "raw without shape": (js(inputs={"data": "AAAA", "dtype": "float32"}), "inputs"),
    "proto tensor dtype": (pb(inputs=npas_pb2.Tensor(data=b"\0" * 8, shape=[1, 1, 8], dtype="bool")), "inputs"),
    "proto tensor length": (pb(inputs=npas_pb2.Tensor(data=b"\0" * 7, shape=[1, 1, 8], dtype="int8")), "inputs"),
    # ensemble_size and members
    "ensemble_size 0": (js(ensemble_size=0), "ensemble_size"),
    "ensemble_size > N": (js(ensemble_size=5), "ensemble_size"),
    "ensemble_size negative": (js(ensemble_size=-1), "ensemble_size"),
    "ensemble_size float": (js(ensemble_size=2.5), "ensemble_size"),
    "ensemble_size integral float": (js(ensemble_size=2.0), "ensemble_size"),
    "ensemble_size word": (js(ensemble_size="two"), "ensemble_size"),
    "ensemble_size bool": (js(ensemble_size=True), "ensemble_size"),
    "ensemble_size map 0": (with_map(js(), ensemble_size="0"), "ensemble_size"),
    "ensemble_size map float": (with_map(js(), ensemble_size="2.5"), "ensemble_size"),
    "ensemble_size proto 0": (pb(ensemble_size=0), "ensemble_size"),
    "members unknown": (js(members=["m0", "m9"]), "members"),
    "members duplicate": (js(members=["m0", "m0"]), "members"),
    "members empty": (js(members=[]), "members"),
    "members not a list": (js(members=5), "members"),
    "members not strings": (js(members=[0, 1]), "members"),
    "members map unknown": (with_map(js(), members="m0,m9"), "members"),
    "members map bad json": (with_map(js(), members='["m0",'), "members"),
    "members map too long": (with_map(js(), members="m0," * 2000), "members"),
    "members proto unknown": (pb(members=["m7"]), "members"),
    "size and members disagree": (js(ensemble_size=3, members=["m0"]), "ensemble_size"),
    "map size and payload members disagree": (with_map(js(members=["m0", "m1"]), ensemble_size="1"),
                                              "ensemble_size"),
    # exit
    "exit too deep": (js(exit=3), "exit"),
    "exit negative": (js(exit=-1), "exit"),
    "exit float": (js(exit=1.5), "exit"),
    "exit word": (js(exit="deepest"), "exit"),
    "exit bool": (js(exit=False), "exit"),
    "exit proto too deep": (pb(exit=9), "exit"),
    # latency budget and deadline
    "budget negative": (js(latency_budget_ms=-1), "latency_budget_ms"),
    "budget zero": (js(latency_budget_ms=0), "latency_budget_ms"),
    "budget word": (js(latency_budget_ms="fast"), "latency_budget_ms"),
    "budget absurd": (js(latency_budget_ms=1e9), "latency_budget_ms"),
    "budget bool": (js(latency_budget_ms=True), "latency_budget_ms"),
    "budget list": (js(latency_budget_ms=[5]), "latency_budget_ms"),
    "budget map nan": (with_map(js(), latency_budget_ms="nan"), "latency_budget_ms"),
    "budget map inf": (with_map(js(), latency_budget_ms="inf"), "latency_budget_ms"),
    "budget json NaN": ({"data": b'{"inputs": [[[0,0,0,0,0,0,0,0]]], "latency_budget_ms": NaN}'},
                        "latency_budget_ms"),
    "budget huge int": (js(latency_budget_ms=10**400), "latency_budget_ms"),
    "budget proto zero": (pb(latency_budget_ms=0.0), "latency_budget_ms"),
    "deadline zero": (js(deadline_unix_ms=0), "deadline_unix_ms"),
    "deadline negative": (js(deadline_unix_ms=-5), "deadline_unix_ms"),
    "deadline word": (js(deadline_unix_ms="soon"), "deadline_unix_ms"),
    "deadline bool": (js(deadline_unix_ms=True), "deadline_unix_ms"),
    "sent zero": (js(sent_unix_ms=0), "sent_unix_ms"),
    "sent word": (js(sent_unix_ms="earlier"), "sent_unix_ms"),
    # confidence, mode, stream, request_id
    "confidence below 0": (js(min_confidence=-0.1), "min_confidence"),
    "confidence above 1": (js(min_confidence=1.5), "min_confidence"),
    "confidence word": (js(min_confidence="high"), "min_confidence"),
    "confidence bool": (js(min_confidence=True), "min_confidence"),
    "confidence map": (with_map(js(), min_confidence="2"), "min_confidence"),
    "mode unknown": (js(mode="fast"), "mode"),
    "mode number": (js(mode=2), "mode"),
    "mode empty": (with_map(js(), mode=""), "mode"),
    "mode proto enum": (pb(mode=7), "mode"),
    "mode map not utf8": (with_map(js(), mode=b"\xff\xfe"), "mode"),
    "stream word": (js(stream="maybe"), "stream"),
    "stream int": (js(stream=1), "stream"),
    "stream map word": (with_map(js(), stream="yes please"), "stream"),
    "request_id number": (js(request_id=5), "request_id"),
    "request_id too long": (js(request_id="x" * 200), "request_id"),
    "request_id control char": (js(request_id="a\nb"), "request_id"),
    # unknown keys
    "unknown json key": (js(temperature=0.7), "temperature"),
    "unknown map key": (with_map(js(), temperature="0.7"), "temperature"),
    "inputs as map key": (with_map(js(), inputs="[[[0]]]"), "inputs"),
    "unknown key in decoded body": ({"body": {"inputs": ONE, "topk": 3}}, "topk"),
}


@pytest.mark.parametrize("fields, field", list(BAD.values()), ids=list(BAD))
def test_bad_request_names_field(fields, field):
    with pytest.raises(RequestError) as info:
        parse_request(fields, LIMITS)
    assert info.value.field == field
    message = str(info.value)
    assert message.endswith(".") and message.count("; ") <= 2 and "\n" not in message


def test_defaults_from_nested_json():
    req = parse_request(js(), LIMITS)
    assert req.inputs.dtype == np.float32 and req.inputs.shape == (1, 1, 8)
    np.testing.assert_array_equal(req.inputs, np.full((1, 1, 8), 0.5, np.float32))
    assert (req.mode, req.ensemble_size, req.members, req.exit, req.stream, req.payload_format) == \
           ("ensemble", None, None, None, False, "json")
    assert (req.budget_ms, req.deadline_unix_ms, req.min_confidence) == (None, None, None)
    assert len(req.request_id) == 32 and int(req.request_id, 16) >= 0
    assert parse_request(js(), LIMITS).request_id != req.request_id


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int8", "int32", "int64", "uint8"])
def test_raw_bytes_json_form_casts_to_float32(dtype):
    x = (np.arange(16).reshape(2, 1, 8) % 7).astype(dtype)
    req = parse_request(js(inputs=raw(x, dtype)), LIMITS)
    assert req.inputs.dtype == np.float32
    np.testing.assert_array_equal(req.inputs, x.astype(np.float32))


def test_protobuf_with_every_knob():
    x = np.random.default_rng(0).standard_normal((3, 1, 8)).astype("<f4")
    req = parse_request(pb(inputs=npas_pb2.Tensor(data=x.tobytes(), shape=x.shape, dtype="float32"),
                           mode=npas_pb2.MODE_ANYTIME, members=["m3"], exit=2,
                           latency_budget_ms=12.5, deadline_unix_ms=1.7e12, sent_unix_ms=1.6e12,
                           min_confidence=0.9, stream=True, request_id="abc-1"), LIMITS)
    np.testing.assert_array_equal(req.inputs, x)
    assert req == InferenceRequest(inputs=req.inputs, mode="anytime", ensemble_size=None, members=("m3",),
                                   exit=2, budget_ms=12.5, deadline_unix_ms=1.7e12, sent_unix_ms=1.6e12,
                                   min_confidence=0.9, stream=True, request_id="abc-1",
                                   payload_format="protobuf")
    ensemble = parse_request(pb(mode=npas_pb2.MODE_ENSEMBLE, ensemble_size=2, members=["m1", "m3"]), LIMITS)
    assert (ensemble.mode, ensemble.ensemble_size, ensemble.members) == ("ensemble", 2, ("m1", "m3"))


@pytest.mark.parametrize("knobs, field", [
    (dict(mode="anytime", ensemble_size=2), "ensemble_size"),
    (dict(mode="anytime", members=["m1", "m3"]), "members"),
    (dict(exit=1), "exit"),
    (dict(mode="ensemble", min_confidence=0.5), "min_confidence"),
])
def test_knobs_of_the_other_mode_are_refused(knobs, field):
    with pytest.raises(RequestError) as err:
        parse_request(js(**knobs), LIMITS)
    assert err.value.field == field and "mode" in str(err.value)
    auto = {k: ("auto" if k in ("ensemble_size", "exit") else v) for k, v in knobs.items()}
    if field in ("ensemble_size", "exit"):      # auto is no value: accepted in either mode
        assert getattr(parse_request(js(**auto), LIMITS), field) is None


def test_booleans_among_the_numbers_are_refused():
    rows = [[[0.5] * 7 + [True]]]
    with pytest.raises(RequestError) as err:
        parse_request(js(inputs=rows), LIMITS)
    assert err.value.field == "inputs" and "boolean" in str(err.value)


def test_protobuf_explicit_zero_exit_is_kept():
    assert parse_request(pb(exit=0, mode=npas_pb2.MODE_ANYTIME), LIMITS).exit == 0
    assert parse_request(pb(mode=npas_pb2.MODE_ANYTIME), LIMITS).exit is None


def test_protobuf_starting_like_json_falls_back():
    # Field 1 (inputs) has tag 0x0A == '\n'; a 123-byte tensor makes the length byte '{'.
    limits = RequestLimits(input_shape=(1, 29), member_names=("m0",), num_exits=1)
    tensor = npas_pb2.Tensor(data=np.ones((1, 1, 29), "<f4").tobytes(), shape=[1, 1, 29])
    payload = npas_pb2.InferRequest(inputs=tensor).SerializeToString()
    assert payload.startswith(b"\n{")
    req = parse_request({"data": payload}, limits)
    assert req.payload_format == "protobuf" and req.inputs.shape == (1, 1, 29)


def test_json_knobs_and_body_key():
    req = parse_request({"body": js(mode="anytime", exit=1, min_confidence=0.8, latency_budget_ms=20,
                                    stream=True, request_id="r1")["data"]}, LIMITS)
    assert (req.mode, req.exit, req.min_confidence, req.budget_ms, req.stream, req.request_id) == \
           ("anytime", 1, 0.8, 20.0, True, "r1")


@pytest.mark.parametrize("wrap", [bytes, bytearray, lambda b: b.decode(), lambda b: json.loads(b)],
                         ids=["bytes", "bytearray", "str", "decoded-json"])
def test_payload_value_types(wrap):
    req = parse_request({"data": wrap(js(ensemble_size=2)["data"])}, LIMITS)
    assert req.ensemble_size == 2 and req.inputs.shape == (1, 1, 8)


def test_auto_means_none():
    req = parse_request(js(ensemble_size="auto", exit="auto"), LIMITS)
    assert req.ensemble_size is None and req.exit is None


def test_map_keys_override_payload():
    fields = with_map(js(mode="ensemble", ensemble_size=1, exit=1, stream=False, latency_budget_ms=5),
                      mode="anytime", ensemble_size="auto", members="m2", exit="auto", stream="TRUE",
                      latency_budget_ms="12.5", deadline_unix_ms="1700000000000", min_confidence="0.75",
                      request_id="from-map", sent_unix_ms="1699999999990.5")
    req = parse_request(fields, LIMITS)
    assert (req.mode, req.ensemble_size, req.members, req.exit, req.stream) == \
           ("anytime", None, ("m2",), None, True)
    assert (req.budget_ms, req.deadline_unix_ms, req.min_confidence, req.request_id) == \
           (12.5, 1.7e12, 0.75, "from-map")
    assert req.sent_unix_ms == 1699999999990.5


def test_map_keys_override_protobuf_payload():
    req = parse_request(with_map(pb(ensemble_size=4), ensemble_size="1", members='["m3"]'), LIMITS)
    assert req.ensemble_size == 1 and req.members == ("m3",) and req.payload_format == "protobuf"


def test_limits_boundaries_accepted():
    req = parse_request(js(inputs=ONE * 4, ensemble_size=4, latency_budget_ms=1000), LIMITS)
    anytime = parse_request(js(inputs=ONE * 4, mode="anytime", exit=2, min_confidence=0), LIMITS)
    assert req.inputs.shape[0] == 4 and req.ensemble_size == 4 and anytime.exit == 2
    assert req.budget_ms == 1000.0 and anytime.min_confidence == 0.0


@pytest.mark.parametrize("fmt", ["protobuf", "raw-json"])
def test_inputs_are_a_private_writable_copy(fmt):
    # a bytearray payload is writable, so a view of it would pass the write below but change the caller's bytes
    payload = bytearray(pb()["data"] if fmt == "protobuf" else js(inputs=raw(np.zeros((1, 1, 8))))["data"])
    before = bytes(payload)
    req = parse_request({"data": payload}, LIMITS)
    assert req.inputs.flags.writeable
    req.inputs[0, 0, 0] = 7.0            # raises if the array were a read-only view of the payload
    assert req.inputs[0, 0, 0] == 7.0
    assert bytes(payload) == before       # the caller's payload is untouched
    assert parse_request({"data": payload}, LIMITS).inputs[0, 0, 0] == 0.0
