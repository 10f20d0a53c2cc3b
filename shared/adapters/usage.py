"""The proxy's usage record per endpoint, for the janitor: last use and a request counter.

Table `tunegridusage` (settings.USAGE_TABLE), PartitionKey "endpoint", RowKey = endpoint name,
properties `last_used_at` (UTC datetime), `requests` (Int64, cumulative over every proxy instance)
and `updated_at`.

The proxy never writes storage on the request path: `UsageRecorder.record` bumps an in-memory counter
(about a microsecond) and, at most once a minute per endpoint, a background task merges the counter
into the row (read, add, ETag-conditional replace; several instances can flush concurrently). The
first request for an endpoint is flushed right away, so a freshly used endpoint is visible at once;
the last requests before a quiet spell are flushed by a timer at most a minute later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.domain.clock import parse_time, utcnow
from shared.errors import ConflictError

log = logging.getLogger(__name__)

USAGE_PARTITION = "endpoint"
FLUSH_INTERVAL_S = 60.0


@dataclass(frozen=True)
class UsageRecord:
    endpoint: str
    last_used_at: datetime | None
    requests: int
    updated_at: datetime | None = None


def _value(raw: Any) -> Any:
    return getattr(raw, "value", raw)  # azure-data-tables gives EntityProperty for some Edm types


def _record(endpoint: str, entity: Any) -> UsageRecord:
    return UsageRecord(
        endpoint=endpoint,
        last_used_at=parse_time(entity.get("last_used_at")),
        requests=int(_value(entity.get("requests")) or 0),
        updated_at=parse_time(entity.get("updated_at")),
    )


def read_usage(table: Any, endpoint: str) -> UsageRecord | None:
    """The proxy's record of `endpoint`, or None when the proxy never served it.

    `table` is an `azure.data.tables.TableClient` on USAGE_TABLE (AppContext.usage_table).
    """
    from azure.core.exceptions import ResourceNotFoundError

    try:
        entity = table.get_entity(USAGE_PARTITION, endpoint)
    except ResourceNotFoundError:
        return None
    return _record(endpoint, entity)


def read_last_used(table: Any, endpoint: str) -> datetime | None:
    record = read_usage(table, endpoint)
    return record.last_used_at if record else None


def add_usage(
    table: Any, endpoint: str, *, requests: int, last_used_at: datetime, now: datetime | None = None, attempts: int = 5
) -> UsageRecord:
    """Merge `requests` more uses, the latest at `last_used_at`, into the row (ETag-conditional)."""
    from azure.core import MatchConditions
    from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
    from azure.data.tables import EdmType, EntityProperty, UpdateMode

    for _ in range(attempts):
        stamp = now or utcnow()
        try:
            current = table.get_entity(USAGE_PARTITION, endpoint)
        except ResourceNotFoundError:
            current = None
        old = _record(endpoint, current) if current is not None else UsageRecord(endpoint, None, 0)
        last = last_used_at if old.last_used_at is None or last_used_at > old.last_used_at else old.last_used_at
        total = old.requests + requests
        entity = {
            "PartitionKey": USAGE_PARTITION,
            "RowKey": endpoint,
            "last_used_at": last,
            "requests": EntityProperty(total, EdmType.INT64),
            "updated_at": stamp,
        }
        try:
            if current is None:
                table.create_entity(entity)
            else:
                table.update_entity(
                    entity,
                    mode=UpdateMode.REPLACE,
                    etag=current.metadata["etag"],
                    match_condition=MatchConditions.IfNotModified,
                )
        except (ResourceExistsError, ResourceModifiedError):
            continue  # another instance flushed in between: re-read and merge again
        return UsageRecord(endpoint, last, total, stamp)
    raise ConflictError(f"usage row of endpoint {endpoint} kept changing; {requests} uses not recorded yet")


class _Counter:
    __slots__ = ("flushing", "handle", "last_flush", "last_used", "loop", "pending")

    def __init__(self) -> None:
        self.pending = 0
        self.last_used = 0.0
        self.last_flush = float("-inf")
        self.handle: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.flushing = False


class UsageRecorder:
    """In-memory request counters per endpoint, flushed to the usage table at most once per interval.

    `table` is the TableClient or a zero-argument callable returning it (built on first flush, so
    building the recorder touches no storage).
    """

    def __init__(
        self,
        table: Any,
        *,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._table_source = table
        self._table: Any = None
        self._interval = flush_interval_s
        self._wall = wall_clock
        self._mono = monotonic
        self._counters: dict[str, _Counter] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.flushes = 0

    def _table_client(self) -> Any:
        if self._table is None:
            self._table = self._table_source() if callable(self._table_source) else self._table_source
        return self._table

    def record(self, endpoint: str) -> None:
        """Count one request (hot path: no I/O; schedules a flush when none is pending)."""
        counter = self._counters.get(endpoint)
        if counter is None:
            counter = self._counters[endpoint] = _Counter()
        counter.pending += 1
        counter.last_used = self._wall()
        if not counter.flushing and (counter.handle is None or counter.loop is not _running_loop()):
            self._schedule(endpoint, counter)

    def pending(self) -> dict[str, int]:
        return {name: c.pending for name, c in self._counters.items() if c.pending}

    def _schedule(self, endpoint: str, counter: _Counter) -> None:
        loop = _running_loop()
        if loop is None:
            return  # no loop (sync caller): the next record() or flush() picks it up
        if counter.handle is not None:
            counter.handle.cancel()
        delay = max(0.0, counter.last_flush + self._interval - self._mono())
        counter.loop = loop
        counter.handle = loop.call_later(delay, self._start_flush, endpoint, counter)

    def _start_flush(self, endpoint: str, counter: _Counter) -> None:
        counter.handle = None
        if counter.flushing or not counter.pending:
            return
        counter.flushing = True
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._flush(endpoint, counter))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, endpoint: str, counter: _Counter) -> None:
        count, last = counter.pending, counter.last_used
        counter.pending = 0
        try:
            await asyncio.to_thread(self._write, endpoint, count, last)
        except BaseException as exc:
            counter.pending += count  # keep them for the next flush
            if not isinstance(exc, Exception):
                raise
            log.warning(
                "usage of endpoint %s not recorded yet (%s); will retry",
                endpoint,
                type(exc).__name__,
                extra={"endpoint": endpoint},
            )
        finally:
            counter.flushing = False
            counter.last_flush = self._mono()
            if counter.pending:
                self._schedule(endpoint, counter)

    def _write(self, endpoint: str, count: int, last_used: float) -> None:
        add_usage(self._table_client(), endpoint, requests=count, last_used_at=datetime.fromtimestamp(last_used, UTC))
        self.flushes += 1
        log.debug("usage of endpoint %s: +%d requests", endpoint, count, extra={"endpoint": endpoint})

    async def flush(self) -> None:
        """Write every pending counter now (shutdown, tests); waits for flushes already running."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for endpoint, counter in self._counters.items():
            if counter.pending and not counter.flushing:
                if counter.handle is not None:
                    counter.handle.cancel()
                    counter.handle = None
                counter.flushing = True
                await self._flush(endpoint, counter)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
