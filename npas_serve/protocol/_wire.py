"""Byte-level helpers shared by request parsing and response encoding.

Errors are plain ValueError with a one-sentence message; the request side
re-raises them as RequestError naming the field.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np

# Accepted tensor dtypes, by numpy name, as explicit little-endian types.
DTYPES = {
    "float32": "<f4", "float64": "<f8", "float16": "<f2",
    "int8": "i1", "int16": "<i2", "int32": "<i4", "int64": "<i8", "uint8": "u1",
}
MAX_NDIM = 16


def array_from_raw(data: bytes, shape: Any, dtype: Any) -> np.ndarray:
    """Rebuild an array from raw little-endian bytes, checking every claim."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype {short(dtype)} is not supported; use one of {', '.join(DTYPES)}.")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"shape {short(shape)} must be a list of at most {MAX_NDIM} non-negative integers.")
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    needed = math.prod(shape) * itemsize  # Python ints: no overflow, no allocation
    if needed != len(data):
        raise ValueError(f"data holds {len(data)} bytes but shape {list(shape)} of {dtype} needs {needed}.")
    return np.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape)


def array_from_b64(obj: dict) -> np.ndarray:
    """The JSON form of a raw tensor: {"data": base64, "shape": [...], "dtype": "float32"}."""
    extra = set(obj) - {"data", "shape", "dtype"}
    if extra:
        name = short(sorted(map(str, extra))[0])
        raise ValueError(f"unknown key {name}; a raw tensor has only data, shape and dtype.")
    if not isinstance(obj.get("data"), str) or "shape" not in obj:
        raise ValueError("a raw tensor needs 'data' (a base64 string) and 'shape' (a list of integers).")
    try:
        raw = base64.b64decode(obj["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("data is not valid base64; encode the raw little-endian bytes with standard base64.") from None
    return array_from_raw(raw, obj["shape"], obj.get("dtype", "float32"))


def array_to_b64(array: np.ndarray) -> dict:
    a = np.ascontiguousarray(array, dtype="<f4")
    return {"data": base64.b64encode(a.tobytes()).decode("ascii"), "shape": list(a.shape), "dtype": "float32"}


def looks_like_json(raw: bytes) -> bool:
    """Whether `raw` starts like a JSON object (it may still be a protobuf: see try_json)."""
    return raw.lstrip(b" \t\r\n")[:1] == b"{"


def try_json(raw: bytes) -> tuple[bool, Any]:
    """Parse `raw` as JSON when it starts like an object; (False, reason) otherwise.

    A serialized protobuf can also start with whitespace and '{' (tag 0x0A is
    field 1 and also '\\n'), so callers fall back to protobuf when this fails.
    """
    if not looks_like_json(raw):
        return False, "it does not start with '{'"
    try:
        return True, json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge ints, deep nesting
        return False, str(exc) or type(exc).__name__


def short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
