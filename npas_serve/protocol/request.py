"""Parse and validate one inference request (pure: no grpc, no torch).

TorchServe's handler and the embedded server both call `parse_request` on the
PredictionsRequest `input` map, so both accept and refuse exactly the same
requests, with an error that names the field the caller must fix.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from npas_serve.protocol import _wire, limits as _limits
from npas_serve.protocol._generated import npas_pb2

MODES = ("ensemble", "anytime")
KNOBS = ("mode", "ensemble_size", "members", "exit", "latency_budget_ms",
         "deadline_unix_ms", "sent_unix_ms", "min_confidence", "stream", "request_id")
PAYLOAD_KEYS = ("data", "body")  # gRPC puts the payload under data, TorchServe's HTTP under body
MAX_KNOB_CHARS = 4096
MAX_REQUEST_ID_CHARS = 128
_PB_MODES = {npas_pb2.MODE_ENSEMBLE: "ensemble", npas_pb2.MODE_ANYTIME: "anytime"}
_INTEGER = re.compile(r"[+-]?[0-9]{1,18}")


class RequestError(ValueError):
    """Bad input; `field` names the offending field. Servers map it to INVALID_ARGUMENT / HTTP 400."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class RequestLimits:
    """What this model accepts; built once by the server from the checkpoint."""

    input_shape: tuple[int, ...]        # per-example shape, e.g. (1, 40)
    member_names: tuple[str, ...]       # N members
    num_exits: int                      # exits per member, numbered 0..num_exits-1
    max_batch: int = 256
    max_payload_bytes: int = 4 * 2**20
    max_budget_ms: float = 60_000.0     # absurdly large budgets are refused
    example_shapes: tuple[tuple[int, ...], ...] = ()   # other shapes an example may come in, each the
                                        # input_shape without its channel axis of 1; the first is the data's

    def __post_init__(self):
        if not self.member_names or self.num_exits < 1 or self.max_batch < 1:
            raise ValueError("RequestLimits needs at least one member, one exit and max_batch >= 1")

    @cached_property
    def payload_bytes(self) -> int:
        """The largest payload accepted: what a valid request can need, at most max_payload_bytes."""
        return _limits.max_payload_bytes(self.input_shape, self.max_batch, self.max_payload_bytes)

    @cached_property
    def accepted_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shapes an example may come in: each of `example_shapes`, and `input_shape`."""
        return tuple(dict.fromkeys([*map(tuple, self.example_shapes), tuple(self.input_shape)]))


@dataclass(frozen=True)
class InferenceRequest:
    inputs: np.ndarray                  # float32, shape (B, *input_shape), finite
    mode: str = "ensemble"              # "ensemble" | "anytime"
    ensemble_size: int | None = None    # None means auto (all, or what the budget allows)
    members: tuple[str, ...] | None = None
    exit: int | None = None             # None means auto (deepest, or what budget/confidence allows)
    budget_ms: float | None = None      # milliseconds; on the wire: latency_budget_ms
    deadline_unix_ms: float | None = None
    sent_unix_ms: float | None = None   # when the client sent it (its clock): the way in, kept for the way back
    min_confidence: float | None = None
    stream: bool = False
    request_id: str = ""                # echoed; generated (uuid4 hex) when absent
    payload_format: str = "json"        # "json" | "protobuf": the response is encoded the same way


def parse_request(fields: Mapping[str, bytes | str], limits: RequestLimits) -> InferenceRequest:
    """Validate a PredictionsRequest `input` map into an InferenceRequest.

    The payload under `data` (or `body`) is JSON or a serialized
    npas.v1.InferRequest; any knob may also be its own map key, which then
    overrides the payload's value. Raises RequestError on anything else.
    """
    key = _payload_key(fields)
    values, fmt = _decode_payload(fields[key], key, limits)
    for name, value in fields.items():
        if name in PAYLOAD_KEYS:
            continue
        if name not in KNOBS:
            raise RequestError(str(name)[:64], f"{_wire.short(name)} is not a known request key; put the "
                                               f"payload under data (or body) and knobs under {', '.join(KNOBS)}.")
        values[name] = _map_value(name, value)
    if values.get("inputs") is None:
        raise RequestError("inputs", "the payload has no inputs; send a batch of examples under 'inputs'.")
    n = len(limits.member_names)
    mode = _mode(values.get("mode"))
    members = _members(values.get("members"), limits.member_names)
    size = _integer("ensemble_size", values.get("ensemble_size"), 1, n, f"a number of members from 1 to {n}")
    if size is not None and members is not None and size != len(members):
        raise RequestError("ensemble_size", f"ensemble_size is {size} but members names {len(members)}; "
                                            "give one of them, or make them agree.")
    exit_ = _integer("exit", values.get("exit"), 0, limits.num_exits - 1,
                     f"an exit index from 0 to {limits.num_exits - 1}")
    min_confidence = _number("min_confidence", values.get("min_confidence"), 0.0, 1.0,
                             "a probability from 0 to 1", open_low=False)
    _check_mode_knobs(mode, {"ensemble_size": size, "exit": exit_, "min_confidence": min_confidence},
                      members)
    return InferenceRequest(
        inputs=_inputs(values["inputs"], limits),
        mode=mode,
        ensemble_size=size,
        members=members,
        exit=exit_,
        budget_ms=_number("latency_budget_ms", values.get("latency_budget_ms"), 0.0, limits.max_budget_ms,
                                  f"milliseconds greater than 0 and at most {limits.max_budget_ms:g}"),
        deadline_unix_ms=_number("deadline_unix_ms", values.get("deadline_unix_ms"), 0.0, math.inf,
                                 "a positive time in milliseconds since the Unix epoch"),
        sent_unix_ms=_number("sent_unix_ms", values.get("sent_unix_ms"), 0.0, math.inf,
                             "a positive time in milliseconds since the Unix epoch"),
        min_confidence=min_confidence,
        stream=_flag("stream", values.get("stream")),
        request_id=_request_id(values.get("request_id")),
        payload_format=fmt,
    )


# -- payload -----------------------------------------------------------------

def _payload_key(fields: Mapping) -> str:
    present = [k for k in PAYLOAD_KEYS if k in fields]
    if not present:
        raise RequestError("data", "the request has no payload; send JSON or a serialized "
                                   "npas.v1.InferRequest under 'data' ('body' over HTTP).")
    if len(present) > 1:
        raise RequestError("body", "the request has both 'data' and 'body'; send the payload under one of them.")
    return present[0]


def _decode_payload(value: Any, key: str, limits: RequestLimits) -> tuple[dict, str]:
    """Payload -> (raw field values, "json" | "protobuf")."""
    if isinstance(value, Mapping):  # TorchServe already decoded an application/json body
        return _check_json_keys(value), "json"
    if isinstance(value, str):
        raw = value.encode("utf-8", errors="surrogatepass")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
    else:
        raise RequestError(key, f"the {key} payload has type {type(value).__name__}; send bytes holding a JSON "
                                "object or a serialized npas.v1.InferRequest.")
    check_payload_size(len(raw), key, limits)
    if not raw.strip():
        raise RequestError(key, f"the {key} payload is empty; send a JSON object or a serialized npas.v1.InferRequest.")
    if _wire.looks_like_json(raw):
        why = _limits.json_structure_error(raw, limits.input_shape, limits.max_batch)
        if why is not None:
            raise RequestError(key, f"the {key} payload cannot be a valid request: {why}; send a smaller batch.")
    ok, parsed = _wire.try_json(raw)
    if ok:
        if not isinstance(parsed, dict):
            raise RequestError(key, f"the {key} payload must be a JSON object with 'inputs' and optional knobs.")
        return _check_json_keys(parsed), "json"
    message = _proto_values(raw)
    if message is None:
        raise RequestError(key, f"the {key} payload is neither a JSON object ({parsed}) nor a valid "
                                "npas.v1.InferRequest; send one of the two.")
    return message, "protobuf"


def check_payload_size(size: int, key: str, limits: RequestLimits) -> None:
    """Refuse a payload over the limit by its length alone (servers call it before decoding anything)."""
    if size > limits.payload_bytes:
        raise RequestError(key, f"the {key} payload is {size} bytes, over the limit of "
                                f"{limits.payload_bytes} for batches of at most {limits.max_batch} examples "
                                f"of shape {tuple(limits.input_shape)}; send a smaller batch.")


def _check_mode_knobs(mode: str, knobs: Mapping, members: tuple[str, ...] | None) -> None:
    """Knobs of the other mode are refused, not ignored: the caller believes they took effect."""
    other = "anytime" if mode == "ensemble" else "ensemble"
    foreign = ("exit", "min_confidence") if mode == "ensemble" else ("ensemble_size",)
    for name in foreign:
        if knobs[name] is not None:
            raise RequestError(name, f"{name} applies to mode '{other}' only, and this request is in mode "
                                     f"'{mode}'; drop {name}, or set mode to '{other}'.")
    if mode == "anytime" and members is not None and len(members) > 1:
        raise RequestError("members", f"anytime mode runs one member, but members names {len(members)}; "
                                      "name one member, or use mode 'ensemble'.")


def _check_json_keys(obj: Mapping) -> dict:
    for name in obj:
        if name != "inputs" and name not in KNOBS:
            raise RequestError(str(name)[:64], f"{_wire.short(name)} is not a known payload field; "
                                          f"use inputs, {', '.join(KNOBS)}.")
    return dict(obj)


def _proto_values(raw: bytes) -> dict | None:
    """The fields set in a serialized InferRequest, or None if it is not one.

    Unknown field numbers are refused like unknown JSON keys: random bytes
    often parse as a message made only of unknown fields.
    """
    msg = npas_pb2.InferRequest()
    try:
        msg.ParseFromString(raw)
    except DecodeError:
        return None
    if len(UnknownFieldSet(msg)) or len(UnknownFieldSet(msg.inputs)):
        return None
    values: dict[str, Any] = {}
    if msg.HasField("inputs"):
        values["inputs"] = msg.inputs
    if msg.mode != npas_pb2.MODE_UNSPECIFIED:
        values["mode"] = _PB_MODES.get(msg.mode, msg.mode)  # an unknown enum number fails in _mode
    for name in ("ensemble_size", "exit", "latency_budget_ms", "deadline_unix_ms", "sent_unix_ms", "min_confidence",
                 "stream"):
        if msg.HasField(name):
            values[name] = getattr(msg, name)
    if msg.members:
        values["members"] = list(msg.members)
    if msg.request_id:
        values["request_id"] = msg.request_id
    return values


def _map_value(name: str, value: Any) -> Any:
    """A knob given as its own map key: UTF-8 bytes or text (or already-decoded JSON)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(name, f"{name} is not UTF-8 text; send the value as a string.") from None
    if isinstance(value, str) and len(value) > MAX_KNOB_CHARS:
        raise RequestError(name, f"{name} is {len(value)} characters long, over the limit of {MAX_KNOB_CHARS}.")
    return value


