"""Answers handed from the device thread to an event loop (servers/answers.py)."""
from __future__ import annotations

import asyncio
import gc
import threading
import weakref

from npas_serve.servers.answers import _Mailbox, _mailboxes


def test_a_burst_from_another_thread_arrives_in_order_with_one_wake_up_and_none_is_lost_after():
    async def main():
        loop = asyncio.get_running_loop()
        wake_ups = []
        wake = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: (wake_ups.append(args), wake(*args))
        mailbox, boxes = _Mailbox(loop), [asyncio.Queue() for _ in range(3)]

        def burst():
            for i in range(30):
                mailbox.post(boxes[i % 3], i)
        poster = threading.Thread(target=burst)
        poster.start()
        poster.join()                        # the loop is held: every post waits for one drain
        got = [[await box.get() for _ in range(10)] for box in boxes]
        assert got == [list(range(k, 30, 3)) for k in range(3)]
        assert len(wake_ups) == 1
        late = threading.Thread(target=mailbox.post, args=(boxes[0], "after"))
        late.start()
        late.join()
        assert await asyncio.wait_for(boxes[0].get(), timeout=10) == "after"   # a post after a drain wakes the loop
        assert len(wake_ups) == 2

    asyncio.run(main())


def test_a_post_to_a_closed_loop_is_dropped_quietly():
    loop = asyncio.new_event_loop()
    mailbox = _Mailbox(loop)
    loop.close()
    mailbox.post(asyncio.Queue(), "nobody waits")       # the server stopped: no error on the device thread


def test_a_loop_that_has_ended_is_not_kept_alive_by_its_mailbox():
    async def one_request_worth():
        loop = asyncio.get_running_loop()
        _mailboxes.setdefault(loop, _Mailbox(loop))
        return weakref.ref(loop)

    gone = asyncio.run(one_request_worth())
    gc.collect()
    assert gone() is None
