"""gRPC client for TorchServe and the embedded server (same API, same calls).

Token auth: TorchServe 0.12 enables it by default. Its gRPC interceptor reads
the metadata key `authorization`, which must match `Bearer <token>`, and
answers PERMISSION_DENIED otherwise; the inference port wants the
"inference" key from the `key_file.json` that TorchServe writes into its
working directory at start-up (the management port wants the "management" key).

    with Client("127.0.0.1:7070", token=key) as client:
        answer = client.predict(x, ensemble_size=3, latency_budget_ms=20)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import numpy as np

from npas_serve.protocol.response import InferenceResponse, decode_response, encode_request


class ClientError(RuntimeError):
    """A call that did not succeed; `code` is the gRPC status name, e.g. INVALID_ARGUMENT."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class Client:
    def __init__(self, target: str = "127.0.0.1:7070", model_name: str = "npas",
                 model_version: str | None = None, token: str | Callable[[], str] | None = None,
                 timeout: float = 30.0, credentials=None):
        """`credentials`: grpc.ChannelCredentials for TLS; None means plaintext.

        `token` may be a callable that reads the key (e.g. from TorchServe's key_file.json): it is
        called for every call, so a key renewed on the server is picked up.
        """
        import grpc  # lazy: the rest of npas_serve works without it

        from npas_serve.protocol import inference_pb2_grpc

        self.model_name, self.model_version, self.timeout = model_name, model_version or "", timeout
        self._token = token
        self._channel = (grpc.secure_channel(target, credentials) if credentials
                         else grpc.insecure_channel(target))
        self._stub = inference_pb2_grpc.InferenceAPIsServiceStub(self._channel)

    def ping(self) -> str:
        """The server's health status, e.g. "Healthy" (TorchServe sends it as JSON)."""
        from google.protobuf import empty_pb2

        health = self._call(self._stub.Ping, empty_pb2.Empty()).health
        try:
            return str(json.loads(health)["status"])
        except (ValueError, KeyError, TypeError):
            return health

    def predict(self, inputs: np.ndarray, *, fmt: str = "json", **knobs) -> InferenceResponse:
        """One answer for a batch `inputs` of shape (B, *input_shape); knobs as in docs/design.md (Serving contract)."""
        reply = self._call(self._stub.Predictions, self._request(inputs, fmt, knobs))
        return decode_reply(reply)

    def stream(self, inputs: np.ndarray, *, fmt: str = "json", **knobs) -> Iterator[InferenceResponse]:
        """Refined answers as each member/exit finishes; the last has final=True."""
        import grpc

        call = self._stub.StreamPredictions(self._request(inputs, fmt, {**knobs, "stream": True}),
                                            timeout=self.timeout, metadata=self._metadata)
        try:
            for reply in call:
                yield decode_reply(reply)
        except grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details() or "") from None
        finally:
            call.cancel()  # no-op when finished; stops the server when the caller breaks early

    @property
    def _metadata(self) -> tuple:
        token = self._token() if callable(self._token) else self._token
        return (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, inputs, fmt: str, knobs: dict):
        return prediction_request(self.model_name, self.model_version, inputs, fmt, knobs)

    def _call(self, method, request):
        import grpc

        metadata = self._metadata
        try:
            return method(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            denied = exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
            if not (denied and callable(self._token) and self._metadata != metadata):
                raise ClientError(exc.code().name, exc.details() or "") from None
        # the key was renewed between reading it and the server checking it: once more with the new one
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details() or "") from None


class AsyncClient:
    """The same unary call on asyncio (grpc.aio): many calls in flight on one thread, which is what a
    load generator or an async application wants. `token`: a string, or a callable read for every call.

        async with AsyncClient("127.0.0.1:7070") as client:
            answer = await client.predict(x, ensemble_size=3)
    """

    def __init__(self, target: str = "127.0.0.1:7070", model_name: str = "npas",
                 model_version: str | None = None, token: str | Callable[[], str] | None = None,
                 timeout: float = 30.0, credentials=None):
        import grpc

        from npas_serve.protocol import inference_pb2_grpc

        self.model_name, self.model_version, self.timeout = model_name, model_version or "", timeout
        self._token = token
        self._channel = (grpc.aio.secure_channel(target, credentials) if credentials
                         else grpc.aio.insecure_channel(target))
        self._stub = inference_pb2_grpc.InferenceAPIsServiceStub(self._channel)

    async def predict(self, inputs: np.ndarray, *, fmt: str = "json", **knobs) -> InferenceResponse:
        import grpc

        token = self._token() if callable(self._token) else self._token
        request = prediction_request(self.model_name, self.model_version, inputs, fmt, knobs)
        try:
            reply = await self._stub.Predictions(request, timeout=self.timeout,
                                                 metadata=(("authorization", f"Bearer {token}"),) if token else ())
        except grpc.aio.AioRpcError as exc:
            raise ClientError(exc.code().name, exc.details() or "") from None
        return decode_reply(reply)

    async def connect(self, timeout: float | None = None) -> None:
        """Open the connection now (TCP and HTTP/2 set up), so the first call does not pay for it;
        ClientError UNAVAILABLE if the server does not accept it within `timeout` (default: the
        client's)."""
        import asyncio

        try:
            await asyncio.wait_for(self._channel.channel_ready(), self.timeout if timeout is None else timeout)
        except asyncio.TimeoutError:
            raise ClientError("UNAVAILABLE", "the server did not accept a connection in time") from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def prediction_request(model_name: str, model_version: str, inputs, fmt: str, knobs: dict):
    """A PredictionsRequest; with a deadline, the send time goes too, so the server keeps as long for
    the answer's way back as the request's way in took."""
    from npas_serve.protocol import inference_pb2

    if knobs.get("deadline_unix_ms") is not None and knobs.get("sent_unix_ms") is None:
        knobs = {**knobs, "sent_unix_ms": round(time.time() * 1000, 3)}
    return inference_pb2.PredictionsRequest(model_name=model_name, model_version=model_version,
                                            input={"data": encode_request(inputs, fmt, **knobs)})


def decode_reply(reply) -> InferenceResponse:
    """The answer in a PredictionResponse, or the ClientError its status or error body carries."""
    if reply.HasField("status") and reply.status.code != 0:  # per-message error (StreamPredictions2 style)
        import grpc

        names = {code.value[0]: code.name for code in grpc.StatusCode}
        raise ClientError(names.get(reply.status.code, str(reply.status.code)), reply.status.message)
    try:
        return decode_response(reply.prediction)
    except ValueError as exc:
        error = _error_body(reply.prediction)
        if error is not None:
            raise ClientError(*error) from None
        raise ClientError("UNKNOWN", f"undecodable answer: {exc}") from None


def _error_body(payload: bytes) -> tuple[str, str] | None:
    """(gRPC code, message) of a handler's per-request refusal, {"error": ..., "field": ..., "code": ...}
    (the code is INVALID_ARGUMENT when the body does not name one).

    TorchServe's gRPC frontend drops the per-request status a handler sets
    (only a whole-batch failure becomes a gRPC status), so a refusal of one
    request in a batch can only travel as an OK reply with this body.
    """
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return None
    code = body["code"] if isinstance(body.get("code"), str) else "INVALID_ARGUMENT"
    return code, f"{body['field']}: {body['error']}" if isinstance(body.get("field"), str) else body["error"]
