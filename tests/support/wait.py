"""Waiting on a condition with a bounded timeout, instead of sleeping a fixed time and hoping."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float, interval_s: float = 0.25) -> T:
    """Call `condition` until it returns something truthy or `timeout_s` has passed; its last value.

    The caller asserts on the value, so a timeout fails with the caller's own message.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)
