"""The janitor use case: delete idle endpoints (and orphan 0 % deployments) that this app owns, safely.

`sweep_idle_endpoints` gathers the facts through its ports, applies the rules of
`shared.domain.janitor_rules`, re-checks just before acting, audits, logs and starts the deletes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from shared.domain.clock import as_utc, utcnow
from shared.domain.costs import endpoint_hourly_usd, idle_hours
from shared.domain.janitor_rules import (
    Decision,
    JanitorPolicy,
    Rule,
    RunRef,
    Usage,
    decide_deployment,
    decide_endpoint,
    latest,
    screen_endpoint,
)
from shared.domain.resources import EndpointInfo
from shared.domain.runs import RunState
from shared.errors import ConflictError, NotFound, TunegridError
from shared.ports import AuditLog, EndpointPort, LastProxyUse, PriceSource, RunLedgerPort
from shared.usecases.runs import retire_live

log = logging.getLogger(__name__)


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

    @property
    def savings(self) -> Savings:
        """What the endpoints deleted in this sweep (in a dry run: that would be) billed per hour, and the
        money they had cost while idle."""
        done = ("dry-run",) if self.dry_run else ("deleting",)
        deleted = [d for d in self.deletes if d.kind == "endpoint" and d.outcome in done]
        priced = [d for d in deleted if d.hourly_usd is not None]
        return Savings(
            endpoints=len(deleted),
            priced=len(priced),
            usd_per_hour=round(sum(d.hourly_usd or 0.0 for d in priced), 4),
            idle_usd=round(sum((d.hourly_usd or 0.0) * (d.idle_hours or 0.0) for d in priced), 2),
            idle_hours=round(sum(d.idle_hours or 0.0 for d in deleted), 2),
        )

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
            "savings": asdict(self.savings),
        }


@dataclass(frozen=True)
class Savings:
    endpoints: int
    """Endpoints deleted (or, in a dry run, that would be)."""
    priced: int
    """Of those, the ones whose price is known."""
    usd_per_hour: float
    """Billing stopped per hour by the deletes: the total saved for every hour they would have kept running."""
    idle_usd: float
    """What they had cost while idle before the janitor deleted them."""
    idle_hours: float


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
        prices: PriceSource | None = None,
    ) -> None:
        self.prices = prices
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
                self.delete_endpoint(self.priced(decision, endpoint), runs)
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

    def priced(self, decision: Decision, endpoint: EndpointInfo) -> Decision:
        """The endpoint's price per hour (each deployment's size in the endpoint's region, times its instances)
        and the hours it ran idle; a price that cannot be read leaves the decision unpriced, never blocks it."""
        hours = idle_hours(latest(decision.last_use, endpoint.created_at), self.now)
        if not endpoint.deployments:  # a managed endpoint bills its deployments' instances only
            return replace(decision, idle_hours=hours, hourly_usd=0.0, price_source="no deployment")
        if self.prices is None or not endpoint.location:
            why = "no region (local backend)" if not endpoint.location else "no price source"
            return replace(decision, idle_hours=hours, price_source=why)
        try:
            quotes = [
                (self.prices.hourly_price(d.instance_type or "", endpoint.location), d.instance_count or 1)
                for d in endpoint.deployments
            ]
        except Exception as exc:  # the savings are for the record; the delete goes on without them
            log.warning("janitor: price of %s unavailable: %s", endpoint.name, exc, extra={"endpoint": endpoint.name})
            return replace(decision, idle_hours=hours, price_source=f"unavailable: {type(exc).__name__}")
        hourly = endpoint_hourly_usd(quotes)
        sources = sorted({f"{q.source} {q.as_of}" for q, _ in quotes if q is not None})
        return replace(decision, idle_hours=hours, hourly_usd=hourly, price_source=", ".join(sources))

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
        decision = replace(decision, retired_runs=tuple(live))
        done = self.carry_out(decision, lambda: self.backend.begin_delete_endpoint(decision.endpoint))
        if done is not None:
            retired = tuple(run_id for run_id in live if self.retire(run_id, done))
            self.finish(replace(done, retired_runs=retired))

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
        done = self.carry_out(decision, lambda: self.backend.begin_delete_deployment(decision.endpoint, deployment))
        if done is not None:
            self.finish(done)

    def carry_out(self, decision: Decision, delete: Callable[[], object]) -> Decision | None:
        """A delete decision's last steps: a dry run is audited and finished; otherwise the audit row is written
        first (no row, no delete), then `delete` runs. Returns the decision to finish when the resource is
        being deleted or already gone; None when it was finished here (dry run, no audit row, delete refused)."""
        if self.dry_run:
            self.audit_and_finish(replace(decision, outcome="dry-run"))
            return None
        decision = replace(decision, outcome="deleting")
        failed = self.audit_before_delete(decision)
        if failed is not None:
            self.finish(failed)
            return None
        try:
            delete()
        except NotFound:
            return replace(decision, outcome="gone")
        except TunegridError as exc:
            self.audit_and_finish(replace(decision, retired_runs=(), outcome=f"failed: {type(exc).__name__}: {exc}"))
            return None
        return decision

    def audit_and_finish(self, decision: Decision) -> None:
        """Audit a delete decision (a dry run, or a second row for a refused delete), best effort, then log it."""
        try:
            self.audit.write(decision, at=self.now, dry_run=self.dry_run, sweep_id=self.sweep_id)
        except Exception as exc:
            log.warning("janitor: audit row for %s not written: %s", decision.target, exc)
        self.finish(decision)

    def retire(self, run_id: str, decision: Decision) -> bool:
        reason = f"endpoint {decision.endpoint} deleted by the janitor ({decision.rule.value}: {decision.reason})"
        try:
            retired = retire_live(self.ledger, run_id, reason)
        except (ConflictError, NotFound) as exc:
            retired, why = None, str(exc)
        else:
            why = "no longer live"
        if retired is None:
            log.info(
                "janitor: run %s not retired: %s", run_id, why, extra={"run_id": run_id, "endpoint": decision.endpoint}
            )
            return False
        log.info("janitor: run %s retired", run_id, extra={"run_id": run_id, "endpoint": decision.endpoint})
        return True


def _read_usage_proxy_only(last_proxy_use: LastProxyUse, endpoint: str, usage: Usage) -> Usage:
    try:
        proxy = last_proxy_use(endpoint)
    except Exception as exc:
        return replace(usage, unavailable=f"proxy usage record: {type(exc).__name__}: {exc}")
    return replace(usage, proxy_last_use=latest(proxy, usage.proxy_last_use))


def sweep_idle_endpoints(
    *,
    backend: EndpointPort,
    ledger: RunLedgerPort,
    audit: AuditLog,
    last_proxy_use: LastProxyUse,
    policy: JanitorPolicy,
    dry_run: bool = False,
    now: Callable[[], datetime] = utcnow,
    prices: PriceSource | None = None,
) -> SweepReport:
    """One janitor pass: decide on every endpoint the backend lists, delete what is owned, idle and safe.

    Deletes are started, never waited on. In dry-run mode the same decisions are logged and audited
    (rows marked `dry_run`), and nothing is deleted or retired. With `prices`, each deleted endpoint's audit row
    records its price per hour and the hours it ran idle (`SweepReport.savings` adds them up). Errors listing endpoints or runs
    propagate (nothing is deleted then); a refused delete is recorded and the pass goes on.
    """
    at = as_utc(now())
    runs = [RunRef.from_record(r) for r in ledger.list()]
    sweep = _Sweep(
        backend=backend,
        ledger=ledger,
        audit=audit,
        last_proxy_use=last_proxy_use,
        policy=policy,
        dry_run=dry_run,
        now=at,
        prices=prices,
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
