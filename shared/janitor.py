"""The janitor: delete idle endpoints (and orphan 0 % deployments) that this app owns, safely.

Deleting something in use, or something we do not own, is the worst failure this feature can have, so
every rule leans towards keeping: a missing creation time, an unknown provisioning state, unreadable
metrics or usage record, and a run mid-rollout all mean "keep". The decisions are pure functions of
gathered facts (`screen_endpoint`, `decide_endpoint`, `decide_deployment`), testable as a table;
`sweep_idle_endpoints` gathers the facts through its ports, re-checks, audits, logs and acts.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol

from shared.backends.base import (
    KEEP_TAG,
    OWNER_TAG,
    RUN_TAG,
    DeploymentInfo,
    EndpointActivity,
    EndpointInfo,
    Operation,
)
from shared.errors import ConflictError, NotFound, TunegridError
from shared.ledger import RunRecord, RunState

if TYPE_CHECKING:
    from shared.bootstrap import AppContext
    from shared.settings import Settings

log = logging.getLogger(__name__)

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
    {RunState.REGISTERING, RunState.DEPLOYING, RunState.SMOKE_TESTING, RunState.SHIFTING_TRAFFIC}
)
"""A run in one of these states may be between creating a 0 % deployment and shifting traffic to it."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _latest(*values: datetime | None) -> datetime | None:
    present = [v for v in (_aware(x) for x in values) if v is not None]
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
        return _latest(self.proxy_last_use, self.activity.last_request_at if self.activity else None)


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
    created = _aware(endpoint.created_at)
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
    idle_since = _latest(last_use, endpoint.created_at)
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
    created = _aware(deployment.created_at)
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


# ---- ports -------------------------------------------------------------------------------------


class EndpointPort(Protocol):
    """The part of `FineTuneBackend` the janitor uses."""

    def list_endpoints(self) -> list[EndpointInfo]: ...
    def get_endpoint(self, name: str) -> EndpointInfo | None: ...
    def get_endpoint_activity(self, endpoint: str, *, since: datetime) -> EndpointActivity: ...
    def begin_delete_endpoint(self, name: str) -> Operation: ...
    def begin_delete_deployment(self, endpoint: str, name: str) -> Operation: ...


class RunLedgerPort(Protocol):
    def list(self) -> list[RunRecord]: ...
    def transition(
        self, run_id: str, to: RunState, *, expect: Iterable[RunState] | None = None, **fields: Any
    ) -> RunRecord: ...


class AuditLog(Protocol):
    def write(self, decision: Decision, *, at: datetime, dry_run: bool, sweep_id: str) -> None: ...


LastProxyUse = Callable[[str], datetime | None]
"""Last time our scoring proxy served an endpoint (its usage record), or None when it never did."""


def audit_entity(decision: Decision, *, at: datetime, dry_run: bool, sweep_id: str) -> dict[str, Any]:
    """The audit row: partition by UTC day, row key sortable by time and unique."""
    at = _aware(at) or utcnow()
    at = at.astimezone(UTC)
    return {
        "PartitionKey": at.strftime("%Y-%m-%d"),
        "RowKey": f"{at.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:12]}",
        "action": decision.action,
        "kind": decision.kind,
        "target": decision.target,
        "endpoint": decision.endpoint,
        "deployment": decision.deployment or "",
        "rule": decision.rule.value,
        "reason": decision.reason,
        "last_use": decision.last_use.isoformat() if decision.last_use else "",
        "outcome": decision.outcome,
        "retired_runs": ",".join(decision.retired_runs),
        "dry_run": dry_run,
        "sweep_id": sweep_id,
        "at": at,
    }


class TableAuditLog:
    """`AuditLog` over a table client (`azure.data.tables.TableClient` for the `tunegridaudit` table)."""

    def __init__(self, table: Any) -> None:
        self._table = table

    def write(self, decision: Decision, *, at: datetime, dry_run: bool, sweep_id: str) -> None:
        self._table.create_entity(audit_entity(decision, at=at, dry_run=dry_run, sweep_id=sweep_id))


