"""v2 typed contents refuse JSON booleans among numbers with the protocol's own check (`holds_bool`),
not a copy of it."""
from __future__ import annotations

import numpy as np
import pytest

from npas_serve.protocol.request import RequestError, RequestLimits, holds_bool
from npas_serve.servers.v2 import tensors
from npas_serve.servers.v2.tensors import Tensor, V2Request, request_fields

LIMITS = RequestLimits((1, 40), ("wide", "mid", "narrow"), 3, max_batch=16, example_shapes=((40,),))


@pytest.mark.parametrize("values", [[0.5] * 39 + [True], [[0.5] * 39 + [False]]], ids=["flat", "nested"])
def test_one_boolean_among_typed_numbers_is_refused(values):
    """numpy makes the list float64, so only the boolean check sees the one boolean."""
    assert np.asarray(values).dtype.kind == "f"
    with pytest.raises(RequestError) as err:
        request_fields(V2Request("npas", "", "", (Tensor("inputs", "FP32", (1, 40), values=values),)), LIMITS)
    assert err.value.field == "inputs" and "only numbers" in str(err.value)


def test_the_check_is_the_protocols_own():
    assert tensors.holds_bool is holds_bool
    assert not any(name in vars(tensors) for name in ("_has_bool", "_holds_bool"))
