"""The proxy's usage record in Azurite: the janitor's reader, ETag-safe merging, and the recorder that
writes at most once per interval per endpoint and never on the request path."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared.adapters.usage import UsageRecord, UsageRecorder, add_usage, read_last_used, read_usage
from shared.settings import USAGE_TABLE

pytestmark = pytest.mark.azurite


class CountingTable:
    """The real Azurite TableClient, with its writes counted (and optionally failing)."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.writes = 0
        self.fail = False
        self.lock = threading.Lock()

    def get_entity(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail:
            raise ConnectionError("storage down")
        return self.table.get_entity(*args, **kwargs)

    def create_entity(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.writes += 1
        return self.table.create_entity(*args, **kwargs)

    def update_entity(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.writes += 1
        return self.table.update_entity(*args, **kwargs)


@pytest.fixture
def usage_table(storage: Any) -> Any:
    return storage.tables.get_table_client(USAGE_TABLE)


def test_reader_and_merge(usage_table: Any, unique: str) -> None:
    """read_usage is None for an unknown endpoint; add_usage merges counts and keeps the latest use."""
    endpoint = f"ep-{unique}"
    assert read_usage(usage_table, endpoint) is None and read_last_used(usage_table, endpoint) is None
    t1 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    add_usage(usage_table, endpoint, requests=3, last_used_at=t1)
    add_usage(usage_table, endpoint, requests=2, last_used_at=t1 - timedelta(minutes=5))  # an older instance's flush
    record = read_usage(usage_table, endpoint)
    assert isinstance(record, UsageRecord)
    assert (record.endpoint, record.requests, record.last_used_at) == (endpoint, 5, t1)
    assert record.updated_at is not None and record.updated_at.tzinfo is not None
    assert read_last_used(usage_table, endpoint) == t1
    entity = usage_table.get_entity("endpoint", endpoint)
    assert set(entity) >= {"PartitionKey", "RowKey", "last_used_at", "requests", "updated_at"}


def test_concurrent_flushes_from_several_instances_add_up(usage_table: Any, unique: str) -> None:
    """Instances flushing at the same moment lose nothing (ETag-conditional merge, retried on conflict)."""
    endpoint = f"ep-{unique}"
    now = datetime.now(UTC)
    threads = [
        threading.Thread(
            target=add_usage, args=(usage_table, endpoint), kwargs={"requests": 10, "last_used_at": now, "attempts": 20}
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    record = read_usage(usage_table, endpoint)
    assert record is not None and record.requests == 40


def test_recorder_writes_once_then_waits_a_minute(usage_table: Any, unique: str) -> None:
    """With the default interval, a burst of requests gives one write (the first); the rest wait in memory."""
    endpoint = f"ep-{unique}"
    table = CountingTable(usage_table)
    recorder = UsageRecorder(table)

    async def scenario() -> None:
        for _ in range(200):
            recorder.record(endpoint)
        await asyncio.sleep(0)  # the first flush is scheduled, never run inline
        assert table.writes == 0
        for _ in range(100):
            await asyncio.sleep(0.01)
            recorder.record(endpoint)
        assert table.writes == 1
        assert recorder.pending()[endpoint] >= 100
        await recorder.flush()  # shutdown path

    asyncio.run(scenario())
    record = read_usage(usage_table, endpoint)
    assert record is not None and record.requests == 300
    assert record.last_used_at is not None and datetime.now(UTC) - record.last_used_at < timedelta(seconds=30)


def test_recorder_flushes_at_most_once_per_interval(usage_table: Any, unique: str) -> None:
    """Steady traffic for ~1.5 s with a 0.5 s interval: about three writes, and every request counted."""
    endpoint, other = f"ep-{unique}", f"ep2-{unique}"
    table = CountingTable(usage_table)
    recorder = UsageRecorder(table, flush_interval_s=0.5)

    async def scenario() -> None:
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < 1.5:
            recorder.record(endpoint)
            sent += 1
            await asyncio.sleep(0.005)
        recorder.record(other)
        await asyncio.sleep(0.8)  # the timer flushes what the last interval collected
        assert recorder.pending() == {}
        assert 2 <= table.writes <= 6
        assert read_usage(usage_table, endpoint).requests == sent  # type: ignore[union-attr]
        assert read_usage(usage_table, other).requests == 1  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_failed_flush_keeps_the_counts(usage_table: Any, unique: str) -> None:
    """Storage down during a flush: the counts stay in memory and go out with the next flush."""
    endpoint = f"ep-{unique}"
    table = CountingTable(usage_table)
    table.fail = True
    recorder = UsageRecorder(table, flush_interval_s=0.2)

    async def scenario() -> None:
        for _ in range(5):
            recorder.record(endpoint)
        await asyncio.sleep(0.1)
        assert recorder.pending() == {endpoint: 5}
        table.fail = False
        await asyncio.sleep(0.4)
        assert recorder.pending() == {}

    asyncio.run(scenario())
    assert read_usage(usage_table, endpoint).requests == 5  # type: ignore[union-attr]


def test_service_shutdown_flushes_pending_usage(usage_table: Any, unique: str) -> None:
    """ScoringService.aclose writes the counts still waiting for their minute."""
    from shared.usecases.scoring import LiveModels, ScoringService
    from tests.scoring_support import MemoryLedger, proxy_settings

    endpoint = f"ep-{unique}"
    recorder = UsageRecorder(usage_table)

    class NoUpstream:
        async def post_json(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("not called")

    service = ScoringService(
        settings=proxy_settings(), models=LiveModels(MemoryLedger([]).list), upstream=NoUpstream(), usage=recorder
    )

    async def scenario() -> None:
        for _ in range(3):
            recorder.record(endpoint)
        await asyncio.sleep(0.2)  # the first flush (immediate) ran; later ones wait a minute
        recorder.record(endpoint)
        await service.aclose()

    asyncio.run(scenario())
    assert read_usage(usage_table, endpoint).requests == 4  # type: ignore[union-attr]
