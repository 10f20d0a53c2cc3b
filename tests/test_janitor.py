"""The janitor: the decision table (pure), the sweep over hand-written fakes of the backend port and the
in-memory ledger and audit log (one sweep also writes a real Azurite audit table), the CLI on Azurite, and
the real timer binding."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared.adapters.tables import TableAuditLog
from shared.domain.janitor_rules import Decision, JanitorPolicy, Rule, RunRef, Usage, decide_deployment, decide_endpoint
from shared.domain.naming import KEEP_TAG, OWNER_TAG, RUN_TAG
from shared.domain.resources import DeploymentInfo, EndpointActivity, EndpointInfo, Operation, ProvisioningState
from shared.domain.runs import RunRecord, RunState, new_record
from shared.errors import BackendError, ConflictError, MetricsUnavailable, TransientError
from shared.usecases.janitor import sweep_idle_endpoints
from shared.usecases.runs import RETIRE_ATTEMPTS
from tests.fakes import InMemoryAuditLog, InMemoryLedger

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
ME = "tg-test"
POLICY = JanitorPolicy(instance=ME, idle=timedelta(minutes=120), grace=timedelta(minutes=60))
OWNED = {OWNER_TAG: ME}
OK = ProvisioningState.SUCCEEDED


def ago(minutes: float) -> datetime:
    return NOW - timedelta(minutes=minutes)


def dep(name: str = "blue", *, state: ProvisioningState = OK, created: datetime | None = None) -> DeploymentInfo:
    return DeploymentInfo(endpoint="ep", name=name, provisioning_state=state, created_at=created or ago(600))


def endpoint(
    name: str = "ep",
    *,
    tags: Mapping[str, str] | None = None,
    created: datetime | None = None,
    age_min: float | None = 600,
    state: ProvisioningState = OK,
    deployments: tuple[DeploymentInfo, ...] | None = None,
    traffic: Mapping[str, int] | None = None,
    mirror: Mapping[str, int] | None = None,
) -> EndpointInfo:
    deployments = (dep(),) if deployments is None else deployments
    return EndpointInfo(
        name=name,
        provisioning_state=state,
        tags=dict(OWNED if tags is None else tags),
        created_at=created if created is not None else (ago(age_min) if age_min is not None else None),
        traffic=dict({"blue": 100} if traffic is None else traffic),
        mirror_traffic=dict(mirror or {}),
        deployments=tuple(replace(d, endpoint=name) for d in deployments),
    )


def activity(requests: int = 0, last: datetime | None = None) -> EndpointActivity:
    return EndpointActivity(requests=requests, last_request_at=last, source="test-metrics")


IDLE_USAGE = Usage(proxy_last_use=None, activity=activity())


ENDPOINT_TABLE = [
    # (id, endpoint, runs, usage, action, rule)
    ("not-owned-untagged", endpoint(tags={}), [], IDLE_USAGE, "keep", Rule.NOT_OWNED),
    ("not-owned-other-instance", endpoint(tags={OWNER_TAG: "someone-else"}), [], IDLE_USAGE, "keep", Rule.NOT_OWNED),
    ("keep-tag", endpoint(tags={**OWNED, KEEP_TAG: "true"}), [], IDLE_USAGE, "keep", Rule.KEEP_TAG),
    ("keep-tag-any-case", endpoint(tags={**OWNED, KEEP_TAG: " TRUE "}), [], IDLE_USAGE, "keep", Rule.KEEP_TAG),
    ("keep-tag-false-is-not-keep", endpoint(tags={**OWNED, KEEP_TAG: "false"}), [], IDLE_USAGE, "delete", Rule.IDLE),
    ("young", endpoint(age_min=10), [], IDLE_USAGE, "keep", Rule.GRACE),
    ("age-unknown", endpoint(age_min=None), [], IDLE_USAGE, "keep", Rule.GRACE),
    ("endpoint-updating", endpoint(state=ProvisioningState.UPDATING), [], IDLE_USAGE, "keep", Rule.IN_PROGRESS),
    ("endpoint-deleting", endpoint(state=ProvisioningState.DELETING), [], IDLE_USAGE, "keep", Rule.IN_PROGRESS),
    (
        "deployment-creating",
        endpoint(deployments=(dep(), dep("green", state=ProvisioningState.CREATING))),
        [],
        IDLE_USAGE,
        "keep",
        Rule.IN_PROGRESS,
    ),
    (
        "rollout-deploying-here",
        endpoint(),
        [RunRef("r1", RunState.DEPLOYING, endpoint="ep", deployment="green")],
        IDLE_USAGE,
        "keep",
        Rule.ROLLOUT_ACTIVE,
    ),
    (
        "rollout-smoke-by-run-tag",
        endpoint(tags={**OWNED, RUN_TAG: "r7"}),
        [RunRef("r7", RunState.SMOKE_TESTING, endpoint="renamed")],
        IDLE_USAGE,
        "keep",
        Rule.ROLLOUT_ACTIVE,
    ),
    (
        "rollout-registering-target-unknown",
        endpoint(),
        [RunRef("r2", RunState.REGISTERING)],
        IDLE_USAGE,
        "keep",
        Rule.ROLLOUT_ACTIVE,
    ),
    (
        "rollout-on-other-endpoint",
        endpoint(),
        [RunRef("r3", RunState.SHIFTING_TRAFFIC, endpoint="other")],
        IDLE_USAGE,
        "delete",
        Rule.IDLE,
    ),
    (
        "live-run-does-not-block",
        endpoint(),
        [RunRef("r4", RunState.LIVE, endpoint="ep")],
        IDLE_USAGE,
        "delete",
        Rule.IDLE,
    ),
    (
        "metrics-unavailable",
        endpoint(),
        [],
        Usage(unavailable="endpoint metrics: MetricsUnavailable: 403"),
        "keep",
        Rule.METRICS_UNAVAILABLE,
    ),
    (
        "proxy-used-recently",
        endpoint(),
        [],
        Usage(proxy_last_use=ago(5), activity=activity()),
        "keep",
        Rule.IN_USE,
    ),
    (
        "direct-caller-in-metrics",
        endpoint(),
        [],
        Usage(proxy_last_use=ago(500), activity=activity(3, ago(30))),
        "keep",
        Rule.IN_USE,
    ),
    (
        "metrics-count-without-time",
        endpoint(),
        [],
        Usage(activity=activity(1, None)),
        "keep",
        Rule.IN_USE,
    ),
    (
        "metrics-time-in-window",
        endpoint(),
        [],
        Usage(activity=activity(0, ago(119))),
        "keep",
        Rule.IN_USE,
    ),
    (
        "both-sources-old",
        endpoint(),
        [],
        Usage(proxy_last_use=ago(300), activity=activity(0, ago(200))),
        "delete",
        Rule.IDLE,
    ),
    ("never-used-old", endpoint(age_min=300), [], IDLE_USAGE, "delete", Rule.IDLE),
    ("never-used-younger-than-idle-window", endpoint(age_min=90), [], IDLE_USAGE, "keep", Rule.NOT_IDLE_LONG_ENOUGH),
    (
        "naive-proxy-time-is-utc",
        endpoint(),
        [],
        Usage(proxy_last_use=ago(5).replace(tzinfo=None), activity=activity()),
        "keep",
        Rule.IN_USE,
    ),
]


@pytest.mark.parametrize(
    ("ep", "runs", "usage", "action", "rule"),
    [case[1:] for case in ENDPOINT_TABLE],
    ids=[case[0] for case in ENDPOINT_TABLE],
)
def test_endpoint_decision_table(ep: EndpointInfo, runs: list[RunRef], usage: Usage, action: str, rule: Rule) -> None:
    """Each row of the endpoint decision table gives its action and rule, with a reason."""
    decision = decide_endpoint(ep, policy=POLICY, now=NOW, runs=runs, usage=usage)
    assert (decision.action, decision.rule) == (action, rule), decision.reason
    assert decision.reason and decision.endpoint == ep.name and decision.kind == "endpoint"


def test_last_use_is_the_latest_of_proxy_and_metrics() -> None:
    """The decision's last use is the later of the proxy record and the endpoint's own metrics."""
    usage = Usage(proxy_last_use=ago(300), activity=activity(0, ago(200)))
    decision = decide_endpoint(endpoint(), policy=POLICY, now=NOW, runs=[], usage=usage)
    assert decision.last_use == ago(200)
    usage = Usage(proxy_last_use=ago(150), activity=activity(0, ago(200)))
    assert decide_endpoint(endpoint(), policy=POLICY, now=NOW, runs=[], usage=usage).last_use == ago(150)


DEPLOYMENT_TABLE = [
    # (id, endpoint, deployment name, runs, expected (action, rule) or None)
    (
        "orphan-old",
        endpoint(deployments=(dep(), dep("old"))),
        "old",
        [],
        ("delete", Rule.ORPHAN),
    ),
    (
        "orphan-explicit-zero",
        endpoint(deployments=(dep(), dep("old")), traffic={"blue": 100, "old": 0}),
        "old",
        [],
        ("delete", Rule.ORPHAN),
    ),
    ("serving", endpoint(), "blue", [], None),
    (
        "mirrored-is-not-orphan",
        endpoint(deployments=(dep(), dep("green")), mirror={"green": 10}),
        "green",
        [],
        None,
    ),
    (
        "young",
        endpoint(deployments=(dep(), dep("new", created=ago(5)))),
        "new",
        [],
        ("keep", Rule.GRACE),
    ),
    (
        "age-unknown",
        endpoint(deployments=(dep(), replace(dep("new"), created_at=None))),
        "new",
        [],
        ("keep", Rule.GRACE),
    ),
    (
        "not-owned-reported-only",
        endpoint(tags={OWNER_TAG: "other"}, deployments=(dep(), dep("old"))),
        "old",
        [],
        ("keep", Rule.NOT_OWNED),
    ),
    (
        "keep-tagged-endpoint",
        endpoint(tags={**OWNED, KEEP_TAG: "True"}, deployments=(dep(), dep("old"))),
        "old",
        [],
        ("keep", Rule.KEEP_TAG),
    ),
    (
        "deployment-updating",
        endpoint(deployments=(dep(), dep("old", state=ProvisioningState.UPDATING))),
        "old",
        [],
        ("keep", Rule.IN_PROGRESS),
    ),
    (
        "zero-percent-mid-rollout-is-normal",
        endpoint(deployments=(dep(), dep("green"))),
        "green",
        [RunRef("r1", RunState.SMOKE_TESTING, endpoint="ep", deployment="green")],
        ("keep", Rule.ROLLOUT_ACTIVE),
    ),
    (
        "named-by-a-live-run",
        endpoint(deployments=(dep(), dep("green"))),
        "green",
        [RunRef("r1", RunState.LIVE, endpoint="ep", deployment="green")],
        ("keep", Rule.IN_LEDGER),
    ),
    (
        "named-by-a-retired-run",
        endpoint(deployments=(dep(), dep("green"))),
        "green",
        [RunRef("r1", RunState.RETIRED, endpoint="ep", deployment="green")],
        ("delete", Rule.ORPHAN),
    ),
]


@pytest.mark.parametrize(
    ("ep", "name", "runs", "expected"),
    [case[1:] for case in DEPLOYMENT_TABLE],
    ids=[case[0] for case in DEPLOYMENT_TABLE],
)
def test_deployment_decision_table(
    ep: EndpointInfo, name: str, runs: list[RunRef], expected: tuple[str, Rule] | None
) -> None:
    """Each row of the orphan-deployment table gives its action and rule (None: takes traffic)."""
    deployment = next(d for d in ep.deployments if d.name == name)
    decision = decide_deployment(ep, deployment, policy=POLICY, now=NOW, runs=runs)
    if expected is None:
        assert decision is None
        return
    assert decision is not None
    assert (decision.action, decision.rule) == expected, decision.reason
    assert decision.target == f"{ep.name}/{name}" and decision.kind == "deployment"


def test_policy_from_settings_and_overrides() -> None:
    """The policy reads IDLE_MINUTES / JANITOR_GRACE_MINUTES / TUNEGRID_INSTANCE, and CLI overrides win."""
    from shared.settings import Settings

    settings = Settings.from_env({"TUNEGRID_INSTANCE": "inst", "IDLE_MINUTES": "30", "JANITOR_GRACE_MINUTES": "5"})
    assert JanitorPolicy.from_settings(settings) == JanitorPolicy("inst", timedelta(minutes=30), timedelta(minutes=5))
    policy = JanitorPolicy.from_settings(settings, idle_minutes=0.5, grace_minutes=0)
    assert policy.idle == timedelta(seconds=30) and policy.grace == timedelta(0)
    with pytest.raises(ValueError):
        JanitorPolicy.from_settings(settings, idle_minutes=-1)


# ---- the sweep, over fakes of our ports --------------------------------------------------------


class FakeBackend:
    """The janitor's slice of the `FineTuneBackend` port, in memory, recording every call."""

    name = "fake"

    def __init__(
        self,
        endpoints: Iterable[EndpointInfo],
        *,
        activity: Mapping[str, EndpointActivity | Exception] | None = None,
        refreshed: Mapping[str, EndpointInfo | Exception | None] | None = None,
        delete_errors: Mapping[str, Exception] | None = None,
    ) -> None:
        self.endpoints = {e.name: e for e in endpoints}
        self.activity = dict(activity or {})
        self.refreshed = dict(refreshed or {})
        self.delete_errors = dict(delete_errors or {})
        self.activity_calls: list[tuple[str, datetime]] = []
        self.deleted_endpoints: list[str] = []
        self.deleted_deployments: list[tuple[str, str]] = []

    def list_endpoints(self) -> list[EndpointInfo]:
        return list(self.endpoints.values())

    def get_endpoint(self, name: str) -> EndpointInfo | None:
        found = self.refreshed[name] if name in self.refreshed else self.endpoints.get(name)
        if isinstance(found, Exception):
            raise found
        return found

    def get_endpoint_activity(self, endpoint: str, *, since: datetime) -> EndpointActivity:
        self.activity_calls.append((endpoint, since))
        found = self.activity.get(endpoint, EndpointActivity(requests=0, last_request_at=None, source="fake"))
        if isinstance(found, Exception):
            raise found
        return found

    def begin_delete_endpoint(self, name: str) -> Operation:
        if name in self.delete_errors:
            raise self.delete_errors[name]
        self.deleted_endpoints.append(name)
        return Operation(kind="delete-endpoint", target=name)

    def begin_delete_deployment(self, endpoint: str, name: str) -> Operation:
        self.deleted_deployments.append((endpoint, name))
        return Operation(kind="delete-deployment", target=f"{endpoint}/{name}")


