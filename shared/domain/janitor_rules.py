"""The janitor's rules: pure decisions over gathered facts, testable as a table.

Deleting something in use, or something we do not own, is the worst failure this feature can have, so
every rule leans towards keeping: a missing creation time, an unknown provisioning state, unreadable
metrics or usage record, and a run mid-rollout all mean "keep" (`screen_endpoint`, `decide_endpoint`,
`decide_deployment`). The use case (`shared.usecases.janitor`) gathers the facts and acts.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from shared.domain.clock import as_utc
from shared.domain.naming import KEEP_TAG, OWNER_TAG, RUN_TAG
from shared.domain.resources import DeploymentInfo, EndpointActivity, EndpointInfo
from shared.domain.runs import RunRecord, RunState

if TYPE_CHECKING:
    from shared.settings import Settings


def _maybe_utc(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


Action = Literal["delete", "keep"]
Kind = Literal["endpoint", "deployment"]


class Rule(enum.StrEnum):
    """Stable ids of the janitor's rules: they appear in logs, audit rows and the CLI."""

    NOT_OWNED = "not-owned"
    KEEP_TAG = "keep-tag"
    IN_PROGRESS = "in-progress"
    ROLLOUT_ACTIVE = "rollout-active"
    GRACE = "grace"
    METRICS_UNAVAILABLE = "metrics-unavailable"
    IN_USE = "in-use"
    NOT_IDLE_LONG_ENOUGH = "not-idle-long-enough"
    IDLE = "idle"
    IN_LEDGER = "in-ledger"
    ORPHAN = "orphan"


ROLLOUT_STATES = frozenset(
    {RunState.REGISTERING, RunState.DEPLOYING, RunState.SMOKE_TESTING, RunState.EVALUATING, RunState.SHIFTING_TRAFFIC}
)
"""A run in one of these states may be between creating a 0 % deployment and shifting traffic to it (or be
waiting for the endpoint lease to do so), so its endpoint is kept. This cannot keep an endpoint forever: every
state before `live` can end (`canceled`, `error`, `superseded`, `rolled-back` are terminal), a step that fails
for good ends its run in `error`, and older versions of a dataset end `superseded` instead of waiting."""


def latest(*values: datetime | None) -> datetime | None:
    present = [as_utc(v) for v in values if v is not None]
    return max(present) if present else None


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


@dataclass(frozen=True)
class JanitorPolicy:
    """What the rules compare against: our instance name, the idle window and the grace period."""

    instance: str
    idle: timedelta
    grace: timedelta

    @classmethod
    def from_settings(
        cls, settings: Settings, *, idle_minutes: float | None = None, grace_minutes: float | None = None
    ) -> JanitorPolicy:
        idle = settings.idle_minutes if idle_minutes is None else idle_minutes
        grace = settings.janitor_grace_minutes if grace_minutes is None else grace_minutes
        if idle < 0 or grace < 0:
            raise ValueError("idle and grace minutes must not be negative")
        return cls(instance=settings.instance, idle=timedelta(minutes=idle), grace=timedelta(minutes=grace))


@dataclass(frozen=True)
class RunRef:
    """What the rules need to know about a run of the ledger."""

    run_id: str
    state: RunState
    endpoint: str = ""
    deployment: str = ""

    @classmethod
    def from_record(cls, record: RunRecord) -> RunRef:
        return cls(run_id=record.run_id, state=record.state, endpoint=record.endpoint, deployment=record.deployment)


@dataclass(frozen=True)
class Usage:
    """Last use of an endpoint by any path. `unavailable` says why it could not be read (never guess)."""

    proxy_last_use: datetime | None = None
    activity: EndpointActivity | None = None
    unavailable: str | None = None

    @property
    def last_use(self) -> datetime | None:
        return latest(self.proxy_last_use, self.activity.last_request_at if self.activity else None)


