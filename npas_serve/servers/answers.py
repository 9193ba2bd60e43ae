"""The engine's answers awaited on an asyncio loop: what every grpc.aio servicer runs a request with.

The engine's device thread hands each answer (or the error that ends the request) to the
loop; a waiting call holds no thread. Leaving the iteration early (the call was cancelled,
its gRPC deadline passed) drops the request's remaining work from the queue or the batch.
"""
from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from typing import AsyncIterator

from npas_serve.engine import Engine
from npas_serve.protocol import InferenceRequest, InferenceResponse


class _Mailbox:
    """Items posted to one event loop from other threads, with one wake-up for however many arrive
    before the loop runs: a batch's step ends many requests at once, and every
    `call_soon_threadsafe` writes to the loop's self-pipe, which the loop then reads and handles."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)       # weak: `_mailboxes` holds this by its loop, which must be able to go
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._woken = False                  # a drain is scheduled and has not started

    def post(self, box: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((box, item))
            if self._woken:
                return
            self._woken = True
        loop = self._loop()
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self._drain)
        except RuntimeError:                 # the loop has closed: the server stopped, nobody waits
            pass

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._woken = self._items, deque(), False
        for box, item in items:
            box.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()     # loop -> its _Mailbox


async def awaited_answers(engine: Engine, request: InferenceRequest,
                          intermediate: bool) -> AsyncIterator[InferenceResponse]:
    """Each answer as it exists, the last one `final`; the error that ended the request is raised."""
    loop, loop_thread = asyncio.get_running_loop(), threading.get_ident()
    mailbox = _mailboxes.get(loop) or _mailboxes.setdefault(loop, _Mailbox(loop))
    box: asyncio.Queue = asyncio.Queue()

    def deliver(item) -> None:
        if threading.get_ident() == loop_thread:    # refused in `submit`, on the loop: no wake-up needed
            box.put_nowait(item)
        else:                                       # from the device thread
            mailbox.post(box, item)

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
