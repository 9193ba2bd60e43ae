"""servers/heap.py: what the server loaded is exempt from the cyclic collector; what requests allocate is not."""
from __future__ import annotations

import gc

from npas_serve.servers.heap import freeze_loaded


def test_loaded_objects_are_frozen_and_later_cycles_still_collected():
    loaded = [object() for _ in range(10)]
    try:
        freeze_loaded()
        assert gc.get_freeze_count() >= len(loaded)
        cycle = []
        cycle.append(cycle)                 # garbage only the cyclic collector can free
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()                       # the rest of the suite runs with a normal collector