# -- inputs ------------------------------------------------------------------

def _expected(limits: RequestLimits) -> str:
    """The accepted batch shapes, as an error message names them."""
    return " or ".join("(B, " + ", ".join(map(str, shape)) + ")" for shape in limits.accepted_shapes)


def _inputs(value: Any, limits: RequestLimits) -> np.ndarray:
    try:
        if isinstance(value, npas_pb2.Tensor):
            array = _wire.array_from_raw(value.data, list(value.shape), value.dtype or "float32")
        elif isinstance(value, Mapping):
            array = _wire.array_from_b64(value)
        elif isinstance(value, list):
            array = _from_nested(value)
        else:
            raise ValueError(f"inputs has type {type(value).__name__}; send nested lists of numbers with shape "
                             f"{_expected(limits)}, or {{data, shape, dtype}} with base64 raw bytes.")
    except ValueError as exc:
        raise RequestError("inputs", _sentence("inputs", exc)) from None
    if array.ndim >= 1 and array.shape[0] == 0:
        raise RequestError("inputs", f"inputs is an empty batch; send at least one example, shape {_expected(limits)}.")
    if array.ndim == 0 or array.shape[1:] not in limits.accepted_shapes:
        raise RequestError("inputs", f"inputs has shape {tuple(array.shape)}; expected {_expected(limits)} "
                                     "with the batch dimension first, even for one example.")
    array = array.reshape(array.shape[0], *limits.input_shape)   # the channel axis the family takes
    if array.shape[0] > limits.max_batch:
        raise RequestError("inputs", f"inputs holds {array.shape[0]} examples, over the limit of "
                                     f"{limits.max_batch}; split the batch.")
    with np.errstate(over="ignore", invalid="ignore"):
        array = array.astype(np.float32)  # also a writable, native-order copy
    if not np.isfinite(array).all():
        raise RequestError("inputs", "inputs contains NaN, Inf or values beyond float32 range; send finite numbers.")
    return array


