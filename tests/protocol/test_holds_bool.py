"""JSON booleans among numbers (`holds_bool`, the one check every JSON-number parser uses): numpy
reads true/false as 1 and 0, so each would otherwise pass for a number."""
from __future__ import annotations

import json

import numpy as np
import pytest

from npas_serve.protocol.request import RequestError, RequestLimits, holds_bool, parse_request

LIMITS = RequestLimits((1, 40), ("wide", "mid", "narrow"), 3, max_batch=16, example_shapes=((40,),))


@pytest.mark.parametrize("values,found", [
    ([0.5, 1, 2], False),
    ([], False),
    ([[[0.5] * 3], [[1.0] * 3]], False),
    ([1, 0], False),                                        # the numbers 1 and 0 are not booleans
    ([0.5, True], True),
    ([[[0.5, 0.5]], [[0.5, False]]], True),                 # deep in nested lists
    (((0.5,), (0.5, True)), True),                          # tuples too (typed v2 contents)
])
def test_holds_bool(values, found):
    assert holds_bool(values) is found


def test_one_boolean_among_numbers_is_refused():
    """One boolean among floats: numpy makes them all float64, so only `holds_bool` sees it."""
    values = [0.5] * 39 + [True]
    assert np.asarray(values).dtype.kind == "f"
    with pytest.raises(RequestError) as err:
        parse_request({"data": json.dumps({"inputs": [values]}).encode()}, LIMITS)
    assert err.value.field == "inputs" and "boolean" in str(err.value)
