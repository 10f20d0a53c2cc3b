"""What one roll-out step receives, and the states the roll-out drives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.domain.clock import utcnow
from shared.domain.runs import RunState
from shared.domain.validation import TokenCounterFactory
from shared.ports import Blobs, FineTuneBackend, Ledger
from shared.settings import Settings

LEASE_TTL = timedelta(minutes=5)
"""The shortest lease: long enough for any single backend call of a step (they start long operations and
return; the longest ones are the smoke requests, which `lease_ttl_for` covers)."""
LEASE_MARGIN = timedelta(seconds=60)
DEFAULT_CLAIM_TTL = timedelta(minutes=15)
"""How long an ingest delivery's claim on a run binds (validation of a large file takes minutes)."""

IN_FLIGHT = (
    RunState.SUBMITTED,
    RunState.RUNNING,
    RunState.SUCCEEDED,
    RunState.REGISTERING,
    RunState.DEPLOYING,
    RunState.SMOKE_TESTING,
    RunState.SHIFTING_TRAFFIC,
)
ENDPOINT_LEASE_TTLS = 6
"""An endpoint lease lasts this many run-lease TTLs without renewal (30 minutes by default). The holding run
renews it at each of its steps (every tick, about every 5 s), so it lapses only when nothing has moved the
holder for that long; a shorter lapse would let another run's whole roll-out slip into the middle of the
holder's, and the traffic would shift twice."""
ENDPOINT_STATES = frozenset({RunState.DEPLOYING, RunState.SMOKE_TESTING, RunState.SHIFTING_TRAFFIC})
"""States whose steps act on the endpoint: a run in them holds (or waits for) the endpoint lease."""
REPORT_STATES = frozenset(
    {
        RunState.LIVE,
        RunState.ROLLED_BACK,
        RunState.FAILED,
        RunState.CANCELED,
        RunState.ERROR,
        RunState.SUPERSEDED,
    }
)


def lease_ttl_for(settings: Settings) -> timedelta:
    """How long a run lease (and an endpoint lease) lasts without renewal.

    The rule: a holder renews its lease (an ETag-conditional write) before every side effect and after every
    smoke row, so the TTL only has to cover the longest stretch between two renewals, which is one backend
    call; the longest is one smoke request, bounded by SMOKE_TIMEOUT_S. Hence SMOKE_TIMEOUT_S + 60 s, and
    never under 5 minutes. A holder that overruns it anyway (a stalled host) finds its next write refused
    (`ConflictError`) once another delivery has taken the lease over, and stops.
    """
    return max(LEASE_TTL, timedelta(seconds=settings.smoke_timeout_s) + LEASE_MARGIN)


@dataclass(frozen=True)
class Rollout:
    """The ports and settings one rollout step needs. `lease_ttl` overrides `lease_ttl_for(settings)` and
    `claim_ttl` the ingest claim's (tests that make a lease expire without waiting minutes);
    `token_counter` is what ingest needs to resume a validation (VALIDATION_TOKENIZER)."""

    ledger: Ledger
    backend: FineTuneBackend
    blobs: Blobs
    settings: Settings
    now: Callable[[], datetime] = utcnow
    lease_ttl: timedelta | None = None
    claim_ttl: timedelta = DEFAULT_CLAIM_TTL
    token_counter: TokenCounterFactory | None = None

    @property
    def ttl(self) -> timedelta:
        return self.lease_ttl if self.lease_ttl is not None else lease_ttl_for(self.settings)


@dataclass(frozen=True)
class EventOutcome:
    action: str
    """ignored | advanced | rejected"""
    reason: str
    run_id: str | None = None
    state: str | None = None
