"""Publishing run events: each run record's outbox goes to the `RunEvents` port, at least once, in order.

The event of a state change is written into the run record by the change itself (the outbox, see
`shared.domain.run_events`), so a crash can delay an event but never lose it. Publishing happens after
that write and is best effort: a failure is logged and never fails or blocks the run.

- `NotifyingLedger` wraps the ledger (the composition root does it when publishing is on): right after
  every write that recorded events (a run created, a state change, wherever it is made) it publishes the
  record's outbox and takes the published events out with one more conditional write.
- `publish_left_over`, called at the start of every roll-out tick, publishes what such a write left
  behind (a crash between the transition and the publish, a topic that was down): only events older than
  `LEFT_OVER_AFTER`, so it does not race an in-line publish in progress.

The fence: taking published events out of the outbox is a write, and a write changes the record's ETag,
which would break the fence of whoever holds the record (a roll-out step's run lease, an ingest claim: their
next conditional write would fail and they would stop as if they had lost it). So the outbox is only ever
written by the writer of the state change itself, conditional on the ETag that change produced (in line,
`NotifyingLedger`: the record it returns carries the new ETag, which a holder continues with), or by
`publish_left_over` on records nobody holds (`held`); a held record's events go out with its holder's next
state change, or with the first tick after the lease or claim is given back or expires.

An event may be published twice (a crash after the publish, before the outbox write); it always carries
the same id (`<run_id>-<sequence>`), on which subscribers de-duplicate.
"""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from shared.domain.clock import parse_time
from shared.domain.leases import DatasetHead, EndpointLease
from shared.domain.runs import RunRecord, RunState, without_events
from shared.errors import ConfigError, ConflictError, InvalidInput, PermissionDenied
from shared.ports import Ledger, RunEvents

log = logging.getLogger(__name__)

QUIET_AFTER_FAILURE_S = 60.0
"""After a failed publish, in-line publishing pauses this long (the timer retries): an outage of the topic
costs one timeout a minute, not one per state change."""
LEFT_OVER_AFTER = timedelta(seconds=30)
EVENT_TTL = timedelta(hours=24)
"""Events still unpublished after this long are dropped (logged), as Event Grid drops what it could not deliver
in 24 h: turning publishing on must not flood subscribers with old news."""
ACK_TRIES = 3


class RunEventsOff:
    """Publishing is off (RUN_EVENTS_TOPIC_ENDPOINT is empty): events stay in the outbox, one per state change."""

    enabled = False

    def publish(self, events: Sequence[Mapping[str, Any]]) -> None:
        raise ConfigError("run events are off: RUN_EVENTS_TOPIC_ENDPOINT is empty")


NO_RUN_EVENTS: RunEvents = RunEventsOff()


def _send(run_id: str, pending: Sequence[Mapping[str, Any]], events: RunEvents) -> bool:
    """Publish; True when done with these events (accepted, or refused for good and dropped)."""
    try:
        events.publish(pending)
    except InvalidInput as exc:
        log.error(
            "run %s: the topic refused events %s for good (%s); they are dropped",
            run_id,
            ", ".join(str(e.get("id")) for e in pending),
            exc,
            extra={"run_id": run_id},
        )
        return True
    except PermissionDenied as exc:
        log.error("run %s: run events not published: %s", run_id, exc, extra={"run_id": run_id})
        return False
    except Exception as exc:  # best effort by design: whatever went wrong, the run goes on and the timer retries
        log.warning(
            "run %s: run events not published now (%s: %s); the roll-out timer retries",
            run_id,
            type(exc).__name__,
            exc,
            extra={"run_id": run_id},
        )
        return False
    log.info(
        "run %s: published %s",
        run_id,
        ", ".join(f"{e.get('type')} ({e.get('id')})" for e in pending),
        extra={"run_id": run_id},
    )
    return True


def _ack(
    record: RunRecord,
    event_ids: Iterable[str],
    ledger: Ledger,
    *,
    tries: int,
    held: Callable[[RunRecord], bool] | None = None,
) -> RunRecord:
    """Take published events out of the outbox (conditional on the ETag); the stored record, or `record`
    when the write could not be made (the events stay and are published again, with the same ids). A record
    read again after a lost race is left alone when `held` says someone holds it (see the module doc)."""
    ids = set(event_ids)
    current = record
    try:
        for attempt in range(1, tries + 1):
            remaining = without_events(current, ids)
            if len(remaining.outbox) == len(current.outbox):
                return current
            try:
                return ledger.update(current, outbox=remaining.outbox)
            except ConflictError:
                fresh = ledger.get(record.run_id) if attempt < tries else None
                if fresh is None or (held is not None and held(fresh)):
                    break
                current = fresh
    except Exception as exc:  # the events were published; at worst they are published again
        log.warning("run %s: published events stay in the outbox: %s", record.run_id, exc)
        return record
    log.info(
        "run %s: published events stay in the outbox for now (the record changed meanwhile)",
        record.run_id,
        extra={"run_id": record.run_id},
    )
    return record