def _from_nested(value: list) -> np.ndarray:
    try:
        array = np.array(value)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise ValueError("inputs must be a rectangular nested list of numbers.") from None
    if array.dtype.kind not in "iuf" or holds_bool(value):
        got = "booleans" if array.dtype.kind in "biuf" else f"numpy dtype {array.dtype}"
        raise ValueError(f"inputs must hold only numbers (got {got}); send nested lists of numbers.")
    return array


def holds_bool(values: Sequence[Any]) -> bool:
    """JSON true/false among the numbers (at any depth of nested lists or tuples): numpy would
    read them as 1 and 0. Shared by every parser that takes numbers from JSON (this module,
    the v2 tensors)."""
    stack = [values]
    while stack:
        for item in stack.pop():
            if isinstance(item, (list, tuple)):
                stack.append(item)
            elif item is True or item is False:
                return True
    return False


def _sentence(field: str, exc: ValueError) -> str:
    text = str(exc)
    return text if text.startswith(field) else f"{field}: {text}"  # _wire's messages lack the field


# -- knobs -------------------------------------------------------------------

def _mode(value: Any) -> str:
    if value is None:
        return "ensemble"
    if isinstance(value, str) and value.strip().lower() in MODES:
        return value.strip().lower()
    raise RequestError("mode", f"mode {_wire.short(value)} is unknown; use 'ensemble' or 'anytime'.")


