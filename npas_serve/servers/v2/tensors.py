"""The Open Inference Protocol's tensors and parameters <-> npas-serve's request and answer (pure: no grpc).

A v2 request becomes the same `input` map a TorchServe-API request carries (the payload
under `data`, each knob under its own name), so `Engine.parse` (`parse_request`) validates
both with one piece of code; only what v2 adds is checked here: the tensor's name and
datatype, its typed contents, and which request parameters exist. An answer becomes named
output tensors plus request-level parameters (members used, exit reached, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from npas_serve.protocol import npas_pb2
from npas_serve.protocol.request import RequestError, RequestLimits, check_payload_size, holds_bool
from npas_serve.protocol.response import InferenceResponse

INPUT = "inputs"
# the npas knobs a v2 request may carry as parameters (`stream` is the RPC's choice, the id is `id`)
PARAMETERS = ("mode", "ensemble_size", "members", "exit", "latency_budget_ms", "deadline_unix_ms",
              "sent_unix_ms", "min_confidence")
# Triton's reserved request parameters that npas-serve does not implement: refused by name
UNSUPPORTED = {"sequence_id": "sequences (no sequence batching)", "sequence_start": "sequences",
               "sequence_end": "sequences", "priority": "priorities", "timeout": "queue timeouts"}
# v2 datatype -> the dtype name the shared request parser takes (the ones it accepts)
DATATYPES = {"FP32": "float32", "FP64": "float64", "FP16": "float16", "INT8": "int8", "INT16": "int16",
             "INT32": "int32", "INT64": "int64", "UINT8": "uint8"}
# output tensors: name -> v2 datatype; predictions are class indices
OUTPUTS = {"probabilities": "FP32", "predictions": "INT64", "entropy": "FP32", "disagreement": "FP32"}
_NUMPY = {"FP32": np.float32, "INT64": np.int64}


@dataclass(frozen=True)
class Tensor:
    """One v2 input tensor as it arrived: raw little-endian bytes, or typed values (gRPC
    `contents`, REST JSON `data`), never both."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None = None
    values: Sequence[Any] | None = None


@dataclass(frozen=True)
class V2Request:
    model_name: str
    model_version: str
    id: str
    inputs: tuple[Tensor, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)   # plain bool / int / float / str
    outputs: tuple[str, ...] = ()                                  # requested output names; () means all


@dataclass(frozen=True)
class Output:
    name: str
    datatype: str
    array: np.ndarray          # C-contiguous, little-endian, of the datatype


def request_fields(request: V2Request, limits: RequestLimits) -> dict[str, Any]:
    """The `input` map `parse_request` takes: the tensor under `data`, one key per knob.

    Raises RequestError for what only v2 can get wrong; everything else is left to the
    shared parser, so both protocols refuse the same requests with the same field named.
    """
    for name in request.parameters:
        if name in UNSUPPORTED:
            raise RequestError(name, f"parameter {name!r}: npas-serve does not implement "
                                     f"{UNSUPPORTED[name]}; leave it out.")
        if name not in PARAMETERS:
            raise RequestError(str(name)[:64], f"parameter {str(name)[:64]!r} is unknown; the parameters are "
                                               f"{', '.join(PARAMETERS)}.")
    check_outputs(request.outputs)
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
        names = ", ".join(repr(t.name) for t in request.inputs) or "none"
        raise RequestError("inputs", f"the model takes one input tensor named {INPUT!r}; got {names}.")
    tensor = request.inputs[0]
    payload = {"inputs": npas_pb2.Tensor(data=_raw(tensor, limits), shape=_shape(tensor),
                                         dtype=DATATYPES[tensor.datatype])}
    return {"data": payload, **request.parameters, "request_id": request.id}


def check_outputs(names: Sequence[str]) -> None:
    for name in names:
        if name not in OUTPUTS:
            raise RequestError("outputs", f"output {str(name)[:64]!r} is unknown; the outputs are "
                                          f"{', '.join(OUTPUTS)}.")


def outputs(answer: InferenceResponse, requested: Sequence[str] = ()) -> list[Output]:
    """The answer's named tensors, in OUTPUTS order (or the requested ones, in their order)."""
    arrays = {"probabilities": answer.probabilities, "predictions": answer.predictions,
              "entropy": answer.entropy, "disagreement": answer.disagreement}
    return [Output(name, OUTPUTS[name], np.ascontiguousarray(arrays[name], dtype=_NUMPY[OUTPUTS[name]]))
            for name in (requested or OUTPUTS)]


def response_parameters(answer: InferenceResponse) -> dict[str, Any]:
    """What the answer says beyond its tensors, as v2 request-level response parameters."""
    params: dict[str, Any] = {"mode": answer.mode, "members_used": ",".join(answer.members_used),
                              "plan": ",".join(answer.plan), "latency_ms": float(answer.latency_ms),
                              "final": bool(answer.final)}
    if answer.exit_reached is not None:
        params["exit_reached"] = int(answer.exit_reached)
    if answer.budget_met is not None:
        params["budget_met"] = bool(answer.budget_met)
    return params


# -- one input tensor --------------------------------------------------------------------------

def _shape(tensor: Tensor) -> list[int]:
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in tensor.shape):
        raise RequestError("shape", f"input {INPUT!r} has shape {list(tensor.shape)}; send non-negative "
                                    "integers, the batch first.")
    return list(tensor.shape)


def _raw(tensor: Tensor, limits: RequestLimits) -> bytes:
    """The tensor's little-endian bytes, whichever way it came."""
    if tensor.datatype not in DATATYPES:
        raise RequestError("datatype", f"input {INPUT!r} has datatype {str(tensor.datatype)[:16]!r}; send FP32 "
                                       f"(or one of {', '.join(DATATYPES)}).")
    if (tensor.raw is None) == (tensor.values is None):
        raise RequestError("inputs", f"input {INPUT!r} needs its data once: raw bytes or typed contents.")
    if tensor.raw is not None:
        check_payload_size(len(tensor.raw), "inputs", limits)
        return tensor.raw
    dtype = np.dtype(DATATYPES[tensor.datatype]).newbyteorder("<")
    check_payload_size(len(tensor.values) * dtype.itemsize, "inputs", limits)
    return _numbers(tensor.values, dtype).tobytes()     # the parser checks its length against the shape


def _numbers(values: Sequence[Any], dtype: np.dtype) -> np.ndarray:
    """Typed contents as an array of `dtype`: numbers only, no booleans, integers for INT types."""
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise RequestError("inputs", f"input {INPUT!r}: data must be a flat (or rectangular) list of "
                                     "numbers.") from None
    if array.size and (array.dtype.kind not in "iuf" or holds_bool(values)):
        raise RequestError("inputs", f"input {INPUT!r}: data must hold only numbers.")
    if dtype.kind in "iu" and array.dtype.kind == "f":
        raise RequestError("inputs", f"input {INPUT!r}: data holds fractions for an integer datatype; "
                                     "send FP32 for real values.")
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(array.reshape(-1), dtype=dtype)

