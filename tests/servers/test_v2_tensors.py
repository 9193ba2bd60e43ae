"""The v2 translation: requests reach the same validation as TorchServe's API, answers become named tensors."""
from __future__ import annotations

import numpy as np
import pytest

from npas_serve.protocol import _wire
from npas_serve.protocol.request import RequestError, RequestLimits, parse_request
from npas_serve.protocol.response import InferenceResponse, encode_request
from npas_serve.servers.v2.model import Model, ModelNotFound
from npas_serve.servers.v2.tensors import (DATATYPES, OUTPUTS, PARAMETERS, Tensor, V2Request, outputs,
                                           request_fields, response_parameters)

LIMITS = RequestLimits((1, 40), ("wide", "mid", "narrow"), 3, max_batch=16, example_shapes=((40,),))
X = np.random.default_rng(0).normal(size=(4, 40)).astype(np.float32)


def v2(x=X, datatype="FP32", shape=None, parameters=None, name="inputs", raw=True, **kw) -> V2Request:
    shape = tuple(x.shape if shape is None else shape)
    tensor = Tensor(name, datatype, shape, raw=x.tobytes() if raw else None, values=None if raw else x.ravel().tolist())
    return V2Request("npas", "", kw.pop("id", "r1"), (tensor,), parameters or {}, **kw)


def parse(request: V2Request):
    return parse_request(request_fields(request, LIMITS), LIMITS)


@pytest.mark.parametrize("raw", [True, False])
def test_same_request_as_the_torchserve_api(raw):
    knobs = dict(mode="anytime", exit=1, latency_budget_ms=50.0, min_confidence=0.9)
    got = parse(v2(parameters={**knobs, "members": "mid"}, raw=raw))
    want = parse_request({"data": encode_request(X, "protobuf", request_id="r1", members=["mid"], **knobs)}, LIMITS)
    assert got.inputs.tobytes() == want.inputs.tobytes() and got.inputs.shape == (4, 1, 40)
    assert (got.mode, got.members, got.exit, got.budget_ms, got.min_confidence, got.request_id) == \
           (want.mode, want.members, want.exit, want.budget_ms, want.min_confidence, want.request_id)


def test_every_v2_datatype_is_one_the_shared_parser_accepts():
    assert set(DATATYPES.values()) <= set(_wire.DTYPES)
    as_int = parse(v2(X.round().astype(np.int32), "INT32"))
    np.testing.assert_array_equal(as_int.inputs.reshape(4, 40), X.round())


def test_knobs_are_checked_by_the_shared_parser():
    with pytest.raises(RequestError) as err:
        parse(v2(parameters={"mode": "ensemble", "exit": 1}))
    assert err.value.field == "exit"
    with pytest.raises(RequestError) as err:
        parse(v2(parameters={"ensemble_size": 4}))
    assert err.value.field == "ensemble_size"


@pytest.mark.parametrize("request_,field", [
    (v2(datatype="BYTES"), "datatype"),
    (v2(datatype="BOOL"), "datatype"),
    (v2(shape=(4, 41)), "inputs"),                        # bytes do not match the shape
    (v2(X[:, :39].copy()), "inputs"),                    # shape the model does not take
    (v2(shape=(4, -40)), "shape"),
    (v2(name="x"), "inputs"),
    (v2(parameters={"temperature": 2.0}), "temperature"),
    (v2(parameters={"sequence_id": 7}), "sequence_id"),
    (v2(parameters={"stream": True}), "stream"),          # the RPC decides streaming
    (v2(outputs=("logits",)), "outputs"),
    (v2(np.full((4, 40), np.nan, np.float32)), "inputs"),
    (v2(np.zeros((17, 40), np.float32)), "inputs"),      # over max_batch
])
def test_bad_requests_name_their_field(request_, field):
    with pytest.raises(RequestError) as err:
        parse(request_)
    assert err.value.field == field


def test_typed_values_must_be_numbers_of_the_datatype():
    for values, datatype in (([True] * 40, "FP32"), ([0.5] * 40, "INT32"), (["a"] * 40, "FP32")):
        request = V2Request("npas", "", "", (Tensor("inputs", datatype, (1, 40), values=values),))
        with pytest.raises(RequestError) as err:
            parse(request)
        assert err.value.field == "inputs"


def test_outputs_and_parameters_of_an_answer():
    answer = InferenceResponse("r1", "npas", "1", "anytime", [3, 1], np.eye(2, 10, dtype=np.float32),
                               [0.1, 0.2], [0.0, 0.5], ["mid"], 2, ["mid:e0", "mid:e1", "mid:e2"], 4.5, 10.0, True)
    tensors = outputs(answer)
    assert [(t.name, t.datatype, t.array.dtype, t.array.shape) for t in tensors] == [
        ("probabilities", "FP32", np.float32, (2, 10)), ("predictions", "INT64", np.int64, (2,)),
        ("entropy", "FP32", np.float32, (2,)), ("disagreement", "FP32", np.float32, (2,))]
    assert [t.name for t in outputs(answer, ("entropy", "predictions"))] == ["entropy", "predictions"]
    assert response_parameters(answer) == {"mode": "anytime", "members_used": "mid", "plan": "mid:e0,mid:e1,mid:e2",
                                           "latency_ms": 4.5, "final": True, "exit_reached": 2, "budget_met": True}
    assert tuple(OUTPUTS) == ("probabilities", "predictions", "entropy", "disagreement")
    assert set(PARAMETERS) == {"mode", "ensemble_size", "members", "exit", "latency_budget_ms",
                               "deadline_unix_ms", "sent_unix_ms", "min_confidence"}


def test_model_metadata_and_routing():
    model = Model.of("npas", "1", LIMITS, 10)
    assert [(t.name, t.datatype, t.shape) for t in model.inputs] == [("inputs", "FP32", (-1, 40))]
    assert model.outputs[0].shape == (-1, 10)
    model.route("npas")
    model.route("npas", "1")
    for name, version, field in (("other", "", "model_name"), ("npas", "2", "model_version")):
        with pytest.raises(ModelNotFound) as err:
            model.route(name, version)
        assert err.value.field == field