def _integer(name: str, value: Any, low: int, high: int, what: str) -> int | None:
    """An integer in [low, high]; None, "auto" and JSON null mean auto."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "auto":
            return None
        if not _INTEGER.fullmatch(text):
            raise RequestError(name, f"{name} {_wire.short(value)} is not an integer; send {what}, or 'auto'.")
        value = int(text)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"{name} {_wire.short(value)} is not an integer; send {what}, or 'auto'.")
    if not low <= value <= high:
        raise RequestError(name, f"{name} {value} is out of range; send {what}, or 'auto'.")
    return value


def _number(name: str, value: Any, low: float, high: float, what: str, open_low: bool = True) -> float | None:
    """A finite number in (low, high] (or [low, high]); None means unset."""
    if value is None:
        return None
    number = None
    if (isinstance(value, str) and len(value) <= 64) or (
            isinstance(value, (int, float)) and not isinstance(value, bool)):
        try:
            number = float(value)
        except (ValueError, OverflowError):  # not numeric text, or an int beyond float range
            pass
    if number is None or not math.isfinite(number):
        raise RequestError(name, f"{name} {_wire.short(value)} is not a finite number; send {what}.")
    if number < low or (open_low and number == low) or number > high:
        raise RequestError(name, f"{name} {number:g} is out of range; send {what}.")
    return number


def _flag(name: str, value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "false", "0"):
        return value.strip().lower() in ("true", "1")
    raise RequestError(name, f"{name} {_wire.short(value)} is not a boolean; send true or false.")


def _members(value: Any, known: tuple[str, ...]) -> tuple[str, ...] | None:
    """Member names as a JSON list, or in a map key as "m0,m2" or '["m0", "m2"]'."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                raise RequestError("members", "members is not a valid JSON list; send names like "
                                              '["m0", "m2"] or m0,m2.') from None
        else:
            value = [part.strip() for part in text.split(",")] if text else []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RequestError("members", "members must be a list of member names, like [\"m0\", \"m2\"].")
    if not value:
        raise RequestError("members", f"members is empty; name at least one of {', '.join(known)}.")
    for name in value:
        if name not in known:
            raise RequestError("members", f"member {_wire.short(name)} is unknown; choose from {', '.join(known)}.")
    if len(set(value)) != len(value):
        raise RequestError("members", "members names a member more than once; list each member once.")
    return tuple(value)


def _request_id(value: Any) -> str:
    if value is None or value == "":
        return uuid.uuid4().hex
    if not isinstance(value, str) or len(value) > MAX_REQUEST_ID_CHARS or not value.isprintable():
        raise RequestError("request_id", f"request_id must be printable text of at most "
                                         f"{MAX_REQUEST_ID_CHARS} characters.")
    return value