# ---- the use case ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepReport:
    sweep_id: str
    at: datetime
    dry_run: bool
    policy: JanitorPolicy
    decisions: tuple[Decision, ...] = field(default_factory=tuple)

    @property
    def deletes(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "delete"]

    @property
    def deleted_endpoints(self) -> list[str]:
        return [d.endpoint for d in self.deletes if d.kind == "endpoint" and d.outcome == "deleting"]

    @property
    def failures(self) -> list[Decision]:
        return [d for d in self.decisions if d.outcome.startswith("failed")]

    def public(self) -> dict[str, Any]:
        return {
            "sweep_id": self.sweep_id,
            "at": self.at.isoformat(),
            "dry_run": self.dry_run,
            "instance": self.policy.instance,
            "idle_minutes": self.policy.idle.total_seconds() / 60,
            "grace_minutes": self.policy.grace.total_seconds() / 60,
            "decisions": [d.public() for d in self.decisions],
            "deleted_endpoints": self.deleted_endpoints,
            "failed": len(self.failures),
        }


def _read_usage(backend: EndpointPort, last_proxy_use: LastProxyUse, endpoint: str, *, since: datetime) -> Usage:
    """Both usage sources; any failure to read one is recorded, never guessed around."""
    try:
        proxy = last_proxy_use(endpoint)
    except Exception as exc:  # the rule is "do not delete", whatever broke
        log.warning("janitor: usage record of %s unreadable: %s", endpoint, exc, extra={"endpoint": endpoint})
        return Usage(unavailable=f"proxy usage record: {type(exc).__name__}: {exc}")
    try:
        activity = backend.get_endpoint_activity(endpoint, since=since)
    except Exception as exc:
        log.warning("janitor: metrics of %s unreadable: %s", endpoint, exc, extra={"endpoint": endpoint})
        return Usage(proxy_last_use=proxy, unavailable=f"endpoint metrics: {type(exc).__name__}: {exc}")
    return Usage(proxy_last_use=proxy, activity=activity)


def _log_decision(decision: Decision, *, dry_run: bool, sweep_id: str) -> None:
    level = logging.ERROR if decision.outcome.startswith("failed") else logging.INFO
    log.log(
        level,
        "janitor %s %s %s [%s]: %s (last use %s; %s%s)",
        decision.action,
        decision.kind,
        decision.target,
        decision.rule.value,
        decision.reason,
        decision.last_use.isoformat() if decision.last_use else "none",
        decision.outcome,
        ", dry run" if dry_run else "",
        extra={
            "endpoint": decision.endpoint,
            "deployment": decision.deployment,
            "action": decision.action,
            "rule": decision.rule.value,
            "dry_run": dry_run,
            "sweep_id": sweep_id,
        },
    )