class NotifyingLedger:
    """A `Ledger` that publishes a run's pending events right after the write that recorded them.

    Reads, plain updates and the rows beside the records (endpoint leases, dataset heads, rejections) pass
    through. The record returned by `create` and `transition` is the one stored after the outbox write, so
    its ETag is current for the caller's next conditional write: a fenced holder (a run lease, an ingest
    claim) goes on with it. The outbox write is conditional on the ETag the state change produced, so it
    never overwrites anyone else's write; when it loses, the events stay for `publish_left_over`."""

    def __init__(
        self,
        inner: Ledger,
        events: RunEvents,
        *,
        quiet_s: float = QUIET_AFTER_FAILURE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._events = events
        self._quiet_s = quiet_s
        self._clock = clock
        self._quiet_until = 0.0

    @property
    def inner(self) -> Ledger:
        return self._inner

    def _announce(self, record: RunRecord) -> RunRecord:
        if not record.outbox or self._clock() < self._quiet_until:
            return record
        pending = tuple(record.outbox)
        if not _send(record.run_id, pending, self._events):
            self._quiet_until = self._clock() + self._quiet_s
            return record
        return _ack(record, (e["id"] for e in pending), self._inner, tries=1)

    def create(self, record: RunRecord) -> tuple[RunRecord, bool]:
        stored, created = self._inner.create(record)
        return (self._announce(stored) if created else stored), created

    def get(self, run_id: str) -> RunRecord | None:
        return self._inner.get(run_id)

    def transition(
        self, run: RunRecord | str, to: RunState, *, expect: Iterable[RunState] | None = None, **fields: Any
    ) -> RunRecord:
        return self._announce(self._inner.transition(run, to, expect=expect, **fields))

    def update(self, record: RunRecord, **fields: Any) -> RunRecord:
        return self._inner.update(record, **fields)

    def list(self) -> list[RunRecord]:
        return self._inner.list()

    def find_by_job(self, job_name: str) -> RunRecord | None:
        return self._inner.find_by_job(job_name)

    def find_by_dataset(self, container: str, blob: str) -> builtins.list[RunRecord]:
        return self._inner.find_by_dataset(container, blob)

    def get_endpoint_lease(self, endpoint: str) -> EndpointLease | None:
        return self._inner.get_endpoint_lease(endpoint)

    def put_endpoint_lease(self, lease: EndpointLease) -> EndpointLease:
        return self._inner.put_endpoint_lease(lease)

    def get_dataset_head(self, container: str, blob: str) -> DatasetHead | None:
        return self._inner.get_dataset_head(container, blob)

    def put_dataset_head(self, head: DatasetHead) -> DatasetHead:
        return self._inner.put_dataset_head(head)

    def reject(self, source: str, subject: str, reason: str) -> None:
        self._inner.reject(source, subject, reason)

    def rejections(self, *, limit: int = 100) -> builtins.list[dict[str, Any]]:
        return self._inner.rejections(limit=limit)

    def __getattr__(self, name: str) -> Any:
        """Any other ledger method passes through (its events, if it writes some, go out with the next tick)."""
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)


@dataclass(frozen=True)
class LeftOver:
    """What one `publish_left_over` pass did."""

    published: int = 0
    expired: int = 0
    failed: bool = False


def publish_left_over(
    ledger: Ledger,
    events: RunEvents,
    *,
    now: datetime,
    min_age: timedelta = LEFT_OVER_AFTER,
    ttl: timedelta = EVENT_TTL,
    held: Callable[[RunRecord], bool] | None = None,
) -> LeftOver:
    """Publish the events earlier writes left in the outboxes (older than `min_age`), run by run, oldest
    first; drop those older than `ttl`. Stops at the first failed publish (the topic is unreachable: the
    next tick tries again). Never raises.

    `held`: whether someone holds a record now (a run lease, an ingest claim). A held record is skipped,
    events and all: the outbox write would break its holder's fence (see the module doc)."""
    if not events.enabled:
        return LeftOver()
    published = expired = 0
    try:
        records = ledger.list()
    except Exception as exc:  # the tick goes on; the next one retries
        log.warning("run events: could not list runs: %s", exc)
        return LeftOver(failed=True)
    for record in records:
        if not record.outbox or (held is not None and held(record)):
            continue
        stamped = [(event, parse_time(event.get("time")) or now) for event in record.outbox]
        if now - min(at for _, at in stamped) < min_age:
            continue
        stale = [event for event, at in stamped if now - at > ttl]
        fresh = [event for event, at in stamped if now - at <= ttl]
        if stale:
            log.warning(
                "run %s: dropping %d events unpublished for over %s: %s",
                record.run_id,
                len(stale),
                ttl,
                ", ".join(str(e.get("id")) for e in stale),
                extra={"run_id": record.run_id},
            )
        if fresh and not _send(record.run_id, fresh, events):
            return LeftOver(published=published, expired=expired, failed=True)
        _ack(record, (e["id"] for e in stale + fresh), ledger, tries=ACK_TRIES, held=held)
        published += len(fresh)
        expired += len(stale)
    return LeftOver(published=published, expired=expired)
