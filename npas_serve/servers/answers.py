"""The engine's answers awaited on an asyncio loop: what every grpc.aio servicer runs a request with.

The engine's device thread hands each answer (or the error that ends the request) to the
loop; a waiting call holds no thread. Leaving the iteration early (the call was cancelled,
its gRPC deadline passed) drops the request's remaining work from the queue or the batch.
"""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from npas_serve.engine import Engine
from npas_serve.protocol import InferenceRequest, InferenceResponse


async def awaited_answers(engine: Engine, request: InferenceRequest,
                          intermediate: bool) -> AsyncIterator[InferenceResponse]:
    """Each answer as it exists, the last one `final`; the error that ended the request is raised."""
    loop, loop_thread = asyncio.get_running_loop(), threading.get_ident()
    box: asyncio.Queue = asyncio.Queue()

    def deliver(item) -> None:
        if threading.get_ident() == loop_thread:    # refused in `submit`, on the loop: no wake-up needed
            box.put_nowait(item)
            return
        try:                                 # from the device thread
            loop.call_soon_threadsafe(box.put_nowait, item)
        except RuntimeError:                 # the loop has closed: the server stopped, nobody waits
            pass

    run, = engine.submit([request], [deliver], intermediate)
    try:
        while True:
            item = await box.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.final:
                return
    finally:
        run.cancel()                         # a no-op once it has ended
