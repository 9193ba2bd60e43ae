"""`inference.GRPCInferenceService` (KServe v2 / Triton) over the embedded server's engine.

The messages and the servicer base are the stubs `tritonclient` ships, so the wire is
exactly the one Triton's and KServe's clients speak. Each RPC only translates
(`tensors`) and hands the request to the same `Engine.parse` and engine queue the
TorchServe API uses. `ModelStreamInfer` answers like a Triton decoupled model: one
response per refined answer (member or exit), the last with `final`, errors in-band, and the
requests of one stream run concurrently.
"""
from __future__ import annotations

import asyncio
import logging
from importlib import metadata
from typing import Any, AsyncIterator

import grpc
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc as pb_grpc

from npas_serve.engine import DeadlineExceeded, Engine, ResourceExhausted
from npas_serve.protocol.request import RequestError
from npas_serve.protocol.response import InferenceResponse
from npas_serve.servers.answers import awaited_answers
from npas_serve.servers.v2.model import SERVER_NAME, Model, ModelNotFound
from npas_serve.servers.v2.tensors import Tensor, V2Request, outputs, request_fields, response_parameters

log = logging.getLogger(__name__)
# Triton's decoupled-stream flags: asked for by the client, set on every streamed response
FINAL_ASKED, FINAL_FLAG = "triton_enable_empty_final_response", "triton_final_response"
# which typed `contents` field holds a datatype's values (FP16 only travels raw)
_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents"}


class V2Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """Health, metadata and inference as coroutines on the server's loop (a waiting call holds no
    thread); the RPCs Triton has beyond these stay UNIMPLEMENTED."""

    def __init__(self, engine: Engine, model: Model):
        self.engine, self.model = engine, model

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.engine.ready())

    async def ModelReady(self, request, context):
        try:
            self.model.route(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.engine.ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=metadata.version("npas-serve"))

    async def ModelMetadata(self, request, context):
        try:
            self.model.route(request.name, request.version)
        except ModelNotFound as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{err.field}: {err}")
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.model.name, versions=[self.model.version], platform=SERVER_NAME,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in self.model.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in self.model.outputs])

    async def ModelInfer(self, request, context):
        try:
            v2, req = self._parse(request, stream=False)
        except RequestError as err:
            await context.abort(_code(err), f"{err.field}: {err}")
        try:
            async for answer in awaited_answers(self.engine, req, intermediate=False):
                return self._response(answer, v2, None)
        except DeadlineExceeded as err:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(err))
        except ResourceExhausted as err:     # refused at admission: the queue is full or too long
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except Exception as err:             # the batch failed (its requests all say so)
            log.error("ModelInfer %r failed: %r", v2.id, err)
            await context.abort(grpc.StatusCode.INTERNAL, f"the engine failed: {err}")

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Every request on the stream runs at once, as on Triton (so they can share batches): each one's
        refined answers go out as they exist, in order per request (ids tell requests apart); a failed
        request is answered in-band and the stream goes on. A call that ends drops the work left."""
        out: asyncio.Queue = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def answer(request) -> None:
            async for response in self._stream_responses(request):
                out.put_nowait(response)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                await asyncio.gather(*running)
            finally:
                out.put_nowait(None)         # the stream's end

        reader = asyncio.create_task(read())
        try:
            while (response := await out.get()) is not None:
                yield response
        finally:
            for task in (reader, *running):
                task.cancel()

    async def _stream_responses(self, request) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One streamed request's responses: its answers, or the error that ended it."""
        try:
            v2, req = self._parse(request, stream=True)
        except RequestError as err:
            yield pb.ModelStreamInferResponse(error_message=f"{err.field}: {err}")
            return
        flag = _value(request.parameters[FINAL_ASKED]) if FINAL_ASKED in request.parameters else False
        try:
            async for answer in awaited_answers(self.engine, req, intermediate=True):
                yield pb.ModelStreamInferResponse(
                    infer_response=self._response(answer, v2, answer.final if flag else None))
        except (DeadlineExceeded, ResourceExhausted) as err:
            yield pb.ModelStreamInferResponse(error_message=str(err))
        except Exception as err:             # the batch failed; the stream goes on
            log.error("ModelStreamInfer %r failed: %r", v2.id, err)
            yield pb.ModelStreamInferResponse(error_message=f"the engine failed: {err}")

    # --- translation ----------------------------------------------------------------------------
    def _parse(self, request: pb.ModelInferRequest, stream: bool):
        self.model.route(request.model_name, request.model_version)
        params = {k: _value(v) for k, v in request.parameters.items() if not (stream and k == FINAL_ASKED)}
        raws = list(request.raw_input_contents)
        if raws and len(raws) != len(request.inputs):
            raise RequestError("raw_input_contents", f"raw_input_contents holds {len(raws)} tensors for "
                                                     f"{len(request.inputs)} inputs; send one per input, or none.")
        inputs = tuple(Tensor(t.name, t.datatype, tuple(t.shape), raw=raws[i] if raws else None,
                              values=_contents(t) if not raws else None)
                       for i, t in enumerate(request.inputs))
        v2 = V2Request(request.model_name, request.model_version, request.id, inputs, params,
                       tuple(o.name for o in request.outputs))
        return v2, self.engine.parse(request_fields(v2, self.engine.limits))

    def _response(self, answer: InferenceResponse, v2: V2Request, final: bool | None) -> pb.ModelInferResponse:
        resp = pb.ModelInferResponse(model_name=self.model.name, model_version=self.model.version, id=v2.id)
        for out in outputs(answer, v2.outputs):
            resp.outputs.add(name=out.name, datatype=out.datatype, shape=out.array.shape)
            resp.raw_output_contents.append(out.array.tobytes())
        params = response_parameters(answer)
        if final is not None:
            params[FINAL_FLAG] = final
        for name, value in params.items():
            _set(resp.parameters[name], value)
        return resp


def _code(err: RequestError) -> grpc.StatusCode:
    return grpc.StatusCode.NOT_FOUND if isinstance(err, ModelNotFound) else grpc.StatusCode.INVALID_ARGUMENT


def _value(param: pb.InferParameter) -> Any:
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)


def _set(param: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def _contents(tensor: pb.ModelInferRequest.InferInputTensor):
    """The typed values of the tensor's datatype, or None when it sent none."""
    if not tensor.HasField("contents") or tensor.datatype not in _CONTENTS:
        return None
    return getattr(tensor.contents, _CONTENTS[tensor.datatype])


def add_v2_servicer(server: grpc.aio.Server, engine: Engine, model_name: str, model_version: str) -> None:
    """Register the v2 service on a gRPC server that already serves TorchServe's API for `engine`."""
    model = Model.of(model_name, model_version, engine.limits, engine.manifest.num_classes)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(V2Servicer(engine, model), server)
