"""TorchServe handler: a thin adapter from TorchServe's worker to the npas-serve engine.

`initialize` builds the engine from the files packed in the .mar; `handle`
parses each request of TorchServe's batch (`Engine.parse`), hands the valid ones to
the engine as one batch (`Engine.answer_batch`) and encodes each answer or error back.
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

from npas_serve.engine import DeadlineExceeded, Engine, EngineConfig, ResourceExhausted
from npas_serve.protocol import InferenceRequest, RequestError, encode_response
from npas_serve.servers.heap import freeze_loaded
from npas_serve.servers.metrics import TorchServeSink, record
from npas_serve.servers.torchserve.archive import CONFIG
from npas_serve.servers.torchserve.calls import CallKind, call_kind


# the gRPC status a refusal stands for, by the HTTP status the handler gives it
GRPC_CODES = {400: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 504: "DEADLINE_EXCEEDED", 500: "INTERNAL"}
# the statuses TorchServe's gRPC frontend turns into these codes when a worker raises them; any other
# refusal travels in-band (status and body) even when the request is alone
WORKER_CODES = (400, 504, 500)


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
        self.sink = TorchServeSink(context.metrics, context.model_name)
        self.engine.add_observer(lambda obs: record(self.sink, self.engine, obs))
        freeze_loaded()                 # the loaded engine is never scanned again (servers/heap.py)
        self.initialized = True

    def handle(self, data, context):
        try:
            return self._handle(data, context)
        finally:
            self.sink.flush_soon()              # this batch's metrics, beside the next batch

    def _handle(self, data, context):
        kinds = [call_kind(context.get_all_request_header(i)) for i in range(len(data))]
        if kinds and kinds[0] is CallKind.DESCRIBE:      # TorchServe sends a describe alone
            return [self.describe()]
        alone = len(data) == 1
        requests, bodies = {}, {}
        for i, row in enumerate(data):          # each request's own refusal in its place
            try:
                requests[i] = self.engine.parse(row)
            except (RequestError, PredictionException) as err:
                bodies[i] = self._refusal(i, err, context, alone)
        # one call: the engine runs them as one batch, each member once for all
        for i, answer in zip(requests, self.engine.answer_batch(list(requests.values()))):
            if isinstance(answer, BaseException):
                bodies[i] = self._refusal(i, self._failure(answer), context, alone)
            else:
                bodies[i] = encode_response(answer, requests[i].payload_format)
        for i, kind in enumerate(kinds):
            if kind is CallKind.GRPC:
                # StreamPredictions needs it on its (only) message; over HTTP it would make the reply chunked
                context.set_response_header(i, "ts_stream_next", "false")
        return [bodies[i] for i in range(len(data))]

    def describe(self) -> bytes:
        """What the management API's `?customized=true` shows: proof that this worker answers."""
        limits = self.engine.limits
        return json.dumps({"model_name": self.engine.config.model_name,
                           "model_version": self.engine.config.model_version,
                           "members": list(limits.member_names), "num_exits": limits.num_exits,
                           "input_shape": list(limits.input_shape), "max_batch": limits.max_batch,
                           "max_payload_bytes": limits.payload_bytes}).encode()

    @staticmethod
    def _failure(error: BaseException) -> PredictionException:
        if isinstance(error, DeadlineExceeded):
            return PredictionException(str(error), 504)
        if isinstance(error, ResourceExhausted):
            return PredictionException(str(error), 429)
        return PredictionException(f"the engine failed: {error}", 500)

    @staticmethod
    def _refusal(idx: int, err: RequestError | PredictionException, context, alone: bool) -> bytes:
        """Alone, the worker-level status (TorchServe turns a 400 into gRPC INVALID_ARGUMENT, a 504
        into DEADLINE_EXCEEDED); inside a batch, or for a code TorchServe does not map (429
        RESOURCE_EXHAUSTED), a per-request status (it reaches HTTP clients) and an error body."""
        if isinstance(err, RequestError):
            code, message, body = 400, f"{err.field}: {err}", {"error": str(err), "field": err.field}
        else:
            code, message, body = err.error_code, err.message, {"error": err.message}
        # TorchServe's gRPC frontend drops a per-request status: the body names the gRPC code
        body["code"] = GRPC_CODES.get(code, "INTERNAL")
        if alone and code in WORKER_CODES:
            raise PredictionException(message, code) from None
        context.set_response_status(code, message, idx)
        return json.dumps(body).encode()
