"""What one roll-out step receives, and the states the roll-out drives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.domain.clock import utcnow
from shared.domain.runs import RunState
from shared.ports import Blobs, FineTuneBackend, Ledger, RunEvents, ThroughputHistory, Upstream
from shared.settings import Settings
from shared.usecases.run_events import NO_RUN_EVENTS

LEASE_TTL = timedelta(minutes=5)
IN_FLIGHT = (
    RunState.SUBMITTED,
    RunState.RUNNING,
    RunState.SUCCEEDED,
    RunState.REGISTERING,
    RunState.DEPLOYING,
    RunState.SMOKE_TESTING,
    RunState.EVALUATING,
    RunState.SHIFTING_TRAFFIC,
)
REPORT_STATES = frozenset({RunState.LIVE, RunState.ROLLED_BACK, RunState.FAILED, RunState.CANCELED, RunState.ERROR})


@dataclass(frozen=True)
class Rollout:
    """The ports and settings one rollout step needs."""

    ledger: Ledger
    backend: FineTuneBackend
    blobs: Blobs
    settings: Settings
    upstream: Upstream
    """How the smoke test and the evaluation gate call deployments: the scoring proxy's client and credential cache."""
    now: Callable[[], datetime] = utcnow
    events: RunEvents = NO_RUN_EVENTS
    """Where run events go; the tick publishes what state changes left in the outboxes."""
    history: ThroughputHistory | None = None
    """Where a completed run's training speed is remembered for later cost estimates (None: not remembered)."""


@dataclass(frozen=True)
class EventOutcome:
    action: str
    """ignored | advanced"""
    reason: str
    run_id: str | None = None
    state: str | None = None
