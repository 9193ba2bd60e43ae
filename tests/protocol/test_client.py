"""Client against an in-process gRPC server speaking TorchServe's API.

The fake server checks the token the way TorchServe 0.12's GRPCInterceptor
does (metadata `authorization: Bearer <token>`, else PERMISSION_DENIED).
"""

import asyncio
import json
import re
from concurrent import futures

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from npas_serve.client import AsyncClient, Client, ClientError  # noqa: E402
from npas_serve.protocol import (InferenceResponse, RequestError, RequestLimits, encode_response,  # noqa: E402
                                 inference_pb2, inference_pb2_grpc, parse_request)
from tests.support.servers import free_port  # noqa: E402

LIMITS = RequestLimits(input_shape=(1, 4), member_names=("m0", "m1"), num_exits=2)
TOKEN = "s3cret"


def answer(req, final=True, members=("m0", "m1")) -> InferenceResponse:
    b = req.inputs.shape[0]
    return InferenceResponse(
        request_id=req.request_id, model_name="npas", model_version="1.0", mode=req.mode,
        predictions=[0] * b, probabilities=np.full((b, 2), 0.5, np.float32), entropy=[0.69] * b,
        disagreement=[0.0] * b, members_used=list(members), exit_reached=None, plan=["m0", "m1"],
        latency_ms=1.0, budget_ms=req.budget_ms,
        budget_met=None if req.budget_ms is None else True, final=final)


class Servicer(inference_pb2_grpc.InferenceAPIsServiceServicer):
    def Ping(self, request, context):
        return inference_pb2.TorchServeHealthResponse(health='{\n  "status": "Healthy"\n}')

    def _parse(self, request, context):
        assert request.model_name in ("npas", "batched")
        try:
            return parse_request(dict(request.input), LIMITS)
        except RequestError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{exc.field}: {exc}")

    def Predictions(self, request, context):
        if request.model_name == "batched":  # TorchServe: per-request refusals arrive as OK + error body
            try:
                parse_request(dict(request.input), LIMITS)
            except RequestError as exc:
                body = json.dumps({"error": str(exc), "field": exc.field}).encode()
                return inference_pb2.PredictionResponse(prediction=body)
        req = self._parse(request, context)
        return inference_pb2.PredictionResponse(prediction=encode_response(answer(req), req.payload_format))

    def StreamPredictions(self, request, context):
        req = self._parse(request, context)
        assert req.stream
        yield inference_pb2.PredictionResponse(
            prediction=encode_response(answer(req, final=False, members=("m0",)), req.payload_format))
        yield inference_pb2.PredictionResponse(prediction=encode_response(answer(req), req.payload_format))


class TokenCheck(grpc.ServerInterceptor):
    def intercept_service(self, continuation, details):
        header = dict(details.invocation_metadata).get("authorization", "")
        match = re.fullmatch(r"Bearer\s+(\S+)", header)
        if match and match.group(1) == TOKEN:
            return continuation(details)

        def deny(request, context):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "Token Authorization failed.")
        streaming = details.method.endswith("/StreamPredictions")
        return (grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler)(deny)


@pytest.fixture(scope="module")
def target():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[TokenCheck()])
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_ping(target):
    with Client(target, token=TOKEN, timeout=5) as client:
        assert client.ping() == "Healthy"


@pytest.mark.parametrize("fmt", ["json", "protobuf"])
def test_predict(target, fmt):
    x = np.zeros((3, 1, 4))
    with Client(target, token=TOKEN, timeout=5) as client:
        resp = client.predict(x, fmt=fmt, ensemble_size=2, latency_budget_ms=10, request_id="t-1")
    assert resp.request_id == "t-1" and resp.probabilities.shape == (3, 2) and resp.budget_met is True


def test_bad_request_is_invalid_argument(target):
    with Client(target, token=TOKEN, timeout=5) as client, pytest.raises(ClientError) as info:
        client.predict(np.zeros((1, 1, 4)), ensemble_size=9)
    assert info.value.code == "INVALID_ARGUMENT" and info.value.details.startswith("ensemble_size")


def test_error_body_is_invalid_argument(target):
    with Client(target, model_name="batched", token=TOKEN, timeout=5) as client, pytest.raises(ClientError) as info:
        client.predict(np.zeros((1, 1, 4)), exit=7)
    assert info.value.code == "INVALID_ARGUMENT" and info.value.details.startswith("exit: exit 7")


def test_stream_yields_refinements_then_final(target):
    with Client(target, token=TOKEN, timeout=5) as client:
        answers = list(client.stream(np.zeros((2, 1, 4)), fmt="protobuf"))
    assert [a.final for a in answers] == [False, True]
    assert [a.members_used for a in answers] == [["m0"], ["m0", "m1"]]


@pytest.mark.parametrize("token", [None, "wrong"])
def test_token_is_required(target, token):
    with Client(target, token=token, timeout=5) as client:
        for call in (client.ping, lambda: client.predict(np.zeros((1, 1, 4))),
                     lambda: list(client.stream(np.zeros((1, 1, 4))))):
            with pytest.raises(ClientError) as info:
                call()
            assert info.value.code == "PERMISSION_DENIED"


def test_stream_error_is_client_error(target):
    with Client(target, token=TOKEN, timeout=5) as client, pytest.raises(ClientError) as info:
        list(client.stream(np.zeros((1, 1, 5))))
    assert info.value.code == "INVALID_ARGUMENT" and "inputs" in info.value.details


def test_unreachable_server():
    with Client("127.0.0.1:1", timeout=1) as client, pytest.raises(ClientError) as info:
        client.ping()
    assert info.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_async_client_connects_before_its_first_call(target):
    async def connected_then_predict():
        async with AsyncClient(target, token=TOKEN, timeout=5) as client:
            await client.connect()
            return await client.predict(np.zeros((1, 1, 4)), request_id="a-1")
    assert asyncio.run(connected_then_predict()).request_id == "a-1"


def test_async_client_connect_to_nothing_is_unavailable():
    async def connect():
        async with AsyncClient(f"127.0.0.1:{free_port()}", timeout=0.5) as client:
            await client.connect()
    with pytest.raises(ClientError) as info:
        asyncio.run(connect())
    assert info.value.code == "UNAVAILABLE"
