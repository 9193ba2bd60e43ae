"""The client library: what it puts on the wire for the knobs a user passes."""
from __future__ import annotations

import time

import numpy as np
import pytest

from npas_serve.client import prediction_request
from npas_serve.protocol import RequestLimits, parse_request

LIMITS = RequestLimits((1, 4), ("a", "b"), 2)


@pytest.mark.parametrize("fmt", ["json", "protobuf"])
def test_a_deadline_goes_with_its_send_time(fmt):
    """The server keeps as long for the answer's way back as the request's way in took."""
    x = np.zeros((1, 1, 4), np.float32)
    before = time.time() * 1000
    dated = parse_request(dict(prediction_request("npas", "", x, fmt, {"deadline_unix_ms": before + 50}).input), LIMITS)
    bare = parse_request(dict(prediction_request("npas", "", x, fmt, {"latency_budget_ms": 50}).input), LIMITS)
    assert before <= dated.sent_unix_ms <= time.time() * 1000
    assert bare.sent_unix_ms is None
