"""What one roll-out step receives, and the states the roll-out drives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from shared.domain.clock import utcnow
from shared.domain.runs import RunState
from shared.domain.validation import TokenCounterFactory
from shared.errors import ConfigError
from shared.ports import Blobs, FineTuneBackend, Ledger, RunEvents, ThroughputHistory, Upstream, UpstreamReply
from shared.settings import Settings
from shared.usecases.estimate import CostPorts
from shared.usecases.run_events import NO_RUN_EVENTS

LEASE_TTL = timedelta(minutes=5)
"""The shortest lease: long enough for any single backend call of a step (they start long operations and
return; the longest ones are the smoke requests and the gate's rows, which `lease_ttl_for` covers)."""
GATE_CALL_TRIES = 2
"""Tries of one gate call when it is throttled or fails transiently (`gate.CALL_TRIES`)."""
GATE_MAX_RETRY_AFTER_S = 5.0
"""The longest a gate call waits on a throttled deployment's Retry-After before its second try."""
LEASE_MARGIN = timedelta(seconds=60)
DEFAULT_CLAIM_TTL = timedelta(minutes=15)
"""How long an ingest delivery's claim on a run binds (validation of a large file takes minutes)."""

ENDPOINT_LEASE_TTLS = 6
"""The expiry written on an endpoint lease, in run-lease TTLs (30 minutes by default), renewed at each step of
the holding run. Another run never takes the lease over while its holder is still in a roll-out state, expired
or not (`leases.hold_endpoint`); the expiry tells the undo whether another run is rolling out now
(`ending._take_out_deployment`)."""
ENDPOINT_STATES = frozenset(
    {RunState.DEPLOYING, RunState.SMOKE_TESTING, RunState.EVALUATING, RunState.SHIFTING_TRAFFIC}
)
"""States whose steps act on the endpoint: a run in them holds (or waits for) the endpoint lease. The gate
(`evaluating`) is one: it compares against the live deployment and may change the endpoint's mirrored
traffic, so another roll-out must not shift the traffic under it."""
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

    The rule: a holder renews its lease (an ETag-conditional write) before every side effect, before every
    smoke row and before every row of the evaluation gate, so the TTL only has to cover the longest stretch
    between two renewals. The longest is one gate row: the new and the live deployment are asked at once,
    each call tried up to twice (bounded by SMOKE_TIMEOUT_S each), with a wait of at most 5 s on a
    Retry-After between the tries. Hence 2 x SMOKE_TIMEOUT_S + 5 s + 60 s, and never under 5 minutes. A
    holder that overruns it anyway (a stalled host) finds its next write refused (`ConflictError`) once
    another delivery has taken the lease over, and stops.
    """
    row = timedelta(seconds=GATE_CALL_TRIES * settings.smoke_timeout_s + GATE_MAX_RETRY_AFTER_S)
    return max(LEASE_TTL, row + LEASE_MARGIN)


class _NoUpstream:
    """The `Upstream` of a `Rollout` built where no deployment is ever called (ingest, cancel): a call
    through it is a wiring mistake, and says so instead of failing on a missing attribute."""

    def _refuse(self) -> ConfigError:
        return ConfigError("no endpoint caller was wired into this roll-out (Rollout.upstream)")

    async def post_json(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> UpstreamReply:
        raise self._refuse()

    def open_stream(self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float) -> Any:
        raise self._refuse()

    def post_json_blocking(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> UpstreamReply:
        raise self._refuse()


NO_UPSTREAM: Upstream = _NoUpstream()


@dataclass(frozen=True)
class Rollout:
    """The ports and settings one rollout step needs. `lease_ttl` overrides `lease_ttl_for(settings)` and
    `claim_ttl` the ingest claim's (tests that make a lease expire without waiting minutes);
    `token_counter` is what ingest needs to resume a validation (VALIDATION_TOKENIZER)."""

    ledger: Ledger
    backend: FineTuneBackend
    blobs: Blobs
    settings: Settings
    upstream: Upstream = field(default_factory=lambda: NO_UPSTREAM)
    """How the smoke test and the evaluation gate call deployments: the scoring proxy's client and credential
    cache. Ingest and cancel call no deployment and leave it out (`NO_UPSTREAM`)."""
    now: Callable[[], datetime] = utcnow
    events: RunEvents = NO_RUN_EVENTS
    """Where run events go; the tick publishes what state changes left in the outboxes."""
    history: ThroughputHistory | None = None
    """Where a completed run's training speed is remembered for later cost estimates (None: not remembered)."""
    costs: CostPorts | None = None
    """Prices and throughput history for the cost estimate ingest makes before submission (also when the
    tick resumes an ingest left by a dead delivery); None: no price, the default throughput."""
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
