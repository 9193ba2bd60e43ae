"""protocol.limits: bounds from the model's shape and batch, judged on raw bytes."""
from __future__ import annotations

import json

import numpy as np

from npas_serve.protocol.limits import json_structure_error, max_payload_bytes
from npas_serve.protocol.response import encode_request

SHAPE, BATCH = (1, 40), 256


def test_the_largest_valid_request_fits_and_the_limit_is_far_below_the_cap():
    x = np.random.default_rng(0).standard_normal((BATCH, *SHAPE))     # float64 text: the longest numbers
    body = json.dumps({"inputs": x.tolist(), "mode": "ensemble", "ensemble_size": 3,
                       "request_id": "r" * 128}).encode()
    limit = max_payload_bytes(SHAPE, BATCH, 4 * 2**20)
    assert len(body) <= limit < 4 * 2**20 / 10
    assert json_structure_error(body, SHAPE, BATCH) is None
    assert len(encode_request(x, "protobuf")) <= limit
    assert max_payload_bytes(SHAPE, BATCH, 1000) == 1000              # the configured cap still holds


def test_a_huge_batch_of_tiny_lists_is_refused_by_counting():
    body = b'{"inputs": [' + b"[[0]], " * 30_000 + b"[[0]]]}"
    assert "lists" in json_structure_error(body, SHAPE, BATCH)
    flat = b'{"inputs": [[[' + b"0," * 20_000 + b"0]]]}"
    assert "separators" in json_structure_error(flat, SHAPE, BATCH)