class _Sweep:
    def __init__(
        self,
        *,
        backend: EndpointPort,
        ledger: RunLedgerPort,
        audit: AuditLog,
        last_proxy_use: LastProxyUse,
        policy: JanitorPolicy,
        dry_run: bool,
        now: datetime,
    ) -> None:
        self.backend = backend
        self.ledger = ledger
        self.audit = audit
        self.last_proxy_use = last_proxy_use
        self.policy = policy
        self.dry_run = dry_run
        self.now = now
        self.sweep_id = uuid.uuid4().hex[:12]
        self.decisions: list[Decision] = []

    def finish(self, decision: Decision) -> None:
        """Log every decision; audit every decision on what we own (and every delete)."""
        if decision.action == "keep" and not decision.outcome:
            decision = replace(decision, outcome="kept")
        if decision.rule is not Rule.NOT_OWNED and decision.action == "keep":
            try:
                self.audit.write(decision, at=self.now, dry_run=self.dry_run, sweep_id=self.sweep_id)
            except Exception as exc:
                log.warning("janitor: audit row for %s not written: %s", decision.target, exc)
        _log_decision(decision, dry_run=self.dry_run, sweep_id=self.sweep_id)
        self.decisions.append(decision)

    def audit_before_delete(self, decision: Decision) -> Decision | None:
        """No unaudited deletion: the row is written first, and a failed write cancels the delete."""
        try:
            self.audit.write(decision, at=self.now, dry_run=self.dry_run, sweep_id=self.sweep_id)
        except Exception as exc:
            log.error("janitor: audit unavailable, not deleting %s: %s", decision.target, exc)
            return replace(decision, outcome=f"failed: audit row not written ({type(exc).__name__}); nothing deleted")
        return None

    def run(self, runs: Sequence[RunRef]) -> None:
        for endpoint in sorted(self.backend.list_endpoints(), key=lambda e: e.name):
            decision = screen_endpoint(endpoint, policy=self.policy, now=self.now, runs=runs)
            if decision is None:
                usage = _read_usage(self.backend, self.last_proxy_use, endpoint.name, since=self.now - self.policy.idle)
                decision = decide_endpoint(endpoint, policy=self.policy, now=self.now, runs=runs, usage=usage)
                if decision.action == "delete":
                    decision = self.confirm_endpoint(decision, runs, usage)
            if decision.action == "delete":
                self.delete_endpoint(decision, runs)
                continue
            self.finish(decision)
            for deployment in sorted(endpoint.deployments, key=lambda d: d.name):
                dep_decision = decide_deployment(endpoint, deployment, policy=self.policy, now=self.now, runs=runs)
                if dep_decision is None:
                    continue
                if dep_decision.action == "delete":
                    self.delete_deployment(dep_decision, runs)
                else:
                    self.finish(dep_decision)

    def confirm_endpoint(self, decision: Decision, runs: Sequence[RunRef], usage: Usage) -> Decision:
        """Re-read the endpoint and the proxy's record just before acting: a keep tag or a request may have landed."""
        try:
            fresh = self.backend.get_endpoint(decision.endpoint)
        except TunegridError as exc:
            return replace(
                decision, action="keep", outcome=f"failed: re-check before delete: {type(exc).__name__}: {exc}"
            )
        if fresh is None:
            return replace(decision, action="keep", outcome="gone", reason=decision.reason + "; endpoint already gone")
        usage = _read_usage_proxy_only(self.last_proxy_use, decision.endpoint, usage)
        return decide_endpoint(fresh, policy=self.policy, now=self.now, runs=runs, usage=usage)

    def delete_endpoint(self, decision: Decision, runs: Sequence[RunRef]) -> None:
        live = [r.run_id for r in runs if r.endpoint == decision.endpoint and r.state is RunState.LIVE]
        decision = replace(decision, retired_runs=tuple(live), outcome="dry-run" if self.dry_run else "deleting")
        if self.dry_run:
            self.audit_and_finish(decision)
            return
        failed = self.audit_before_delete(decision)
        if failed is not None:
            self.finish(failed)
            return
        try:
            self.backend.begin_delete_endpoint(decision.endpoint)
        except NotFound:
            decision = replace(decision, outcome="gone")
        except TunegridError as exc:
            self.audit_and_finish(replace(decision, retired_runs=(), outcome=f"failed: {type(exc).__name__}: {exc}"))
            return
        retired = tuple(run_id for run_id in live if self.retire(run_id, decision))
        self.finish(replace(decision, retired_runs=retired))

    def delete_deployment(self, decision: Decision, runs: Sequence[RunRef]) -> None:
        deployment = decision.deployment
        assert deployment is not None
        try:
            fresh = self.backend.get_endpoint(decision.endpoint)
        except TunegridError as exc:
            self.finish(
                replace(decision, action="keep", outcome=f"failed: re-check before delete: {type(exc).__name__}: {exc}")
            )
            return
        fresh_dep = next((d for d in fresh.deployments if d.name == deployment), None) if fresh else None
        if fresh is None or fresh_dep is None:
            self.finish(replace(decision, action="keep", outcome="gone", reason=decision.reason + "; already gone"))
            return
        rechecked = decide_deployment(fresh, fresh_dep, policy=self.policy, now=self.now, runs=runs)
        if rechecked is None or rechecked.action == "keep":
            if rechecked is not None:
                self.finish(rechecked)
            return
        decision = replace(decision, outcome="dry-run" if self.dry_run else "deleting")
        if self.dry_run:
            self.audit_and_finish(decision)
            return
        failed = self.audit_before_delete(decision)
        if failed is not None:
            self.finish(failed)
            return
        try:
            self.backend.begin_delete_deployment(decision.endpoint, deployment)
        except NotFound:
            decision = replace(decision, outcome="gone")
        except TunegridError as exc:
            self.audit_and_finish(replace(decision, outcome=f"failed: {type(exc).__name__}: {exc}"))
            return
        self.finish(decision)

    def audit_and_finish(self, decision: Decision) -> None:
        """Audit a delete decision (a dry run, or a second row for a refused delete), best effort, then log it."""
        try:
            self.audit.write(decision, at=self.now, dry_run=self.dry_run, sweep_id=self.sweep_id)
        except Exception as exc:
            log.warning("janitor: audit row for %s not written: %s", decision.target, exc)
        self.finish(decision)

    def retire(self, run_id: str, decision: Decision) -> bool:
        try:
            self.ledger.transition(
                run_id,
                RunState.RETIRED,
                expect=[RunState.LIVE],
                error=f"endpoint {decision.endpoint} deleted by the janitor ({decision.rule.value}: {decision.reason})",
            )
        except (ConflictError, NotFound) as exc:
            log.info(
                "janitor: run %s not retired: %s", run_id, exc, extra={"run_id": run_id, "endpoint": decision.endpoint}
            )
            return False
        log.info("janitor: run %s retired", run_id, extra={"run_id": run_id, "endpoint": decision.endpoint})
        return True


