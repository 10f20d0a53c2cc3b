"""Small helpers shared by test modules."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | None], *, timeout_s: float = 10.0, what: str = "the condition", interval_s: float = 0.02
) -> T:
    """Poll `predicate` until it returns something truthy, and return that. Background work (a poller, a
    timer, a server thread) has no callback a test can join, so the test polls, with a deadline that
    fails loudly instead of hanging. An exception from `predicate` propagates at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last value: {value!r})")
        time.sleep(interval_s)
