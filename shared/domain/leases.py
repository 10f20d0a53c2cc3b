"""Leases and the dataset head: the values that decide who may act on a run, an endpoint or a dataset name.

- `RunLease`: one delivery (an event, a tick) holds a run for one step. It is a value, passed explicitly:
  the run id, a random token, the ETag of the record write that took or renewed it, and its expiry. Every
  write under it is conditional on that ETag, so once anyone else writes the record (another delivery that
  took over an expired lease, a cancel, a supersession) the holder's next write fails with `ConflictError`
  and it stops. The lease lives in the record's `operation` field as `state|token|expiry`.
- `EndpointLease`: one run at a time rolls out on an endpoint (creates its deployment, smoke-tests it,
  shifts traffic). A row of its own in the ledger table, ETag-conditional like the record.
- `DatasetHead`: the newest version of a dataset name that passed validation, with a sequence number that
  only grows. A run whose dataset head moved past its own number was superseded.

Pure values and rules; the ledger (`shared.ports.Ledger`) stores them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from shared.domain.clock import as_utc
from shared.domain.runs import RunRecord, RunState

ENDPOINTS_PARTITION = "endpoints"
DATASETS_PARTITION = "datasets"


@dataclass(frozen=True)
class RunLease:
    """The right to do one step of one run, until `expires_at`, as long as the record's ETag is `etag`."""

    run_id: str
    token: str
    etag: str
    expires_at: datetime
    state: RunState

    def encode(self) -> str:
        return f"{self.state.value}|{self.token}|{as_utc(self.expires_at).isoformat()}"

    def moved_to(self, record: RunRecord) -> RunLease:
        """The same lease after a write under it (the record's new ETag)."""
        return replace(self, etag=record.etag)


@dataclass(frozen=True)
class HeldLease:
    """What a record's `operation` field says about the lease on it."""

    state: str
    token: str
    expires_at: datetime


def lease_on(record: RunRecord) -> HeldLease | None:
    """The lease written on the record, or None when there is none or it cannot be read (then it binds
    nobody: an unreadable lease must not block a run forever)."""
    if not record.operation:
        return None
    state, _, rest = record.operation.partition("|")
    token, _, stamp = rest.partition("|")
    try:
        expires = as_utc(datetime.fromisoformat(stamp))
    except ValueError:
        return None
    return HeldLease(state=state, token=token, expires_at=expires)


def lease_binds(record: RunRecord, now: datetime) -> bool:
    """True when someone holds an unexpired lease on the record's current state."""
    held = lease_on(record)
    return held is not None and held.state == record.state.value and held.expires_at > as_utc(now)


def claim_binds(record: RunRecord, now: datetime, ttl: timedelta) -> bool:
    """True when an ingest delivery's claim on the record (`claimed_at` = `time|token`) is younger than `ttl`.
    An unreadable claim binds nobody, as an unreadable lease."""
    if not record.claimed_at:
        return False
    try:
        claimed = as_utc(datetime.fromisoformat(record.claimed_at.partition("|")[0]))
    except ValueError:
        return False
    return as_utc(now) - claimed <= ttl


@dataclass(frozen=True)
class EndpointLease:
    """The run that may roll out on `endpoint` now. `holder` is a run id ("" when released)."""

    endpoint: str
    holder: str = ""
    token: str = ""
    expires_at: datetime | None = None
    etag: str = ""

    def held_by(self, run_id: str) -> bool:
        return bool(self.holder) and self.holder == run_id

    def free_at(self, now: datetime) -> bool:
        """Released, or expired (its holder stopped renewing it)."""
        return not self.holder or self.expires_at is None or as_utc(self.expires_at) <= as_utc(now)

    def taken_by(self, run_id: str, token: str, now: datetime, ttl: timedelta) -> EndpointLease:
        return replace(self, holder=run_id, token=token, expires_at=as_utc(now) + ttl)

    def released(self) -> EndpointLease:
        return replace(self, holder="", token="", expires_at=None)


def dataset_key(container: str, blob: str) -> str:
    """A table key for a dataset name: blob names may hold characters keys may not (`/`, `#`, `?`, ...)."""
    return hashlib.sha256(f"{container}/{blob}".encode()).hexdigest()


@dataclass(frozen=True)
class DatasetHead:
    """The newest validated version of one dataset name (`container/blob`): its run and sequence number."""

    container: str
    blob: str
    run_id: str = ""
    generation: int = 0
    etag: str = ""

    @property
    def key(self) -> str:
        return dataset_key(self.container, self.blob)

    def advanced_to(self, run_id: str) -> DatasetHead:
        return replace(self, run_id=run_id, generation=self.generation + 1)


def superseded_by(record: RunRecord, head: DatasetHead | None) -> str | None:
    """The run that supersedes `record`, or None. A run is superseded when a newer version of its dataset
    name took the head after it (a higher generation) and it is not live yet: live runs are replaced by
    the newer run's own traffic shift, blue/green, never undone from the side."""
    if head is None or not head.run_id or head.run_id == record.run_id:
        return None
    if record.state == RunState.LIVE or record.state.terminal:
        return None
    if record.state in (RunState.RECEIVED, RunState.VALIDATING):
        return None  # not validated yet: it takes the head, or learns it is older, when it passes validation
    return head.run_id if head.generation > record.generation else None
