"""Encode and decode answers (and the client's requests) in JSON or protobuf.

A server answers in the format the request used, so a curl user reads JSON and
a typed client gets npas.v1.InferResponse; `decode_response` tells them apart
the same way `parse_request` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from npas_serve.protocol import _wire
from npas_serve.protocol._generated import npas_pb2
from npas_serve.protocol.request import KNOBS

FORMATS = ("json", "protobuf")
_MODES = {"ensemble": npas_pb2.MODE_ENSEMBLE, "anytime": npas_pb2.MODE_ANYTIME}
_MODE_NAMES = {v: k for k, v in _MODES.items()}


@dataclass(frozen=True)
class InferenceResponse:
    request_id: str
    model_name: str
    model_version: str
    mode: str
    predictions: list[int]                 # per example
    probabilities: np.ndarray              # float32 (B, C)
    entropy: list[float]                   # predictive entropy per example (nats)
    disagreement: list[float]              # fraction of used members whose argmax differs from the ensemble's
    members_used: list[str]
    exit_reached: int | None               # anytime mode: the exit the answer comes from; None for ensemble
    plan: list[str]                        # the steps planned, e.g. ["m0", "m2"] or ["m1:e0", "m1:e1"]
    latency_ms: float
    budget_ms: float | None                # the request's budget; on the wire: latency_budget_ms
    budget_met: bool | None                # None when no budget was given
    final: bool = True                     # False on streamed intermediate answers


def encode_response(resp: InferenceResponse, fmt: str) -> bytes:
    """Serialize for the wire; JSON keeps probabilities as nested lists for human readers."""
    if fmt == "json":
        body = {
            "request_id": resp.request_id, "model_name": resp.model_name,
            "model_version": resp.model_version, "mode": resp.mode,
            "predictions": [int(p) for p in resp.predictions],
            "probabilities": np.asarray(resp.probabilities, dtype=np.float32).tolist(),
            "entropy": [float(x) for x in resp.entropy],
            "disagreement": [float(x) for x in resp.disagreement],
            "members_used": list(resp.members_used),
            "exit_reached": None if resp.exit_reached is None else int(resp.exit_reached),
            "plan": list(resp.plan), "latency_ms": float(resp.latency_ms),
            "latency_budget_ms": None if resp.budget_ms is None else float(resp.budget_ms),
            "budget_met": None if resp.budget_met is None else bool(resp.budget_met),
            "final": bool(resp.final),
        }
        return json.dumps(body, separators=(",", ":")).encode("utf-8")
    if fmt == "protobuf":
        if resp.mode not in _MODES:
            raise ValueError(f"mode {resp.mode!r} cannot be encoded; expected one of {', '.join(_MODES)}")
        msg = npas_pb2.InferResponse(
            request_id=resp.request_id, model_name=resp.model_name, model_version=resp.model_version,
            mode=_MODES[resp.mode], predictions=[int(p) for p in resp.predictions],
            probabilities=_tensor(resp.probabilities), entropy=resp.entropy,
            disagreement=resp.disagreement, members_used=resp.members_used, plan=resp.plan,
            latency_ms=resp.latency_ms, final=resp.final)
        if resp.exit_reached is not None:
            msg.exit_reached = resp.exit_reached
        if resp.budget_ms is not None:
            msg.latency_budget_ms = resp.budget_ms
        if resp.budget_met is not None:
            msg.budget_met = resp.budget_met
        return msg.SerializeToString()
    raise ValueError(f"unknown payload format {fmt!r}; expected one of {', '.join(FORMATS)}")


def decode_response(payload: bytes) -> InferenceResponse:
    """Inverse of encode_response, detecting the format; ValueError if it is neither."""
    raw = bytes(payload)
    ok, parsed = _wire.try_json(raw)
    if ok and isinstance(parsed, dict):
        return _from_json(parsed)
    try:
        msg = npas_pb2.InferResponse.FromString(raw)
    except DecodeError:
        raise ValueError(f"response is neither JSON ({parsed}) nor an npas.v1.InferResponse") from None
    return InferenceResponse(
        request_id=msg.request_id, model_name=msg.model_name, model_version=msg.model_version,
        mode=_MODE_NAMES.get(msg.mode, "ensemble"), predictions=list(msg.predictions),
        probabilities=_array(msg.probabilities, len(msg.predictions)),
        entropy=list(msg.entropy), disagreement=list(msg.disagreement),
        members_used=list(msg.members_used),
        exit_reached=msg.exit_reached if msg.HasField("exit_reached") else None,
        plan=list(msg.plan), latency_ms=msg.latency_ms,
        budget_ms=msg.latency_budget_ms if msg.HasField("latency_budget_ms") else None,
        budget_met=msg.budget_met if msg.HasField("budget_met") else None,
        final=msg.final if msg.HasField("final") else True,
    )


def encode_request(inputs: np.ndarray, fmt: str = "json", **knobs) -> bytes:
    """The client's payload: inputs as raw float32 bytes (base64 in JSON), knobs typed.

    None-valued knobs are left out (server default); "auto" is sent as unset.
    """
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise TypeError(f"unknown knob(s) {', '.join(unknown)}; known: {', '.join(KNOBS)}")
    knobs = {k: _plain(v) for k, v in knobs.items() if v is not None}
    array = np.asarray(inputs, dtype=np.float32)
    if fmt == "json":
        return json.dumps({"inputs": _wire.array_to_b64(array), **knobs}, separators=(",", ":")).encode("utf-8")
    if fmt != "protobuf":
        raise ValueError(f"unknown payload format {fmt!r}; expected one of {', '.join(FORMATS)}")
    msg = npas_pb2.InferRequest(inputs=_tensor(array))
    for name, value in knobs.items():
        if name == "mode":
            if value not in _MODES:
                raise ValueError(f"mode {value!r} is unknown; use one of {', '.join(_MODES)}")
            msg.mode = _MODES[value]
        elif name == "members":
            msg.members.extend(value)
        elif value != "auto":
            setattr(msg, name, value)
    return msg.SerializeToString()


def _tensor(array: np.ndarray) -> npas_pb2.Tensor:
    a = np.ascontiguousarray(array, dtype="<f4")
    return npas_pb2.Tensor(data=a.tobytes(), shape=a.shape, dtype="float32")


def _array(tensor: npas_pb2.Tensor, rows: int) -> np.ndarray:
    if not tensor.shape and not tensor.data:
        return np.zeros((rows, 0), dtype=np.float32)
    return _wire.array_from_raw(tensor.data, list(tensor.shape), tensor.dtype or "float32").astype(np.float32)


def _from_json(obj: dict) -> InferenceResponse:
    try:
        probs = obj["probabilities"]
        probs = _wire.array_from_b64(probs) if isinstance(probs, dict) else np.asarray(probs, dtype=np.float32)
        if probs.ndim != 2:  # e.g. [] for an empty answer
            probs = probs.reshape(len(obj["predictions"]), -1) if probs.size else np.zeros((len(obj["predictions"]), 0))
        return InferenceResponse(
            request_id=obj["request_id"], model_name=obj["model_name"], model_version=obj["model_version"],
            mode=obj["mode"], predictions=list(obj["predictions"]), probabilities=probs.astype(np.float32),
            entropy=list(obj["entropy"]), disagreement=list(obj["disagreement"]),
            members_used=list(obj["members_used"]), exit_reached=obj.get("exit_reached"),
            plan=list(obj["plan"]), latency_ms=obj["latency_ms"],
            budget_ms=obj.get("latency_budget_ms"), budget_met=obj.get("budget_met"),
            final=obj.get("final", True),
        )
    except KeyError as exc:
        raise ValueError(f"JSON response lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"JSON response is malformed: {exc}") from None


def _plain(value):
    """numpy scalars and tuples -> JSON-able Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value