@dataclass(frozen=True)
class Decision:
    """One verdict on one endpoint or deployment. `outcome` and `retired_runs` are filled by the sweep."""

    kind: Kind
    endpoint: str
    action: Action
    rule: Rule
    reason: str
    deployment: str | None = None
    last_use: datetime | None = None
    outcome: str = ""
    retired_runs: tuple[str, ...] = ()
    hourly_usd: float | None = None
    """A deleted endpoint's price per hour (its deployments' sizes times their instances); None when unknown."""
    idle_hours: float | None = None
    """How long the endpoint had run idle (since its last use, or its creation) when it was deleted."""
    price_source: str = ""

    @property
    def target(self) -> str:
        return f"{self.endpoint}/{self.deployment}" if self.deployment else self.endpoint

    def public(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "endpoint": self.endpoint,
            "deployment": self.deployment,
            "action": self.action,
            "rule": self.rule.value,
            "reason": self.reason,
            "last_use": self.last_use.isoformat() if self.last_use else None,
            "outcome": self.outcome,
            "retired_runs": list(self.retired_runs),
            "hourly_usd": self.hourly_usd,
            "idle_hours": None if self.idle_hours is None else round(self.idle_hours, 2),
            "price_source": self.price_source,
        }


def _keep(kind: Kind, endpoint: str, rule: Rule, reason: str, **kw: Any) -> Decision:
    return Decision(kind=kind, endpoint=endpoint, action="keep", rule=rule, reason=reason, **kw)


def is_owned(endpoint: EndpointInfo, instance: str) -> bool:
    return endpoint.tags.get(OWNER_TAG) == instance


def is_keep_tagged(endpoint: EndpointInfo) -> bool:
    return str(endpoint.tags.get(KEEP_TAG, "")).strip().lower() == "true"


def runs_of_endpoint(endpoint: EndpointInfo, runs: Iterable[RunRef]) -> list[RunRef]:
    """Runs recorded against this endpoint, by name or by the run tag the endpoint carries."""
    run_tag = endpoint.tags.get(RUN_TAG)
    return [r for r in runs if r.endpoint == endpoint.name or (run_tag and r.run_id == run_tag)]


def _rollout_blocker(endpoint: EndpointInfo, runs: Sequence[RunRef]) -> str | None:
    for run in runs_of_endpoint(endpoint, runs):
        if run.state in ROLLOUT_STATES:
            return f"run {run.run_id} is {run.state.value} on this endpoint"
    for run in runs:
        if run.state in ROLLOUT_STATES and not run.endpoint:
            return f"run {run.run_id} is {run.state.value} and has no endpoint recorded yet, so it may target this one"
    return None


def screen_endpoint(
    endpoint: EndpointInfo, *, policy: JanitorPolicy, now: datetime, runs: Sequence[RunRef]
) -> Decision | None:
    """The rules that keep an endpoint whatever its usage; None when usage must decide."""
    name = endpoint.name
    if not is_owned(endpoint, policy.instance):
        owner = endpoint.tags.get(OWNER_TAG)
        why = f"owner tag is {owner!r}, not {policy.instance!r}" if owner else f"no {OWNER_TAG} tag"
        return _keep("endpoint", name, Rule.NOT_OWNED, why)
    if is_keep_tagged(endpoint):
        return _keep("endpoint", name, Rule.KEEP_TAG, f"tagged {KEEP_TAG}=true")
    if endpoint.provisioning_state.in_progress:
        return _keep("endpoint", name, Rule.IN_PROGRESS, f"endpoint is {endpoint.provisioning_state.value}")
    busy = [d for d in endpoint.deployments if d.provisioning_state.in_progress]
    if busy:
        listed = ", ".join(f"{d.name} ({d.provisioning_state.value})" for d in busy)
        return _keep("endpoint", name, Rule.IN_PROGRESS, f"deployment in progress: {listed}")
    blocker = _rollout_blocker(endpoint, runs)
    if blocker:
        return _keep("endpoint", name, Rule.ROLLOUT_ACTIVE, blocker)
    created = _maybe_utc(endpoint.created_at)
    if created is None:
        return _keep("endpoint", name, Rule.GRACE, "creation time unknown: treated as young")
    if now - created < policy.grace:
        return _keep(
            "endpoint",
            name,
            Rule.GRACE,
            f"created {created.isoformat()}, within the {_span(policy.grace)} grace period",
        )
    return None