class ConflictingLedger(InMemoryLedger):
    """A ledger where someone else writes these runs between each read and write (`times` times, or always):
    the record is still live when read again."""

    def __init__(self, records: Iterable[RunRecord], *, conflict_on: Iterable[str], times: int | None = None) -> None:
        super().__init__(records)
        self.conflict_on = set(conflict_on)
        self.times = times
        self.conflicts = 0

    def transition(
        self, run_id: str, to: RunState, *, expect: Iterable[RunState] | None = None, **fields: Any
    ) -> RunRecord:
        if run_id in self.conflict_on and (self.times is None or self.conflicts < self.times):
            self.conflicts += 1
            raise ConflictError(f"run {run_id} changed concurrently")
        return super().transition(run_id, to, expect=expect, **fields)


class FailingAudit:
    def write(self, decision: Decision, *, at: datetime, dry_run: bool, sweep_id: str) -> None:
        raise TransientError("audit table unavailable")


def run_record(run_id: str, state: RunState, *, endpoint: str = "", deployment: str = "") -> RunRecord:
    base = new_record(
        run_id=run_id, container="training-data", blob=f"{run_id}.jsonl", blob_version="v1", backend="fake"
    )
    return replace(base, state=state, endpoint=endpoint, deployment=deployment)


@pytest.fixture
def audit_table(storage: Any, unique: str) -> Any:
    """A real Azurite table with the audit table's shape, fresh per test."""
    return storage.tables.create_table(f"audit{unique}")


