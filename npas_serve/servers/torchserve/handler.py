"""TorchServe handler: a thin adapter from TorchServe's worker to the npas-serve engine.

`initialize` builds the engine from the files packed in the .mar; `handle`
maps each request of a batch to `Engine.parse` -> `Engine.answers` and back.
All decisions (planning, validation, uncertainty) are the engine's. The .mar
names `npas_handler.py` beside this file, which subclasses `NpasHandler`.
"""
from __future__ import annotations

import json
import os

import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from npas_serve.engine import Engine, EngineConfig
from npas_serve.protocol import RequestError, encode_response
from npas_serve.servers.metrics import TorchServeSink, record
from npas_serve.servers.torchserve.archive import CONFIG


class NpasHandler(BaseHandler):
    def initialize(self, context):
        props = context.system_properties
        model_dir = props["model_dir"]
        with open(os.path.join(model_dir, CONFIG)) as f:
            config = EngineConfig(**json.load(f))
        gpu = props.get("gpu_id")
        if gpu is not None and torch.cuda.is_available():
            config.device = f"cuda:{gpu}"
        config.model_name = context.model_name
        config.model_version = str(context.manifest["model"].get("modelVersion", config.model_version))
        self.engine = Engine.load(model_dir, config)
        sink = TorchServeSink(context.metrics, context.model_name)
        self.engine.add_observer(lambda obs: record(sink, self.engine, obs))
        self.initialized = True

    def handle(self, data, context):
        return [self._one(i, row, context, alone=len(data) == 1) for i, row in enumerate(data)]

    def _one(self, idx: int, fields: dict, context, alone: bool) -> bytes:
        grpc_call = "body" not in fields           # HTTP puts the payload under `body`
        try:
            request = self.engine.parse(fields)
            stream = request.stream and grpc_call      # one refined answer per member/exit
            answers = self.engine.answers(request, intermediate=stream)
            final = next(answers)
            for final_next in answers:
                _send_intermediate(idx, encode_response(final, request.payload_format), context)
                final = final_next
            body = encode_response(final, request.payload_format)
        except RequestError as err:
            if alone:
                # TorchServe turns a worker-level 400 into gRPC INVALID_ARGUMENT / HTTP 400; a
                # per-request status inside a batch reaches HTTP clients only (archives use batch 1)
                raise PredictionException(f"{err.field}: {err}", 400) from None
            context.set_response_status(400, f"{err.field}: {err}", idx)
            body = json.dumps({"error": str(err), "field": err.field}).encode()
        if grpc_call:
            # gRPC stream clients need this on the last message; plain HTTP would hang with it
            context.set_response_header(idx, "ts_stream_next", "false")
        return body


def _send_intermediate(idx: int, payload: bytes, context) -> None:
    from ts.handler_utils.utils import send_intermediate_predict_response

    send_intermediate_predict_response({idx: payload}, {idx: context.request_ids[idx]},
                                       "Intermediate prediction", 200, context)