def _read_usage_proxy_only(last_proxy_use: LastProxyUse, endpoint: str, usage: Usage) -> Usage:
    try:
        proxy = last_proxy_use(endpoint)
    except Exception as exc:
        return replace(usage, unavailable=f"proxy usage record: {type(exc).__name__}: {exc}")
    return replace(usage, proxy_last_use=_latest(proxy, usage.proxy_last_use))


def sweep_idle_endpoints(
    *,
    backend: EndpointPort,
    ledger: RunLedgerPort,
    audit: AuditLog,
    last_proxy_use: LastProxyUse,
    policy: JanitorPolicy,
    dry_run: bool = False,
    now: Callable[[], datetime] = utcnow,
) -> SweepReport:
    """One janitor pass: decide on every endpoint the backend lists, delete what is owned, idle and safe.

    Deletes are started, never waited on. In dry-run mode the same decisions are logged and audited
    (rows marked `dry_run`), and nothing is deleted or retired. Errors listing endpoints or runs
    propagate (nothing is deleted then); a refused delete is recorded and the pass goes on.
    """
    at = _aware(now()) or utcnow()
    runs = [RunRef.from_record(r) for r in ledger.list()]
    sweep = _Sweep(
        backend=backend,
        ledger=ledger,
        audit=audit,
        last_proxy_use=last_proxy_use,
        policy=policy,
        dry_run=dry_run,
        now=at,
    )
    sweep.run(runs)
    report = SweepReport(
        sweep_id=sweep.sweep_id, at=at, dry_run=dry_run, policy=policy, decisions=tuple(sweep.decisions)
    )
    log.info(
        "janitor sweep %s: %d decisions, %d deletes, %d failed%s",
        report.sweep_id,
        len(report.decisions),
        len(report.deletes),
        len(report.failures),
        " (dry run)" if dry_run else "",
        extra={"sweep_id": report.sweep_id, "dry_run": dry_run},
    )
    return report


def proxy_last_use_from_table(usage_table: Any) -> LastProxyUse:
    """The proxy's usage record (`shared.usage`) as the janitor's `LastProxyUse` port.

    Imported per call: should the module or its table be unusable, the error lands in the decision
    (`metrics-unavailable`, nothing deleted) instead of failing the whole sweep."""

    def last_use(endpoint: str) -> datetime | None:
        from shared.usage import read_last_used

        return read_last_used(usage_table, endpoint)

    return last_use


def sweep_from_context(
    ctx: AppContext,
    *,
    dry_run: bool | None = None,
    idle_minutes: float | None = None,
    grace_minutes: float | None = None,
    last_proxy_use: LastProxyUse | None = None,
    now: Callable[[], datetime] = utcnow,
) -> SweepReport:
    """Wire the sweep from the process's `AppContext` (timer trigger and CLI)."""
    settings = ctx.settings
    policy = JanitorPolicy.from_settings(settings, idle_minutes=idle_minutes, grace_minutes=grace_minutes)
    return sweep_idle_endpoints(
        backend=ctx.backend,
        ledger=ctx.ledger,
        audit=TableAuditLog(ctx.audit_table),
        last_proxy_use=last_proxy_use or proxy_last_use_from_table(ctx.usage_table),
        policy=policy,
        dry_run=settings.janitor_dry_run if dry_run is None else dry_run,
        now=now,
    )
