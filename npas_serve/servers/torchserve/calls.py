"""Which kind of call a TorchServe 0.12 worker is answering, from the request headers it is given.

The frontend sends its worker no command, only each request's id, headers and input map
(ModelRequestEncoder), so the headers are all a handler can go by:

- the management API's describe (`GET /models/NAME?customized=true`) sets header `describe: True`;
- an HTTP inference request carries its HTTP headers (HTTP/1.1 always has `Host`);
- a gRPC `Predictions` or `StreamPredictions` call carries none, and nothing else tells the two
  apart. A second response to a unary `Predictions` call makes the frontend throw
  (`IllegalStateException: Stream is already completed`) and lose the worker for good, so a
  gRPC call is always answered with exactly one message.

Parameter-level entries (one per input-map key, a dict holding its content type) share the
same mapping; only string values are request headers.
"""
from __future__ import annotations

from collections.abc import Mapping
from enum import Enum


class CallKind(Enum):
    GRPC = "grpc"            # Predictions or StreamPredictions: one answer, with ts_stream_next=false
    HTTP = "http"            # REST inference: one answer, no stream header (it would make the reply chunked)
    DESCRIBE = "describe"    # the management API asking the worker itself: the readiness probe


def call_kind(headers: Mapping[str, object] | None) -> CallKind:
    request_headers = {str(k).lower(): v for k, v in (headers or {}).items() if isinstance(v, str)}
    if request_headers.get("describe") == "True":
        return CallKind.DESCRIBE
    if "host" in request_headers:
        return CallKind.HTTP
    return CallKind.GRPC
