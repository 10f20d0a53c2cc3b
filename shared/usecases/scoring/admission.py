"""Admission control: at most a deployment's capacity of calls in flight to it from this process, the
rest queued first come, first served.

A deployment serves `instance_count x max_concurrent_requests_per_instance` requests at once and
answers 429 past that. One `Gate` per deployment holds that many slots. A request that finds them
taken waits in a FIFO queue, at most `queue_timeout_s` and behind at most `queue_max` others; past
either limit it is refused with `QueueRejected` (429) and a Retry-After estimated from the observed
service time. A waiter that is cancelled (its client hung up) leaves the queue at once, and a slot
handed to it passes on to the next in line.

The limit is per worker process: N processes (Flex Consumption instances x workers) admit up to N x
capacity calls together, and the deployment's own 429s (retried by the service) cover the excess.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from shared.usecases.scoring.errors import UpstreamBusy

INITIAL_SERVICE_S = 1.0
"""Service time assumed before any call to a deployment finished (for the first Retry-After)."""
_SMOOTHING = 0.2


class QueueRejected(UpstreamBusy):
    """The queue for a deployment is full, or a request waited in it past its timeout (429)."""


@dataclass
class _Waiter:
    future: asyncio.Future[None]
    since: float


class Gate:
    """The slots of one deployment and the FIFO queue in front of them (one event loop)."""

    def __init__(self, name: str, capacity: int, *, queue_max: int, clock: Callable[[], float]) -> None:
        self.name = name
        self.capacity = max(1, capacity)
        self.queue_max = queue_max
        self.in_flight = 0
        self.service_s = INITIAL_SERVICE_S
        self._clock = clock
        self._queue: deque[_Waiter] = deque()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def retry_after(self, position: int | None = None) -> float:
        """Seconds until a request at `position` in the queue (default: the end) would likely be served."""
        ahead = self.queued if position is None else position
        return max(1.0, math.ceil((ahead // self.capacity + 1) * self.service_s))

    async def acquire(self, wait_s: float) -> float:
        """Take a slot, waiting at most `wait_s` in line; returns when the slot was taken (clock time)."""
        if self.in_flight < self.capacity and not self._queue:
            self.in_flight += 1
            return self._clock()
        if len(self._queue) >= self.queue_max or wait_s <= 0:
            raise QueueRejected(
                f"deployment {self.name} is busy: {self.in_flight} calls in flight and {self.queued} queued",
                retry_after=self.retry_after(),
                code="queue_full",
            )
        waiter = _Waiter(asyncio.get_running_loop().create_future(), self._clock())
        self._queue.append(waiter)
        try:
            async with asyncio.timeout(wait_s):
                await waiter.future
        except TimeoutError:
            self._leave(waiter)
            raise QueueRejected(
                f"deployment {self.name} is busy: no slot within {wait_s:.0f} s (queue timeout)",
                retry_after=self.retry_after(),
                code="queue_timeout",
            ) from None
        except BaseException:  # cancelled (the client hung up): give up the place or the slot
            self._leave(waiter)
            raise
        return self._clock()

    def _leave(self, waiter: _Waiter) -> None:
        if waiter.future.done() and not waiter.future.cancelled():
            self.release(None)  # the slot was handed over just as we gave up: pass it on
        else:
            waiter.future.cancel()
            try:
                self._queue.remove(waiter)
            except ValueError:
                pass

    def resize(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        while self.in_flight < self.capacity and self._queue:
            waiter = self._queue.popleft()
            if not waiter.future.done():
                self.in_flight += 1
                waiter.future.set_result(None)

    def release(self, service_s: float | None) -> None:
        """Give the slot back (to the first live waiter, FIFO); `service_s` feeds the Retry-After estimate."""
        if service_s is not None:
            self.service_s += _SMOOTHING * (service_s - self.service_s)
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.future.done():
                waiter.future.set_result(None)  # the slot moves to it: in_flight stays the same
                return
        self.in_flight -= 1


class Admission:
    """The gates of every deployment this process calls (created on first use)."""

    def __init__(self, *, queue_max: int, queue_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.queue_max = queue_max
        self.queue_timeout_s = queue_timeout_s
        self._clock = clock
        self._gates: dict[str, Gate] = {}

    def gate(self, name: str, capacity: int) -> Gate:
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = Gate(name, capacity, queue_max=self.queue_max, clock=self._clock)
        elif gate.capacity != max(1, capacity):  # the deployment was scaled: the new capacity applies
            gate.resize(capacity)
        return gate