def decide_endpoint(
    endpoint: EndpointInfo, *, policy: JanitorPolicy, now: datetime, runs: Sequence[RunRef], usage: Usage
) -> Decision:
    """Delete an owned endpoint only when every safety rule passes and nothing used it for the idle window."""
    screened = screen_endpoint(endpoint, policy=policy, now=now, runs=runs)
    if screened is not None:
        return screened
    name = endpoint.name
    if usage.unavailable is not None:
        return _keep(
            "endpoint",
            name,
            Rule.METRICS_UNAVAILABLE,
            f"usage could not be read ({usage.unavailable}); not deleting on a guess",
            last_use=usage.last_use,
        )
    window_start = now - policy.idle
    last_use = usage.last_use
    activity = usage.activity
    if activity is not None and activity.requests > 0:
        return _keep(
            "endpoint",
            name,
            Rule.IN_USE,
            f"{activity.requests} requests in the last {_span(policy.idle)} ({activity.source})",
            last_use=last_use,
        )
    if last_use is not None and last_use > window_start:
        return _keep(
            "endpoint",
            name,
            Rule.IN_USE,
            f"last used {last_use.isoformat()}, within {_span(policy.idle)}",
            last_use=last_use,
        )
    idle_since = latest(last_use, endpoint.created_at)
    assert idle_since is not None  # screen_endpoint keeps endpoints without a creation time
    if idle_since > window_start:
        return _keep(
            "endpoint",
            name,
            Rule.NOT_IDLE_LONG_ENOUGH,
            f"never used, but exists only since {idle_since.isoformat()}, under the {_span(policy.idle)} idle window",
            last_use=last_use,
        )
    used = f"last used {last_use.isoformat()}" if last_use else "never used"
    return Decision(
        kind="endpoint",
        endpoint=name,
        action="delete",
        rule=Rule.IDLE,
        reason=f"no requests by any path for {_span(policy.idle)} ({used})",
        last_use=last_use,
    )


def is_orphan_candidate(endpoint: EndpointInfo, deployment: DeploymentInfo) -> bool:
    """A deployment taking no traffic and no mirrored traffic."""
    return endpoint.traffic.get(deployment.name, 0) <= 0 and endpoint.mirror_traffic.get(deployment.name, 0) <= 0


def decide_deployment(
    endpoint: EndpointInfo,
    deployment: DeploymentInfo,
    *,
    policy: JanitorPolicy,
    now: datetime,
    runs: Sequence[RunRef],
) -> Decision | None:
    """Verdict on a 0 % deployment (None when it takes traffic). A 0 % deployment is normal mid-rollout."""
    if not is_orphan_candidate(endpoint, deployment):
        return None
    ep, dep = endpoint.name, deployment.name

    def keep(rule: Rule, reason: str) -> Decision:
        return _keep("deployment", ep, rule, f"0 % traffic; {reason}", deployment=dep)

    if not is_owned(endpoint, policy.instance):
        return keep(Rule.NOT_OWNED, "endpoint not owned by this app: reported only")
    if is_keep_tagged(endpoint):
        return keep(Rule.KEEP_TAG, f"endpoint tagged {KEEP_TAG}=true")
    if deployment.provisioning_state.in_progress:
        return keep(Rule.IN_PROGRESS, f"deployment is {deployment.provisioning_state.value}")
    if endpoint.provisioning_state.in_progress:
        return keep(Rule.IN_PROGRESS, f"endpoint is {endpoint.provisioning_state.value}")
    blocker = _rollout_blocker(endpoint, runs)
    if blocker:
        return keep(Rule.ROLLOUT_ACTIVE, blocker)
    named = [r for r in runs_of_endpoint(endpoint, runs) if r.deployment == dep and not r.state.terminal]
    if named:
        return keep(Rule.IN_LEDGER, f"run {named[0].run_id} ({named[0].state.value}) records it as its deployment")
    created = _maybe_utc(deployment.created_at)
    if created is None:
        return keep(Rule.GRACE, "creation time unknown: treated as young")
    if now - created < policy.grace:
        return keep(Rule.GRACE, f"created {created.isoformat()}, within the {_span(policy.grace)} grace period")
    return Decision(
        kind="deployment",
        endpoint=ep,
        deployment=dep,
        action="delete",
        rule=Rule.ORPHAN,
        reason=f"0 % traffic, not mirrored, created {created.isoformat()}",
    )