@pytest.fixture
def audit() -> InMemoryAuditLog:
    return InMemoryAuditLog()


def audit_rows(audit: Any) -> list[dict[str, Any]]:
    """The rows of an `InMemoryAuditLog`, or of an Azurite table, in row-key (time) order."""
    if isinstance(audit, InMemoryAuditLog):
        return audit.rows()
    return sorted((dict(e) for e in audit.list_entities()), key=lambda e: e["RowKey"])


def state(ledger: InMemoryLedger, run_id: str) -> RunState:
    record = ledger.get(run_id)
    assert record is not None, run_id
    return record.state


def no_proxy_use(endpoint: str) -> datetime | None:
    return None


def sweep(backend: FakeBackend, ledger: InMemoryLedger, audit: Any, **kw: Any) -> Any:
    kw.setdefault("last_proxy_use", no_proxy_use)
    kw.setdefault("policy", POLICY)
    return sweep_idle_endpoints(backend=backend, ledger=ledger, audit=audit, now=lambda: NOW, **kw)


@pytest.mark.azurite
def test_idle_owned_endpoint_is_deleted_retired_and_audited(audit_table: Any, caplog: pytest.LogCaptureFixture) -> None:
    """An owned idle endpoint: delete started, its live run retired, one audit row and one log line."""
    backend = FakeBackend([endpoint("idle-ep")], activity={"idle-ep": activity(0, ago(400))})
    ledger = InMemoryLedger(
        [run_record("r1", RunState.LIVE, endpoint="idle-ep"), run_record("r2", RunState.LIVE, endpoint="x")]
    )
    with caplog.at_level(logging.INFO, logger="shared.usecases.janitor"):
        report = sweep(backend, ledger, TableAuditLog(audit_table), last_proxy_use=lambda ep: ago(300))
    assert backend.deleted_endpoints == ["idle-ep"]
    assert backend.activity_calls == [("idle-ep", NOW - POLICY.idle)]
    assert state(ledger, "r1") is RunState.RETIRED and state(ledger, "r2") is RunState.LIVE
    retired = ledger.get("r1")
    assert retired is not None and "idle-ep" in retired.error
    [decision] = report.decisions
    assert (decision.action, decision.rule, decision.outcome, decision.retired_runs) == (
        "delete",
        Rule.IDLE,
        "deleting",
        ("r1",),
    )
    assert decision.last_use == ago(300)
    assert report.deleted_endpoints == ["idle-ep"]
    [row] = audit_rows(audit_table)
    assert row["PartitionKey"] == "2025-06-01" and row["RowKey"].startswith("20250601T120000")
    assert (row["action"], row["target"], row["rule"], row["dry_run"]) == ("delete", "idle-ep", "idle", False)
    assert row["last_use"] == ago(300).isoformat() and row["retired_runs"] == "r1" and row["reason"]
    assert row["at"] == NOW
    lines = [r.getMessage() for r in caplog.records if "idle-ep" in r.getMessage() and "[idle]" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("janitor delete endpoint idle-ep")


@pytest.mark.azurite
def test_a_deleted_endpoint_records_its_hourly_price_and_idle_hours(audit_table: Any) -> None:
    """The audit row of a deleted endpoint holds its price per hour (each deployment's size in the endpoint's
    region, times its instances), where the price came from, and how long it ran idle; the sweep adds them up."""
    from tests.fakes import FixedPrices
    from tunegrid.render import sweep_table

    sizes = (
        replace(dep("blue"), instance_type="Standard_NC24ads_A100_v4", instance_count=2),
        replace(dep("old"), instance_type="Standard_NC24ads_A100_v4"),
    )
    ep = replace(endpoint("idle-ep", deployments=sizes, traffic={"blue": 100, "old": 0}), location="eastus")
    backend = FakeBackend([ep], activity={"idle-ep": activity(0, ago(400))})
    prices = FixedPrices({("Standard_NC24ads_A100_v4", "eastus"): 3.673})
    report = sweep(backend, InMemoryLedger(), TableAuditLog(audit_table), prices=prices)
    [decision] = report.decisions
    assert decision.hourly_usd == round(3 * 3.673, 4) and decision.idle_hours == pytest.approx(400 / 60)
    [row] = audit_rows(audit_table)
    assert row["hourly_usd"] == round(3 * 3.673, 4) and row["idle_hours"] == round(400 / 60, 3)
    assert row["price_source"] == "fixed test price 2026-01-01"
    assert report.savings.usd_per_hour == round(3 * 3.673, 4) and report.savings.idle_usd == round(
        3 * 3.673 * 400 / 60, 2
    )
    text = sweep_table(report)
    assert (
        "total saved: $11.02 per hour from now on by deleting 1 idle endpoint(s) (they had run idle 6.7 h, $73.46)"
        in text
    )
    assert report.public()["savings"]["usd_per_hour"] == round(3 * 3.673, 4)


def test_an_unpriced_delete_is_still_made_and_said_unpriced(audit: InMemoryAuditLog) -> None:
    """No region (the local backend) or no price: the endpoint is deleted all the same; the total says so."""
    from tests.fakes import FixedPrices
    from tunegrid.render import sweep_table

    backend = FakeBackend([endpoint("idle-ep")])
    report = sweep(backend, InMemoryLedger(), audit, prices=FixedPrices(), dry_run=True)
    [decision] = report.decisions
    assert decision.hourly_usd is None and decision.price_source == "no region (local backend)"
    assert "total would save: unknown, no price is known for the 1 idle endpoint(s) deleted" in sweep_table(report)
    [row] = audit_rows(audit)
    assert "hourly_usd" not in row and row["idle_hours"] > 0


NEVER_DELETED = [
    ("not-owned", endpoint("ep", tags={OWNER_TAG: "other"}), {}, Rule.NOT_OWNED),
    ("keep-tagged", endpoint("ep", tags={**OWNED, KEEP_TAG: "true"}), {}, Rule.KEEP_TAG),
    ("in-use-by-direct-caller", endpoint("ep"), {"ep": activity(12, ago(1))}, Rule.IN_USE),
    (
        "metrics-unreadable",
        endpoint("ep"),
        {"ep": MetricsUnavailable("Monitoring Reader missing")},
        Rule.METRICS_UNAVAILABLE,
    ),
    (
        "metrics-backend-down",
        endpoint("ep"),
        {"ep": TransientError("503 from Azure Monitor")},
        Rule.METRICS_UNAVAILABLE,
    ),
]


@pytest.mark.parametrize(("ep", "metrics", "rule"), [c[1:] for c in NEVER_DELETED], ids=[c[0] for c in NEVER_DELETED])
def test_janitor_never_deletes(ep: EndpointInfo, metrics: dict[str, Any], rule: Rule, audit: InMemoryAuditLog) -> None:
    """Not owned, keep-tagged, in use, metrics unreadable: nothing deleted, ledger untouched, reason said."""
    ep = replace(ep, deployments=(dep("blue"),), traffic={"blue": 100})
    backend = FakeBackend([ep], activity=metrics)
    ledger = InMemoryLedger([run_record("r1", RunState.LIVE, endpoint="ep")])
    report = sweep(backend, ledger, audit)
    assert backend.deleted_endpoints == [] and backend.deleted_deployments == []
    assert state(ledger, "r1") is RunState.LIVE
    [decision] = report.decisions
    assert (decision.action, decision.rule, decision.outcome) == ("keep", rule, "kept")
    if rule is Rule.METRICS_UNAVAILABLE:
        assert "not deleting on a guess" in decision.reason and type(metrics["ep"]).__name__ in decision.reason
    rows = audit_rows(audit)
    assert [r["rule"] for r in rows] == ([] if rule is Rule.NOT_OWNED else [rule.value])


def test_unreadable_proxy_usage_record_blocks_delete(audit: InMemoryAuditLog) -> None:
    """When our own usage record cannot be read, the endpoint is kept and metrics are not even needed."""

    def broken(endpoint: str) -> datetime | None:
        raise TransientError("table timeout")

    backend = FakeBackend([endpoint("ep")])
    report = sweep(backend, InMemoryLedger(), audit, last_proxy_use=broken)
    assert backend.deleted_endpoints == []
    assert report.decisions[0].rule is Rule.METRICS_UNAVAILABLE and "proxy usage record" in report.decisions[0].reason


def test_dry_run_changes_nothing(audit: InMemoryAuditLog) -> None:
    """Dry run: the same decisions, no delete call, the ledger unchanged, audit rows marked dry_run."""
    eps = [
        endpoint("idle-ep"),
        endpoint("busy-ep", deployments=(dep("blue"), dep("old")), traffic={"blue": 100}),
    ]
    activities = {"busy-ep": activity(4, ago(2))}
    ledger = InMemoryLedger([run_record("r1", RunState.LIVE, endpoint="idle-ep")])
    before = ledger.list()
    dry_backend = FakeBackend(eps, activity=activities)
    dry = sweep(dry_backend, ledger, audit, dry_run=True)
    assert dry_backend.deleted_endpoints == [] and dry_backend.deleted_deployments == []
    assert ledger.list() == before
    assert {(d.target, d.action, d.rule, d.outcome) for d in dry.decisions} == {
        ("busy-ep", "keep", Rule.IN_USE, "kept"),
        ("busy-ep/old", "delete", Rule.ORPHAN, "dry-run"),
        ("idle-ep", "delete", Rule.IDLE, "dry-run"),
    }
    rows = audit_rows(audit)
    assert len(rows) == 3 and all(r["dry_run"] is True for r in rows)

    live_backend = FakeBackend(eps, activity=activities)
    live = sweep(live_backend, ledger, FailingAudit(), dry_run=False)
    assert [(d.target, d.action, d.rule) for d in live.decisions] == [
        (d.target, d.action, d.rule) for d in dry.decisions
    ]


def test_no_delete_without_an_audit_row() -> None:
    """If the audit row cannot be written first, nothing is deleted and the decision says why."""
    backend = FakeBackend([endpoint("idle-ep", deployments=(dep("blue"), dep("old")), traffic={"blue": 100})])
    ledger = InMemoryLedger([run_record("r1", RunState.LIVE, endpoint="idle-ep")])
    report = sweep(backend, ledger, FailingAudit())
    assert backend.deleted_endpoints == [] and state(ledger, "r1") is RunState.LIVE
    assert report.decisions[0].outcome.startswith("failed: audit row not written")
    assert len(report.failures) == 1


def test_recheck_before_delete(audit: InMemoryAuditLog) -> None:
    """A keep tag, a proxy request, or an unreadable endpoint between the listing and the delete: not deleted."""
    listed = endpoint("tagged-late")
    backend = FakeBackend(
        [listed, endpoint("called-late"), endpoint("gone-late"), endpoint("unreadable-late")],
        refreshed={
            "tagged-late": replace(listed, tags={**OWNED, KEEP_TAG: "true"}),
            "gone-late": None,
            "unreadable-late": TransientError("throttled"),
        },
    )
    calls: dict[str, int] = {}

    def proxy(ep: str) -> datetime | None:
        calls[ep] = calls.get(ep, 0) + 1
        return ago(1) if ep == "called-late" and calls[ep] > 1 else None

    report = sweep(backend, InMemoryLedger(), audit, last_proxy_use=proxy)
    assert backend.deleted_endpoints == []
    by_target = {d.target: d for d in report.decisions}
    assert by_target["tagged-late"].rule is Rule.KEEP_TAG
    assert by_target["called-late"].rule is Rule.IN_USE
    assert by_target["gone-late"].outcome == "gone"
    assert by_target["unreadable-late"].action == "keep" and "throttled" in by_target["unreadable-late"].outcome
    assert [d.target for d in report.failures] == ["unreadable-late"]


def test_refused_delete_is_recorded_and_the_sweep_goes_on(audit: InMemoryAuditLog) -> None:
    """A backend error on one delete: recorded (log and audit), no retire, the next endpoint still handled."""
    backend = FakeBackend(
        [endpoint("a-ep"), endpoint("b-ep")], delete_errors={"a-ep": BackendError("locked by policy")}
    )
    ledger = InMemoryLedger(
        [run_record("ra", RunState.LIVE, endpoint="a-ep"), run_record("rb", RunState.LIVE, endpoint="b-ep")]
    )
    report = sweep(backend, ledger, audit)
    assert backend.deleted_endpoints == ["b-ep"]
    assert state(ledger, "ra") is RunState.LIVE and state(ledger, "rb") is RunState.RETIRED
    failed = report.failures
    assert [d.target for d in failed] == ["a-ep"] and "locked by policy" in failed[0].outcome
    outcomes = [(r["target"], r["outcome"]) for r in audit_rows(audit)]
    assert ("a-ep", "deleting") in outcomes and any(t == "a-ep" and o.startswith("failed") for t, o in outcomes)


def test_retire_conflict_is_tolerated(audit: InMemoryAuditLog) -> None:
    """A live run that keeps changing under the retire (ConflictError each time) does not fail the delete."""
    backend = FakeBackend([endpoint("ep")])
    ledger = ConflictingLedger([run_record("r1", RunState.LIVE, endpoint="ep")], conflict_on=["r1"])
    report = sweep(backend, ledger, audit)
    assert backend.deleted_endpoints == ["ep"]
    assert report.decisions[0].retired_runs == () and report.decisions[0].outcome == "deleting"
    assert ledger.conflicts == RETIRE_ATTEMPTS


def test_a_live_run_changed_meanwhile_is_retired_on_a_second_read(audit: InMemoryAuditLog) -> None:
    """A live record has no lease: another writer (the run-event publisher) may change it between the retire's
    read and write. The retire reads it again, so the run does not stay live with its endpoint deleted."""
    backend = FakeBackend([endpoint("ep")])
    ledger = ConflictingLedger([run_record("r1", RunState.LIVE, endpoint="ep")], conflict_on=["r1"], times=2)
    report = sweep(backend, ledger, audit)
    assert report.decisions[0].retired_runs == ("r1",)
    retired = ledger.get("r1")
    assert retired is not None and retired.state == RunState.RETIRED and "deleted by the janitor" in retired.error


def test_a_run_ended_meanwhile_is_not_retired(audit: InMemoryAuditLog) -> None:
    """A run someone else moved out of `live` meanwhile is left as it is (not retired over its new state)."""
    backend = FakeBackend([endpoint("ep")])
    ledger = InMemoryLedger([run_record("r1", RunState.LIVE, endpoint="ep")])
    write = ledger.transition

    def ended_first(run_id: str, to: RunState, **kwargs: Any) -> RunRecord:
        record = ledger.get(run_id)
        if record is not None and record.state == RunState.LIVE:
            write(run_id, RunState.RETIRED, error="replaced by run r2")
        return write(run_id, to, **kwargs)

    ledger.transition = ended_first  # type: ignore[method-assign]
    report = sweep(backend, ledger, audit)
    assert report.decisions[0].retired_runs == ()
    retired = ledger.get("r1")
    assert retired is not None and retired.error == "replaced by run r2"


@pytest.mark.parametrize(
    ("runs", "deleted"),
    [
        ([], [("ep", "old")]),
        ([run_record("r1", RunState.DEPLOYING, endpoint="ep", deployment="old")], []),
        ([run_record("r1", RunState.REGISTERING)], []),
    ],
    ids=["orphan-deleted", "mid-rollout-kept", "registering-kept"],
)
def test_orphan_deployments_in_the_sweep(
    runs: list[RunRecord], deleted: list[tuple[str, str]], audit: InMemoryAuditLog
) -> None:
    """An old 0 % deployment on an owned endpoint in use is deleted, unless a rollout is under way."""
    ep = endpoint("ep", deployments=(dep("blue"), dep("old")), traffic={"blue": 100, "old": 0})
    backend = FakeBackend([ep], activity={"ep": activity(5, ago(1))})
    sweep(backend, InMemoryLedger(runs), audit)
    assert backend.deleted_deployments == deleted
    assert backend.deleted_endpoints == []


def test_orphan_rechecked_before_delete(audit: InMemoryAuditLog) -> None:
    """A deployment that got traffic between listing and delete is left alone."""
    ep = endpoint("ep", deployments=(dep("blue"), dep("old")), traffic={"blue": 100})
    shifted = replace(ep, traffic={"blue": 50, "old": 50})
    backend = FakeBackend([ep], activity={"ep": activity(5, ago(1))}, refreshed={"ep": shifted})
    report = sweep(backend, InMemoryLedger(), audit)
    assert backend.deleted_deployments == []
    assert [d.target for d in report.decisions] == ["ep"]


def test_listing_failure_propagates_and_deletes_nothing() -> None:
    """If the ledger cannot be read (rollout states unknown), the sweep fails before deciding anything."""

    class BrokenLedger(InMemoryLedger):
        def list(self) -> list[RunRecord]:
            raise TransientError("ledger unavailable")

    backend = FakeBackend([endpoint("ep")])
    with pytest.raises(TransientError):
        sweep(backend, BrokenLedger(), FailingAudit())
    assert backend.deleted_endpoints == []


# ---- CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def cli_context(storage: Any, unique: str) -> Any:
    """An AppContext on Azurite with the fake backend, installed for `python -m tunegrid` in-process."""
    from shared.bootstrap import AppContext, set_app_context
    from shared.settings import Settings

    settings = Settings.from_env({"TUNEGRID_INSTANCE": ME, "IDLE_MINUTES": "120", "JANITOR_GRACE_MINUTES": "60"})
    from shared.adapters.usage import add_usage

    real_now = datetime.now(UTC)
    five_hours_old = real_now - timedelta(hours=5)
    backend = FakeBackend(
        [
            endpoint("idle-ep", created=five_hours_old),
            endpoint("proxied-ep", created=five_hours_old),
            endpoint("foreign-ep", tags={}),
        ]
    )
    ledger = InMemoryLedger([run_record("r1", RunState.LIVE, endpoint="idle-ep")])
    usage_table = storage.tables.create_table(f"usage{unique}")
    add_usage(usage_table, "proxied-ep", requests=3, last_used_at=real_now - timedelta(minutes=3))
    add_usage(usage_table, "idle-ep", requests=1, last_used_at=real_now - timedelta(hours=4))
    ctx = AppContext(
        settings,
        overrides={
            "backend": backend,
            "ledger": ledger,
            "audit_table": storage.tables.create_table(f"audit{unique}"),
            "usage_table": usage_table,
            "costs_table": storage.tables.create_table(f"costs{unique}"),
        },
    )
    set_app_context(ctx)
    yield ctx
    set_app_context(None)


@pytest.mark.azurite
def test_cli_dry_run_json(cli_context: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`sweep --dry-run --json` prints the decisions as JSON and changes nothing."""
    from tunegrid.cli import main

    assert main(["sweep", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] is True and out["deleted_endpoints"] == []
    by_target = {d["target"]: d for d in out["decisions"]}
    assert by_target["idle-ep"]["action"] == "delete" and by_target["idle-ep"]["outcome"] == "dry-run"
    assert by_target["idle-ep"]["last_use"] is not None
    assert by_target["proxied-ep"]["rule"] == "in-use" and by_target["proxied-ep"]["outcome"] == "kept"
    assert by_target["foreign-ep"]["rule"] == "not-owned"
    assert cli_context.backend.deleted_endpoints == []
    assert state(cli_context.ledger, "r1") is RunState.LIVE


@pytest.mark.azurite
def test_cli_table_and_idle_override(cli_context: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`sweep --idle-minutes` overrides the setting (the proxy's use 4 h ago counts); then the default deletes."""
    from tunegrid.cli import main

    assert main(["sweep", "--idle-minutes", "600"]) == 0
    out = capsys.readouterr().out
    assert cli_context.backend.deleted_endpoints == []
    row = next(line for line in out.splitlines() if line.startswith("endpoint  idle-ep"))
    assert " in-use " in row and "kept" in row
    assert "idle 600 min" in out.splitlines()[-1]

    assert main(["sweep"]) == 0
    assert cli_context.backend.deleted_endpoints == ["idle-ep"]
    assert state(cli_context.ledger, "r1") is RunState.RETIRED


def test_cli_rejects_bad_minutes(capsys: pytest.CaptureFixture[str]) -> None:
    """A negative or non-numeric --idle-minutes is a usage error (exit 2)."""
    from tunegrid.cli import main

    for bad in ("-1", "soon"):
        with pytest.raises(SystemExit) as exc:
            main(["sweep", "--idle-minutes", bad])
        assert exc.value.code == 2
    assert "minutes" in capsys.readouterr().err


# ---- the timer binding -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def registered_functions() -> dict[str, Any]:
    """`function_app.app`'s functions by name, through the once-per-process cache (`shared.appindex`)."""
    import function_app
    from tunegrid.appindex import functions_of

    return {str(f.get_function_name()): f for f in functions_of(function_app.app)}


def test_timer_binding(registered_functions: dict[str, Any]) -> None:
    """The janitor is a timer trigger on %JANITOR_SCHEDULE%, not run on start-up, with the schedule monitor."""
    from tunegrid.appindex import raw_bindings

    [binding] = raw_bindings(registered_functions["janitor"])
    assert binding == {
        "direction": "IN",
        "type": "timerTrigger",
        "name": "timer",
        "schedule": "%JANITOR_SCHEDULE%",
        "runOnStartup": False,
        "useMonitor": True,
    }


@pytest.mark.azurite
def test_timer_function_runs_a_sweep(cli_context: Any, registered_functions: dict[str, Any]) -> None:
    """Calling the registered function with a TimerRequest sweeps with the app context."""
    import azure.functions as func

    user_fn = registered_functions["janitor"].get_user_function()
    user_fn(func.timer.TimerRequest(past_due=False))
    assert cli_context.backend.deleted_endpoints == ["idle-ep"]


def test_timer_function_reraises(registered_functions: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected error is logged and re-raised so the host records a failed run."""
    import azure.functions as func

    from shared.bootstrap import AppContext, set_app_context
    from shared.settings import Settings

    class BrokenBackend(FakeBackend):
        def list_endpoints(self) -> list[EndpointInfo]:
            raise RuntimeError("boom")

    ctx = AppContext(
        Settings.from_env({}),
        overrides={"backend": BrokenBackend([]), "ledger": InMemoryLedger(), "audit_table": None, "usage_table": None},
    )
    set_app_context(ctx)
    try:
        user_fn = registered_functions["janitor"].get_user_function()
        with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="boom"):
            user_fn(func.timer.TimerRequest(past_due=True))
    finally:
        set_app_context(None)
    assert any("janitor sweep failed" in r.getMessage() for r in caplog.records)
