"""The embedded server: TorchServe's gRPC inference API on grpcio, over the same engine.

Quick start without Java: `npas-serve serve runs/default`. It adds what
TorchServe has elsewhere: the standard gRPC health service, Prometheus
`/metrics` on its own port, and a graceful shutdown on SIGTERM (stop taking
requests, finish the in-flight ones, exit).
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
from concurrent import futures
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from npas_serve.engine import DeadlineExceeded, Engine, ResourceExhausted
from npas_serve.errors import UserError
from npas_serve.protocol import InferenceRequest, InferenceResponse, RequestError, encode_response
from npas_serve.protocol._generated import inference_pb2, inference_pb2_grpc
from npas_serve.servers.answers import awaited_answers
from npas_serve.servers.heap import freeze_loaded
from npas_serve.servers.engine_process import EngineProcess
from npas_serve.servers.metrics import serve_metrics
from npas_serve.servers.v2.grpc_service import add_v2_servicer
from npas_serve.servers.v2.rest import start_rest_server

log = logging.getLogger(__name__)
SERVICE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"


class InferenceServicer(inference_pb2_grpc.InferenceAPIsServiceServicer):
    """One short coroutine per RPC; the engine decides everything.

    A waiting call holds no thread: it awaits its answers, which the engine's device
    thread hands to the event loop. A call that ends early (cancelled, gRPC deadline)
    is cancelled at that await, and its request is dropped from the engine's queue or batch.
    """

    def __init__(self, engine: Engine, model_name: str, model_version: str):
        self.engine, self.model_name, self.model_version = engine, model_name, model_version

    async def Ping(self, request, context):
        status = "Healthy" if self.engine.ready() else "Unhealthy"
        return inference_pb2.TorchServeHealthResponse(health=json.dumps({"status": status}))

    async def Predictions(self, request, context):
        req = await self._parse(request, context)
        async for answer in self._answers(req, context, intermediate=False):
            return self._reply(answer, req)

    async def StreamPredictions(self, request, context):
        """Refined answers only when the request asks for them (`stream`); otherwise the final one alone."""
        req = await self._parse(request, context)
        async for answer in self._answers(req, context, intermediate=req.stream):
            yield self._reply(answer, req)

    async def StreamPredictions2(self, request_iterator, context):
        """Refused in-band, one message per request, as TorchServe 0.12 refuses it without sequence batching."""
        from google.rpc import status_pb2

        refusal = status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0],
                                    message="StreamPredictions2 is not served (no sequence batching); use "
                                            "Predictions, or StreamPredictions with stream=true")
        async for _ in request_iterator:
            yield inference_pb2.PredictionResponse(status=refusal)

    async def _parse(self, request, context) -> InferenceRequest:
        # routing errors as TorchServe 0.12's frontend gives them, so a client sees one behaviour
        if request.model_name != self.model_name:
            await context.abort(grpc.StatusCode.INTERNAL, f"Model not found: {request.model_name} "
                                                          f"(this server serves '{self.model_name}')")
        if request.model_version not in ("", self.model_version):
            await context.abort(grpc.StatusCode.INTERNAL, f"Model version: {request.model_version} does not "
                                                          f"exist for model: {self.model_name} "
                                                          f"(it has '{self.model_version}')")
        try:
            req = self.engine.parse(dict(request.input))
        except RequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{err.field}: {err}")
        if context.cancelled():                # the caller gave up before the call was run
            await context.abort(grpc.StatusCode.CANCELLED, "the call ended before it was run")
        return req

    async def _answers(self, req: InferenceRequest, context, intermediate: bool) -> AsyncIterator[InferenceResponse]:
        """The engine's answers to one request (`awaited_answers`), its errors as gRPC statuses."""
        try:
            async for answer in awaited_answers(self.engine, req, intermediate):
                yield answer
        except DeadlineExceeded as err:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(err))
        except ResourceExhausted as err:     # refused at admission: the queue is full or too long
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except Exception as err:             # the batch failed (its requests all say so)
            log.error("request failed: %r", err)
            await context.abort(grpc.StatusCode.INTERNAL, f"the engine failed: {err}")

    @staticmethod
    def _reply(answer, req):
        return inference_pb2.PredictionResponse(prediction=encode_response(answer, req.payload_format))


