"""Payload bounds, checked on the raw bytes before any parsing (pure: no grpc, no torch).

Parsing is the expensive part of a refusal: a 4 MiB JSON payload of tiny nested lists
costs seconds of GIL-bound work and hundreds of MB before its shape can be refused.
So the largest payload is derived from what a valid request can hold (the model's
input shape and maximum batch), and a JSON payload's structure is counted with
C-speed byte scans (brackets, commas) before `json.loads` sees it.
"""
from __future__ import annotations

import math

# A number in JSON: "-1.2345678901234567e-308" is 24 characters; with ", " 26.
MAX_NUMBER_CHARS = 26
# Knobs, request_id and member names: everything in a request beyond its inputs.
ENVELOPE_BYTES = 16 * 1024
# Raw dtypes a request may use (protocol._wire.DTYPES): float64 / int64 are the widest.
MAX_ITEMSIZE = 8
# Brackets and commas of a request beyond its inputs (members list and its names).
KNOB_SEPARATORS = 1024


def max_payload_bytes(input_shape: tuple[int, ...], max_batch: int, configured: int) -> int:
    """The largest payload a valid request can need, capped by the configured limit.

    Nested JSON lists are the longest encoding: every number at most MAX_NUMBER_CHARS,
    plus the brackets of every list. Raw tensors (base64 or protobuf bytes) are shorter.
    """
    per_example = math.prod(input_shape)
    brackets = max_batch * _lists_per_example(input_shape) * 4 + 2
    derived = max_batch * per_example * MAX_NUMBER_CHARS + brackets + ENVELOPE_BYTES
    raw = math.ceil(max_batch * per_example * MAX_ITEMSIZE * 4 / 3) + ENVELOPE_BYTES   # base64 JSON
    return min(configured, max(derived, raw))


def json_structure_error(raw: bytes, input_shape: tuple[int, ...], max_batch: int) -> str | None:
    """Why a JSON payload cannot be a valid request, judged by counting bytes; None if it may be.

    A valid request holds at most max_batch examples: so at most that many lists per
    example (plus the batch list and a members list) and that many numbers (plus knobs).
    """
    lists = raw.count(b"[")
    max_lists = max_batch * _lists_per_example(input_shape) + 1 + KNOB_SEPARATORS
    if lists > max_lists:
        return (f"it opens {lists} lists; a batch of at most {max_batch} examples of shape "
                f"{tuple(input_shape)} needs at most {max_lists}")
    commas = raw.count(b",")
    max_commas = max_batch * math.prod(input_shape) + max_batch * _lists_per_example(input_shape) + KNOB_SEPARATORS
    if commas > max_commas:
        return (f"it holds {commas} separators; a batch of at most {max_batch} examples of shape "
                f"{tuple(input_shape)} holds at most {max_commas}")
    return None



def _lists_per_example(input_shape: tuple[int, ...]) -> int:
    """Lists that nested JSON uses for one example: 1 + d0 + d0*d1 + ... (all but the innermost level)."""
    total, width = 0, 1
    for dim in (1, *input_shape[:-1]):
        width *= dim
        total += width
    return total
