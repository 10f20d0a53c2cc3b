"""Runs: the states of one dataset version, the legal moves between them, and the run record.

The record is the single source of truth about a run. Every state change is an ETag-conditional
update (`Ledger.transition`, the one place a move is written), so two concurrent deliveries can never
both move a run: the loser gets `ConflictError` and re-reads. The change also appends its event to the
record's outbox (`shared.domain.run_events`), in that same write, so no state change goes unannounced.

End states: `invalid`, `failed`, `canceled`, `rolled-back`, `retired`, `error`, `superseded` (a newer
version of the same dataset name passed validation before this run went live) and `duplicate` (the same
content and sidecar as a run that is still alive, which is reused instead). Any state before `live` can
end in `canceled`, `error` or `superseded`, so no run can be stuck in one.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from shared.domain.clock import utcnow
from shared.errors import ConflictError

PARTITION = "runs"


class RunState(enum.StrEnum):
    RECEIVED = "received"
    VALIDATING = "validating"
    INVALID = "invalid"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    REGISTERING = "registering"
    DEPLOYING = "deploying"
    SMOKE_TESTING = "smoke-testing"
    EVALUATING = "evaluating"
    SHIFTING_TRAFFIC = "shifting-traffic"
    LIVE = "live"
    ROLLED_BACK = "rolled-back"
    RETIRED = "retired"
    ERROR = "error"
    SUPERSEDED = "superseded"
    DUPLICATE = "duplicate"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {
        RunState.INVALID,
        RunState.FAILED,
        RunState.CANCELED,
        RunState.ROLLED_BACK,
        RunState.RETIRED,
        RunState.ERROR,
        RunState.SUPERSEDED,
        RunState.DUPLICATE,
    }
)

S = RunState
_ENDS = frozenset({S.CANCELED, S.ERROR, S.SUPERSEDED})
"""Where every state before `live` may end: cancel, a non-transient failure, a newer version."""
TRANSITIONS: Mapping[RunState, frozenset[RunState]] = {
    S.RECEIVED: frozenset({S.VALIDATING}) | _ENDS,
    S.VALIDATING: frozenset({S.INVALID, S.SUBMITTING, S.DUPLICATE}) | _ENDS,
    S.SUBMITTING: frozenset({S.SUBMITTED}) | _ENDS,
    S.SUBMITTED: frozenset({S.RUNNING, S.SUCCEEDED, S.FAILED}) | _ENDS,
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED}) | _ENDS,
    S.SUCCEEDED: frozenset({S.REGISTERING}) | _ENDS,
    S.REGISTERING: frozenset({S.DEPLOYING}) | _ENDS,
    S.DEPLOYING: frozenset({S.SMOKE_TESTING, S.ROLLED_BACK}) | _ENDS,
    S.SMOKE_TESTING: frozenset({S.EVALUATING, S.ROLLED_BACK}) | _ENDS,
    S.EVALUATING: frozenset({S.SHIFTING_TRAFFIC, S.ROLLED_BACK}) | _ENDS,
    S.SHIFTING_TRAFFIC: frozenset({S.LIVE, S.ROLLED_BACK}) | _ENDS,
    S.LIVE: frozenset({S.RETIRED}),
}
"""Legal moves. Anything else is refused, so an out-of-order event cannot move a run backwards."""

ALIVE = frozenset(set(RunState) - TERMINAL)
"""States of a run that may still train, deploy or serve (`live` included)."""

NEVER_LIVE = TERMINAL - {RunState.RETIRED, RunState.DUPLICATE}
"""Ends of a run that never went live (`retired` went live first; a `duplicate` reuses a run that may)."""

# States that only ever move forward along this order; used to ignore stale events.
ORDER = [
    S.RECEIVED,
    S.VALIDATING,
    S.SUBMITTING,
    S.SUBMITTED,
    S.RUNNING,
    S.SUCCEEDED,
    S.REGISTERING,
    S.DEPLOYING,
    S.SMOKE_TESTING,
    S.EVALUATING,
    S.SHIFTING_TRAFFIC,
    S.LIVE,
    S.RETIRED,
]
"""The end states other than `retired` (`TERMINAL`) leave this order: each can follow any state before `live`."""

IN_FLIGHT = frozenset(ORDER[ORDER.index(S.SUBMITTED) : ORDER.index(S.LIVE)])
"""States the roll-out drives, from the submitted job to the traffic shift: events and ticks move them on."""


def run_id_for(container: str, blob: str, version: str) -> str:
    """Deterministic id of one dataset version: the same blob version always maps to the same run."""
    digest = hashlib.sha256(f"{container}/{blob}\n{version}".encode()).hexdigest()
    return "r" + digest[:15]


_RUN_ID = re.compile(r"r[0-9a-f]{15}")


def is_run_id(value: str) -> bool:
    """True for an id `run_id_for` makes. Anything else (from an event tag, a URL) names no run of ours and is
    never used as a table key: Azure Tables refuse `/`, `\\`, `#`, `?` and control characters in keys."""
    return _RUN_ID.fullmatch(value) is not None


_JSON_FIELDS = ("timeline", "params", "metrics", "smoke", "extra", "outbox", "gate", "estimate")
_LIST_FIELDS = ("timeline", "outbox")


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    state: RunState
    container: str
    blob: str
    blob_version: str
    created_at: datetime
    updated_at: datetime
    timeline: tuple[tuple[str, str], ...] = ()
    backend: str = ""
    sha256: str = ""
    report_url: str = ""
    run_report_url: str = ""
    job_name: str = ""
    job_url: str = ""
    base_model: str = ""
    model_name: str = ""
    model_version: str = ""
    model_id: str = ""
    endpoint: str = ""
    deployment: str = ""
    previous_deployment: str = ""
    operation: str = ""
    error: str = ""
    claimed_at: str = ""
    generation: int = 0
    """The dataset head's sequence number this run took when it passed validation (`DatasetHead`): a run
    whose dataset head has moved past it was superseded by a newer version."""
    params: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    smoke: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    event_seq: int = 0
    """Sequence number of the run's latest event (one per state change, the creation included)."""
    outbox: tuple[Mapping[str, Any], ...] = ()
    """Events not yet published, oldest first (`shared.domain.run_events.run_event`)."""
    gate: Mapping[str, Any] = field(default_factory=dict)
    """The evaluation gate's verdict: both scores, the rows used, a few answers side by side."""
    estimate: Mapping[str, Any] = field(default_factory=dict)
    """The cost (or, locally, time) estimate made before submission."""
    etag: str = field(default="", compare=False)

    @property
    def dataset(self) -> str:
        return self.blob

    def to_entity(self) -> dict[str, Any]:
        ent: dict[str, Any] = {"PartitionKey": PARTITION, "RowKey": self.run_id}
        for name, value in self.__dict__.items():
            if name in ("run_id", "etag"):
                continue
            if name == "timeline":
                ent[name] = json.dumps([list(t) for t in value])
            elif name in _JSON_FIELDS:
                ent[name] = json.dumps(list(value) if name in _LIST_FIELDS else value)
            elif isinstance(value, datetime):
                ent[name] = value
            elif isinstance(value, enum.Enum):
                ent[name] = value.value
            else:
                ent[name] = value
        return ent

    @classmethod
    def from_entity(cls, ent: Mapping[str, Any], etag: str = "") -> RunRecord:
        kwargs: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            if name == "run_id":
                kwargs[name] = ent["RowKey"]
            elif name == "etag":
                kwargs[name] = etag
            elif name not in ent:
                continue
            elif name == "state":
                kwargs[name] = RunState(ent[name])
            elif name == "timeline":
                kwargs[name] = tuple(tuple(t) for t in json.loads(ent[name] or "[]"))
            elif name == "outbox":
                kwargs[name] = tuple(json.loads(ent[name] or "[]"))
            elif name in _JSON_FIELDS:
                kwargs[name] = json.loads(ent[name] or "{}")
            elif name in ("created_at", "updated_at"):
                value = ent[name]
                kwargs[name] = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
            else:
                kwargs[name] = ent[name]
        return cls(**kwargs)

    def public(self) -> dict[str, Any]:
        """The record as plain JSON for CLI, status API and reports."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("etag", "claimed_at", "event_seq", "outbox")}
        out["state"] = self.state.value
        out["created_at"] = self.created_at.isoformat()
        out["updated_at"] = self.updated_at.isoformat()
        out["timeline"] = [{"state": s, "at": t} for s, t in self.timeline]
        return out


def new_record(*, run_id: str, container: str, blob: str, blob_version: str, backend: str) -> RunRecord:
    now = utcnow()
    record = RunRecord(
        run_id=run_id,
        state=RunState.RECEIVED,
        container=container,
        blob=blob,
        blob_version=blob_version,
        backend=backend,
        created_at=now,
        updated_at=now,
        timeline=((RunState.RECEIVED.value, now.isoformat()),),
    )
    return with_event(record, previous=None, at=now)


def with_event(record: RunRecord, *, previous: RunState | None, at: datetime) -> RunRecord:
    """`record` with the event of its latest state change appended to its outbox (next sequence number)."""
    from shared.domain.run_events import run_event  # that module builds on this one's types

    sequence = record.event_seq + 1
    event = run_event(record, previous=previous, sequence=sequence, at=at)
    return replace(record, event_seq=sequence, outbox=(*record.outbox, event))


def without_events(record: RunRecord, event_ids: Iterable[str]) -> RunRecord:
    """`record` with the given events taken out of its outbox (they were published)."""
    done = set(event_ids)
    return replace(record, outbox=tuple(e for e in record.outbox if e.get("id") not in done))


def apply_transition(
    record: RunRecord, to: RunState, expect: Iterable[RunState] | None, fields: Mapping[str, Any]
) -> RunRecord:
    """Check a move is legal and return the moved record, its event in the outbox (pure; storage adapters
    persist both in one conditional write)."""
    allowed = set(expect) if expect is not None else None
    if allowed is not None and record.state not in allowed:
        raise ConflictError(
            f"run {record.run_id} is {record.state.value}, expected one of {sorted(s.value for s in allowed)}"
        )
    if to not in TRANSITIONS.get(record.state, frozenset()):
        raise ConflictError(f"run {record.run_id}: illegal move {record.state.value} -> {to.value}")
    now = utcnow()
    moved = replace(
        record,
        state=to,
        updated_at=now,
        timeline=(*record.timeline, (to.value, now.isoformat())),
        **fields,
    )
    return with_event(moved, previous=record.state, at=now)
