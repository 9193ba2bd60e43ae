"""The server process's heap: no cyclic-GC pauses over what was loaded at start.

CPython's cyclic collector walks every tracked object of the generation it collects. The
oldest generation holds the whole loaded engine (modules, traces, the tensors' Python
wrappers, gRPC and protobuf machinery), so each full collection of a loaded embedded server
stopped every thread for up to 60 ms (3 in 5 s at 550 requests/s), long enough for every
request in flight to miss a 15 ms budget. `freeze_loaded`, called once the server has loaded,
moves everything alive into the permanent generation, which the collector skips; what requests
allocate afterwards is collected as before.
"""
from __future__ import annotations

import gc


def freeze_loaded() -> None:
    """Collect once, then exempt every surviving object from later collections."""
    gc.collect()
    gc.freeze()
