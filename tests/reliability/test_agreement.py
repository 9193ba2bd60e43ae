"""Where the two servers used to disagree, one behaviour on both (issue 13, defect 10).

The choices are in docs/reliability.md: `StreamPredictions` sends refined answers only when
the request sets `stream` (and only the embedded server can: TorchServe 0.12 does not tell
its worker which RPC it serves), routing errors are TorchServe's (INTERNAL, "Model not
found"), `StreamPredictions2` is refused in-band as TorchServe does without sequence
batching, knobs of the other mode and booleans among the inputs are refused.
"""
from __future__ import annotations

import json

import grpc
import pytest

from npas_serve.protocol import inference_pb2, inference_pb2_grpc
from npas_serve.protocol.response import decode_response, encode_request
from tests.reliability.support import expected_answer, matches, metadata, raw_predict


def stream_messages(server, inputs: dict) -> list:
    request = inference_pb2.PredictionsRequest(model_name="npas", input=inputs)
    with grpc.insecure_channel(server.target) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        return [decode_response(r.prediction) for r in stub.StreamPredictions(request, timeout=60,
                                                                              metadata=metadata(server))]


def test_stream_predictions_without_stream_is_one_final_answer(server, pool, reference, figures):
    x = pool[:3]
    answers = stream_messages(server, {"data": encode_request(x, "json")})
    figures.put("agreement", f"StreamPredictions without stream|{server.kind}", f"{len(answers)} message(s)")
    assert len(answers) == 1 and answers[0].final
    assert matches(answers[0], expected_answer(reference, x))


def test_stream_predictions_with_stream_ends_in_the_same_final_answer(server, pool, reference, figures):
    x = pool[:3]
    answers = stream_messages(server, {"data": encode_request(x, "json", stream=True)})
    figures.put("agreement", f"StreamPredictions with stream|{server.kind}",
                f"{len(answers)} message(s), the last final")
    assert answers[-1].final and not any(a.final for a in answers[:-1])
    assert matches(answers[-1], expected_answer(reference, x))
    assert len(answers) == (server.num_members if server.kind == "embedded" else 1)


@pytest.mark.parametrize("target", [{"model_name": "nope"}, {"model_version": "9"}])
def test_unknown_model_or_version_is_internal_model_not_found(server, pool, target, figures):
    reply = raw_predict(server, {"data": encode_request(pool[:1])}, **target)
    figures.put("agreement", f"unknown {next(iter(target))}|{server.kind}", reply.code)
    assert reply.code == "INTERNAL" and "not" in reply.details and next(iter(target.values())) in reply.details


@pytest.mark.parametrize("payload, field", [
    ({"exit": 1}, "exit"),
    ({"min_confidence": 0.5}, "min_confidence"),
    ({"mode": "anytime", "ensemble_size": 2}, "ensemble_size"),
    ({"mode": "anytime", "members": ["wide", "mid"]}, "members"),
])
def test_knobs_of_the_other_mode_are_refused(server, pool, payload, field, figures):
    reply = raw_predict(server, {"data": json.dumps({"inputs": pool[:1].tolist(), **payload}).encode()})
    figures.put("agreement", f"{field} in mode {payload.get('mode', 'ensemble')}|{server.kind}", reply.code)
    assert reply.code == "INVALID_ARGUMENT" and reply.details.startswith(f"{field}:"), reply


def test_booleans_among_the_inputs_are_refused(server, pool, figures):
    rows = pool[:1].tolist()
    rows[0][0][3] = True
    reply = raw_predict(server, {"data": json.dumps({"inputs": rows}).encode()})
    figures.put("agreement", f"true among the inputs|{server.kind}", reply.code)
    assert reply.code == "INVALID_ARGUMENT" and reply.details.startswith("inputs:") and "boolean" in reply.details


def test_stream_predictions2_is_refused_in_band_and_serving_goes_on(server, pool, reference, figures):
    request = inference_pb2.PredictionsRequest(model_name="npas", input={"data": encode_request(pool[:1])})
    with grpc.insecure_channel(server.target) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        replies = list(stub.StreamPredictions2(iter([request]), timeout=30, metadata=metadata(server)))
    # TorchServe 0.12's convention for this RPC: the call is OK, each message carries its error
    assert len(replies) == 1 and replies[0].status.code == grpc.StatusCode.INTERNAL.value[0], replies
    assert replies[0].status.message and not replies[0].prediction
    figures.put("agreement", f"StreamPredictions2|{server.kind}", "OK call, one message with status INTERNAL")
    reply = raw_predict(server, {"data": encode_request(pool[:2])})
    assert reply.code == "OK" and matches(decode_response(reply.prediction), expected_answer(reference, pool[:2]))
