"""The v2 REST endpoints (KServe / Triton HTTP) on the standard library's threaded HTTP server.

Routes: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/NAME[/versions/V][/ready];
POST /v2/models/NAME[/versions/V]/infer. Bodies are JSON, or JSON followed by binary tensor
data (Triton's binary extension, `Inference-Header-Content-Length`), which `tritonclient.http`
sends by default. Errors are v2's form: a status and `{"error": "FIELD: message"}` (400 a bad
request, 404 an unknown model or path, 429 refused at admission, 504 the deadline passed before
any answer, 500 the engine failed).
"""
from __future__ import annotations

import json
import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from typing import Any

from npas_serve.engine import DeadlineExceeded, Engine, ResourceExhausted
from npas_serve.errors import UserError
from npas_serve.protocol.request import RequestError
from npas_serve.protocol.response import InferenceResponse
from npas_serve.servers.v2.model import SERVER_NAME, Model, ModelNotFound
from npas_serve.servers.v2.tensors import Tensor, V2Request, outputs, request_fields, response_parameters

log = logging.getLogger(__name__)
HEADER_LENGTH = "Inference-Header-Content-Length"
ENVELOPE_BYTES = 64 * 1024              # a request's JSON beyond its tensor data
_MODEL = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")


class _Refusal(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class V2Handler(BaseHTTPRequestHandler):
    """One request per call; the class attributes are set by `create_rest_server`."""

    protocol_version = "HTTP/1.1"       # keep-alive: tritonclient.http reuses its connections
    engine: Engine
    model: Model

    def do_GET(self):
        self._handle(self._get)

    def do_POST(self):
        self._handle(self._post)

    def log_message(self, format, *args):   # noqa: A002 (the base class's name) - quiet by default
        log.debug("%s " + format, self.address_string(), *args)

    # --- routes -------------------------------------------------------------------------------
    def _get(self) -> tuple[HTTPStatus, dict]:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v2/health/live":
            return HTTPStatus.OK, {"live": True}
        if path == "/v2/health/ready":
            ready = self.engine.ready()
            return (HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE), {"ready": ready}
        if path == "/v2":
            return HTTPStatus.OK, {"name": SERVER_NAME, "version": metadata.version("npas-serve"),
                                   "extensions": ["binary_tensor_data"]}
        name, version, action = self._model_path(path)
        if action == "/ready":
            ready = self.engine.ready()
            return (HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE), {"name": name, "ready": ready}
        if action is None:
            return HTTPStatus.OK, self._metadata()
        raise _Refusal(HTTPStatus.METHOD_NOT_ALLOWED, f"{path}: use POST")

    def _post(self) -> tuple[HTTPStatus, Any]:
        body = self._body()                 # read first: a refused request must not leave its body unread
        path = self.path.split("?", 1)[0].rstrip("/")
        name, version, action = self._model_path(path)
        if action != "/infer":
            raise _Refusal(HTTPStatus.METHOD_NOT_ALLOWED, f"{path}: POST goes to .../infer")
        header, binary = self._split(body)
        v2, binary_out = _request(header, binary, name, version or "")
        req = self.engine.parse(request_fields(v2, self.engine.limits))
        return HTTPStatus.OK, (self.engine.answer(req), v2, binary_out)

    # --- plumbing -----------------------------------------------------------------------------
    def _handle(self, route) -> None:
        try:
            status, result = route()
        except ModelNotFound as err:
            status, result = HTTPStatus.NOT_FOUND, {"error": f"{err.field}: {err}"}
        except RequestError as err:
            status, result = HTTPStatus.BAD_REQUEST, {"error": f"{err.field}: {err}"}
        except _Refusal as err:
            status, result = err.status, {"error": str(err)}
        except ResourceExhausted as err:    # refused at admission: the queue is full or too long
            status, result = HTTPStatus.TOO_MANY_REQUESTS, {"error": str(err)}
        except DeadlineExceeded as err:     # the deadline passed before any answer (gRPC: DEADLINE_EXCEEDED)
            status, result = HTTPStatus.GATEWAY_TIMEOUT, {"error": str(err)}
        except Exception as err:            # the engine failed this request; the server goes on
            log.exception("v2 REST %s %s failed", self.command, self.path)
            status, result = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(err).__name__}: {err}"}
        if isinstance(result, tuple):
            self._send_answer(*result)
        else:
            self._send(status, json.dumps(result).encode())

    def _model_path(self, path: str) -> tuple[str, str | None, str | None]:
        match = _MODEL.match(path)
        if match is None:
            raise _Refusal(HTTPStatus.NOT_FOUND, f"{path[:80]}: no such v2 endpoint")
        name, version, action = match.groups()
        self.model.route(name, version or "")
        return name, version, action

    def _metadata(self) -> dict:
        tensor = lambda t: {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}   # noqa: E731
        return {"name": self.model.name, "versions": [self.model.version], "platform": SERVER_NAME,
                "inputs": [tensor(t) for t in self.model.inputs],
                "outputs": [tensor(t) for t in self.model.outputs]}

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise _Refusal(HTTPStatus.LENGTH_REQUIRED, "Content-Length: send the body's length")
        limit = self.engine.limits.payload_bytes + ENVELOPE_BYTES
        if int(length) > limit:
            self.close_connection = True     # the body is left unread
            raise _Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"Content-Length: the body is {length} bytes, over the limit of {limit}; "
                           "send a smaller batch")
        return self.rfile.read(int(length))

    def _split(self, body: bytes) -> tuple[dict, memoryview]:
        size = self.headers.get(HEADER_LENGTH)
        if size is not None and (not size.isdigit() or int(size) > len(body)):
            raise RequestError(HEADER_LENGTH, f"{HEADER_LENGTH} {size[:20]!r} is not the length of the "
                                              "JSON at the start of the body.")
        cut = len(body) if size is None else int(size)
        try:
            header = json.loads(body[:cut])
        except (ValueError, RecursionError) as err:
            raise RequestError("body", f"the request is not valid JSON: {err}") from None
        if not isinstance(header, dict):
            raise RequestError("body", "the request must be a JSON object with 'inputs'.")
        return header, memoryview(body)[cut:]

    def _send_answer(self, answer: InferenceResponse, v2: V2Request, binary: dict[str, bool]) -> None:
        tensors, tail = [], []
        for out in outputs(answer, v2.outputs):
            entry = {"name": out.name, "datatype": out.datatype, "shape": list(out.array.shape)}
            if binary.get(out.name, binary.get("", False)):
                data = out.array.tobytes()
                entry["parameters"] = {"binary_data_size": len(data)}
                tail.append(data)
            else:
                entry["data"] = out.array.reshape(-1).tolist()
            tensors.append(entry)
        header = json.dumps({"model_name": self.model.name, "model_version": self.model.version,
                             "id": v2.id, "parameters": response_parameters(answer),
                             "outputs": tensors}).encode()
        extra = {HEADER_LENGTH: str(len(header))} if tail else {}
        self._send(HTTPStatus.OK, b"".join([header, *tail]),
                   "application/octet-stream" if tail else "application/json", extra)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


