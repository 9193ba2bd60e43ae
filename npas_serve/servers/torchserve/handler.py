"""TorchServe handler: a thin adapter from TorchServe's worker to the npas-serve engine.

`initialize` builds the engine from the files packed in the .mar; `handle`
maps each request of a batch to `Engine.parse` -> `Engine.answer` and back.
All decisions (planning, validation, uncertainty) are the engine's. The .mar
names `npas_handler.py` beside this file, which subclasses `NpasHandler`.

Every call gets exactly one answer, the final one: the worker cannot tell a unary
`Predictions` from `StreamPredictions` (see `calls`), and a second message to a unary
call costs the worker. The management API's describe is answered by the worker itself,
which is what readiness asks (`launcher.worker_answers`).
"""
from __future__ import annotations

import json
import os

import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from npas_serve.engine import Engine, EngineConfig
from npas_serve.protocol import RequestError, encode_response
from npas_serve.protocol.limits import deadline_passed
from npas_serve.servers.metrics import TorchServeSink, record
from npas_serve.servers.torchserve.archive import CONFIG
from npas_serve.servers.torchserve.calls import CallKind, call_kind


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
        kinds = [call_kind(context.get_all_request_header(i)) for i in range(len(data))]
        if kinds and kinds[0] is CallKind.DESCRIBE:      # TorchServe sends a describe alone
            return [self.describe()]
        return [self._one(i, row, context, kinds[i], alone=len(data) == 1) for i, row in enumerate(data)]

    def describe(self) -> bytes:
        """What the management API's `?customized=true` shows: proof that this worker answers."""
        limits = self.engine.limits
        return json.dumps({"model_name": self.engine.config.model_name,
                           "model_version": self.engine.config.model_version,
                           "members": list(limits.member_names), "num_exits": limits.num_exits,
                           "input_shape": list(limits.input_shape), "max_batch": limits.max_batch,
                           "max_payload_bytes": limits.payload_bytes}).encode()

    def _one(self, idx: int, fields: dict, context, kind: CallKind, alone: bool) -> bytes:
        try:
            request = self.engine.parse(fields)
            if deadline_passed(request.deadline_unix_ms):
                # the frontend hands over calls whose client has gone; nobody waits for this answer
                raise PredictionException("deadline_unix_ms: the deadline passed before the request "
                                          "was run; nothing was computed", 504)
            answer = self.engine.answer(request)
            body = encode_response(answer, request.payload_format)
        except RequestError as err:
            if alone:
                # TorchServe turns a worker-level 400 into gRPC INVALID_ARGUMENT / HTTP 400; a
                # per-request status inside a batch reaches HTTP clients only (archives use batch 1)
                raise PredictionException(f"{err.field}: {err}", 400) from None
            context.set_response_status(400, f"{err.field}: {err}", idx)
            body = json.dumps({"error": str(err), "field": err.field}).encode()
        if kind is CallKind.GRPC:
            # StreamPredictions needs it on its (only) message; over HTTP it would make the reply chunked
            context.set_response_header(idx, "ts_stream_next", "false")
        return body
