"""encode/decode round trips in both formats, and client payloads the server accepts."""

import dataclasses
import json

import numpy as np
import pytest

from npas_serve.protocol import (InferenceResponse, RequestLimits, decode_response, encode_request,
                                 encode_response, npas_pb2, parse_request)

FORMATS = ["json", "protobuf"]


def answer(**changes) -> InferenceResponse:
    probs = np.random.default_rng(1).dirichlet(np.ones(10), size=3).astype(np.float32)
    base = InferenceResponse(
        request_id="req-7", model_name="npas", model_version="1.0", mode="ensemble",
        predictions=[int(p) for p in probs.argmax(1)], probabilities=probs,
        entropy=[0.25, 1.0 / 3.0, 2.2], disagreement=[0.0, 0.5, 1.0 / 3.0],
        members_used=["m0", "m2"], exit_reached=None, plan=["m0", "m2", "m3"],
        latency_ms=3.141592653589793, budget_ms=None, budget_met=None)
    return dataclasses.replace(base, **changes)


def assert_same(a: InferenceResponse, b: InferenceResponse):
    assert b.probabilities.dtype == np.float32
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    strip = dict(probabilities=None)
    assert dataclasses.replace(a, **strip) == dataclasses.replace(b, **strip)


CASES = {
    "ensemble": answer(),
    "anytime intermediate": answer(mode="anytime", exit_reached=0, members_used=["m1"], plan=["m1:e0", "m1:e1"],
                                   final=False, budget_ms=25.0, budget_met=True),
    "budget missed": answer(budget_ms=0.5, budget_met=False),
    "exit zero": answer(mode="anytime", exit_reached=0),
    "request id starting like json": answer(request_id="r" * 123),  # proto bytes begin with '\n{'
    "empty strings": answer(request_id="", model_version=""),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("resp", list(CASES.values()), ids=list(CASES))
def test_round_trip(resp, fmt):
    payload = encode_response(resp, fmt)
    assert_same(resp, decode_response(payload))
    assert decode_response(bytearray(payload)).request_id == resp.request_id


def test_formats_are_what_they_claim():
    resp = answer(exit_reached=2, mode="anytime")
    body = json.loads(encode_response(resp, "json"))
    assert body["probabilities"] == resp.probabilities.tolist() and body["exit_reached"] == 2
    assert body["budget_met"] is None and body["final"] is True
    msg = npas_pb2.InferResponse.FromString(encode_response(resp, "protobuf"))
    assert msg.mode == npas_pb2.MODE_ANYTIME and msg.HasField("exit_reached") and not msg.HasField("budget_met")
    assert list(msg.probabilities.shape) == [3, 10] and msg.probabilities.dtype == "float32"
    assert len(msg.probabilities.data) == 3 * 10 * 4


def test_protobuf_final_defaults_to_true_when_unset():
    msg = npas_pb2.InferResponse.FromString(encode_response(answer(), "protobuf"))
    msg.ClearField("final")
    assert decode_response(msg.SerializeToString()).final is True


@pytest.mark.parametrize("bad", [b"{not json", b"\xff\xfe\xfd", json.dumps({"request_id": "x"}).encode()])
def test_decode_refuses_garbage(bad):
    with pytest.raises(ValueError):
        decode_response(bad)


def test_encode_refuses_unknown_format_and_mode():
    with pytest.raises(ValueError):
        encode_response(answer(), "xml")
    with pytest.raises(ValueError):
        encode_response(answer(mode="sometimes"), "protobuf")


LIMITS = RequestLimits(input_shape=(1, 40), member_names=("m0", "m1", "m2"), num_exits=3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_client_payload_parses_back(fmt):
    x = np.random.default_rng(2).standard_normal((5, 1, 40))  # float64: sent as float32
    knobs = dict(mode="anytime", members=("m2",), exit=np.int64(1),
                 latency_budget_ms=15.0, deadline_unix_ms=1.8e12, min_confidence=0.6, stream=True,
                 request_id="c-1")
    req = parse_request({"data": encode_request(x, fmt, **knobs)}, LIMITS)
    np.testing.assert_array_equal(req.inputs, x.astype(np.float32))
    assert req.payload_format == fmt
    got = {k: getattr(req, "budget_ms" if k == "latency_budget_ms" else k) for k in knobs}
    assert got == {**knobs, "exit": 1}
    ensemble = parse_request({"data": encode_request(x, fmt, ensemble_size=np.int64(2), members=("m0", "m2"))},
                             LIMITS)
    assert (ensemble.ensemble_size, ensemble.members) == (2, ("m0", "m2"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_client_payload_auto_and_none_are_unset(fmt):
    payload = encode_request(np.zeros((1, 1, 40)), fmt, ensemble_size="auto", exit="auto", min_confidence=None)
    req = parse_request({"data": payload}, LIMITS)
    assert (req.ensemble_size, req.exit, req.min_confidence) == (None, None, None)


def test_client_payload_json_uses_raw_bytes():
    body = json.loads(encode_request(np.ones((2, 1, 40)), "json"))
    assert set(body["inputs"]) == {"data", "shape", "dtype"} and body["inputs"]["shape"] == [2, 1, 40]


def test_encode_request_refuses_unknown_knob():
    with pytest.raises(TypeError):
        encode_request(np.zeros((1, 1, 40)), temperature=0.1)


def test_protobuf_answer_that_starts_like_json_still_decodes():
    payload = encode_response(CASES["request id starting like json"], "protobuf")
    assert payload.startswith(b"\n{")
    assert decode_response(payload).request_id == "r" * 123