def _request(header: dict, binary: memoryview, name: str, version: str) -> tuple[V2Request, dict[str, bool]]:
    """The JSON request (and its binary tail) as a V2Request, and which outputs go back as binary
    ("" holds the request-wide `binary_data_output`)."""
    params = _parameters(header)
    binary_out = {"": bool(params.pop("binary_data_output", False))}
    inputs, offset = [], 0
    for item in _objects(header.get("inputs"), "inputs"):
        tparams = _parameters(item)
        size = tparams.pop("binary_data_size", None)
        if tparams:
            raise RequestError("parameters", f"input parameter {sorted(tparams)[0][:64]!r} is not supported; "
                                             "send data as JSON or binary_data_size.")
        raw = None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise RequestError("binary_data_size", f"binary_data_size {size!r} does not fit the "
                                                       f"{len(binary) - offset} bytes of binary data left.")
            raw, offset = bytes(binary[offset:offset + size]), offset + size
        shape = item.get("shape")
        if not isinstance(shape, list):
            raise RequestError("shape", "each input needs 'shape', a list of integers.")
        inputs.append(Tensor(str(item.get("name")), str(item.get("datatype")), tuple(shape), raw=raw,
                             values=item.get("data") if raw is None else None))
    if offset != len(binary):
        raise RequestError("binary_data_size", f"{len(binary) - offset} bytes of binary data belong to no input.")
    requested = []
    for item in _objects(header.get("outputs") or [], "outputs"):
        requested.append(str(item.get("name")))
        oparams = _parameters(item)
        if "binary_data" in oparams:
            binary_out[requested[-1]] = bool(oparams["binary_data"])
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise RequestError("id", "id must be a string.")
    return V2Request(name, version, request_id, tuple(inputs), params, tuple(requested)), binary_out


def _parameters(obj: dict) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError("parameters", "parameters must be a JSON object.")
    return dict(params)


def _objects(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise RequestError(key, f"{key} must be a list of JSON objects.")
    return value


def start_rest_server(engine: Engine, model_name: str, model_version: str, host: str,
                      port: int) -> ThreadingHTTPServer:
    """Serve the v2 REST endpoints from a daemon thread (port 0: any free port); `shutdown()` stops it."""
    model = Model.of(model_name, model_version, engine.limits, engine.manifest.num_classes)
    server = create_rest_server(engine, model, host, port)
    threading.Thread(target=server.serve_forever, name="npas-v2-rest", daemon=True).start()
    return server


def create_rest_server(engine: Engine, model: Model, host: str, port: int) -> ThreadingHTTPServer:
    """A bound server, not yet serving."""
    handler = type("BoundV2Handler", (V2Handler,), {"engine": engine, "model": model})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        raise UserError(f"cannot serve v2 REST on {host}:{port}: {err.strerror or err}; "
                        f"choose another --http-port") from None
    server.daemon_threads = True
    return server

