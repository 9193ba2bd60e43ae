"""The wire contract: request parsing, response encoding and the gRPC stubs.

The stubs (`inference_pb2`, `inference_pb2_grpc`, `npas_pb2`) are generated
from `proto/` into `_generated/`: by `setup.py` when building a wheel or an
editable install, and here on first import when they are missing or older
than the .proto files (a source checkout used straight from sys.path).
`inference_pb2_grpc` imports grpc, so it is only loaded when asked for.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from npas_serve.protocol import _codegen

_HERE = Path(__file__).resolve().parent
_PROTO_DIR = _HERE.parents[1] / "proto"
_OUT_DIR = _HERE / "_generated"


def _ensure_generated() -> None:
    if not _codegen.is_stale(_PROTO_DIR, _OUT_DIR):
        return
    if not (_PROTO_DIR / _codegen.PROTOS[0]).is_file():
        raise ImportError(f"npas_serve.protocol: generated stubs missing in {_OUT_DIR} and no proto/ "
                          "to build them from; reinstall npas-serve")
    try:
        _codegen.generate(_PROTO_DIR, _OUT_DIR)
    except (ImportError, OSError) as exc:  # no grpcio-tools, or a read-only tree
        if any(not (_OUT_DIR / name).is_file() for name in _codegen.OUTPUTS):
            raise ImportError(f"npas_serve.protocol: cannot generate stubs from {_PROTO_DIR}: {exc}") from exc


_ensure_generated()

from npas_serve.protocol.request import (  # noqa: E402  (needs the stubs above)
    InferenceRequest,
    RequestError,
    RequestLimits,
    parse_request,
)
from npas_serve.protocol.response import (  # noqa: E402
    InferenceResponse,
    decode_response,
    encode_request,
    encode_response,
)

__all__ = [
    "InferenceRequest", "InferenceResponse", "RequestError", "RequestLimits",
    "decode_response", "encode_request", "encode_response", "parse_request",
    "inference_pb2", "inference_pb2_grpc", "npas_pb2",
]


def __getattr__(name: str):
    if name in _codegen.MODULES:
        return importlib.import_module(f"{__name__}._generated.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