def create_server(engine: Engine | EngineProcess, host: str = "127.0.0.1", port: int = 7070, model_name: str = "npas",
                  model_version: str = "1", workers: int = 8) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A grpc.aio server, not started, and the port it bound (pass port 0 for any free port).

    Call it inside the event loop that will run it. `workers` threads run only the services
    written as plain functions; the inference service's coroutines run on the loop.
    """
    # bigger messages are refused by grpcio itself, before any Python work
    limit = engine.limits.payload_bytes + 64 * 1024     # room for the request envelope
    # no SO_REUSEPORT: a second server on a busy port fails instead of taking half its connections
    server = grpc.aio.server(futures.ThreadPoolExecutor(max_workers=workers),
                             options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)])
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(
        InferenceServicer(engine, model_name, model_version), server)
    add_v2_servicer(server, engine, model_name, model_version)     # KServe v2 / Triton, same port and engine
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:               # grpcio >= 1.5x raises where older versions returned 0
        bound = 0
    if bound == 0:
        raise UserError(f"cannot bind gRPC to {host}:{port}: the port is in use or the address is not "
                        f"this machine's; choose another --grpc-port or --host")
    return server, bound, health_servicer


async def _follow_engine(engine: Engine | EngineProcess, health_servicer: health.aio.HealthServicer,
                         every_s: float = 0.5) -> None:
    """Health follows the engine: NOT_SERVING once it stops taking work (its process or its device
    thread died), so an orchestrator replaces the server instead of sending it calls that fail."""
    while engine.ready():
        await asyncio.sleep(every_s)
    log.error("the engine stopped: health is NOT_SERVING")
    for service in ("", SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)


def serve(engine: Engine | EngineProcess, host: str = "127.0.0.1", grpc_port: int = 7070,
          metrics_port: int | None = 8082, model_name: str = "npas", model_version: str = "1",
          grace_s: float = 30.0, http_port: int | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain: health says NOT_SERVING, in-flight requests finish.
    With `http_port`, the v2 REST endpoints are served there too. `metrics_port` None: the engine
    serves its metrics itself (an `EngineProcess`, in its own process)."""
    asyncio.run(_serve(engine, host, grpc_port, metrics_port, model_name, model_version, grace_s, http_port))


async def _serve(engine: Engine | EngineProcess, host: str, grpc_port: int, metrics_port: int | None,
                 model_name: str, model_version: str, grace_s: float, http_port: int | None) -> None:
    server = metrics = None
    if isinstance(engine, EngineProcess):
        engine.read_on(asyncio.get_running_loop())     # the answers come to the loop their calls wait on
    try:
        server, port, health_servicer = create_server(engine, host, grpc_port, model_name, model_version)
        if metrics_port is not None:
            metrics = serve_metrics(engine, model_name, host, metrics_port)
        rest = None if http_port is None else start_rest_server(engine, model_name, model_version, host, http_port)
    except UserError:              # a port is taken: release what did start (its port too), then the engine
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        if server is not None:
            await server.stop(None)
        engine.close()
        raise
    freeze_loaded()                # everything loaded so far is never scanned again (servers/heap.py)
    await server.start()
    for service in ("", SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    shown_metrics_port = engine.metrics_port if metrics is None else metrics.server_port
    print(f"serving '{model_name}' on {host}:{port} (gRPC), metrics on "
          f"http://{host}:{shown_metrics_port}/metrics"
          + ("" if rest is None else f", v2 REST on http://{host}:{rest.server_address[1]}/v2"), flush=True)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    watching = asyncio.create_task(_follow_engine(engine, health_servicer))
    await stopping.wait()
    watching.cancel()
    log.info("signal: draining")
    await health_servicer.enter_graceful_shutdown()
    if rest is not None:
        rest.shutdown()            # stops taking requests; in-flight ones finish on their threads
    await server.stop(grace_s)     # refuses new RPCs, waits for in-flight ones
    if metrics is not None:
        metrics.shutdown()
    engine.close()
    print("stopped", flush=True)
