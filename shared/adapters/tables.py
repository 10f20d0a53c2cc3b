"""Azure Table adapters: the run ledger (`tunegridruns`) and the janitor's audit log (`tunegridaudit`).

The only code that talks to these tables through azure-data-tables, and the only place their SDK
errors become ours (`ConflictError` for a lost ETag race, `NotFound`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from shared.adapters.storage_errors import translated
from shared.domain.clock import as_utc, utcnow
from shared.domain.janitor_rules import Decision
from shared.domain.runs import PARTITION, RunRecord, RunState, apply_transition
from shared.errors import ConflictError, NotFound

log = logging.getLogger(__name__)


class TableRunLedger:
    """`Ledger` over an Azure Table (`azure.data.tables.TableClient`)."""

    def __init__(self, table: Any) -> None:
        self._table = table

    @translated("run ledger create")
    def create(self, record: RunRecord) -> tuple[RunRecord, bool]:
        """Insert the record; when it exists already return the stored one and False."""
        try:
            meta = self._table.create_entity(record.to_entity())
            return replace(record, etag=meta.get("etag", "")), True
        except ResourceExistsError:
            existing = self.get(record.run_id)
            if existing is None:  # deleted in between: extremely unlikely, let the platform retry
                raise ConflictError(f"run {record.run_id} vanished during create") from None
            return existing, False

    @translated("run ledger get")
    def get(self, run_id: str) -> RunRecord | None:
        try:
            ent = self._table.get_entity(PARTITION, run_id)
        except ResourceNotFoundError:
            return None
        return RunRecord.from_entity(ent, etag=ent.metadata.get("etag", ""))

    @translated("run ledger replace")
    def _replace(self, record: RunRecord) -> RunRecord:
        try:
            meta = self._table.update_entity(
                record.to_entity(),
                mode=UpdateMode.REPLACE,
                etag=record.etag,
                match_condition=MatchConditions.IfNotModified,
            )
        except ResourceModifiedError as exc:
            raise ConflictError(f"run {record.run_id} changed concurrently") from exc
        except ResourceNotFoundError as exc:
            raise NotFound(f"run {record.run_id} not found") from exc
        return replace(record, etag=meta.get("etag", ""))

    def transition(
        self, run_id: str, to: RunState, *, expect: Iterable[RunState] | None = None, **fields: Any
    ) -> RunRecord:
        current = self.get(run_id)
        if current is None:
            raise NotFound(f"run {run_id} not found")
        moved = apply_transition(current, to, expect, fields)
        saved = self._replace(moved)
        log.info("run %s: %s -> %s", run_id, current.state.value, to.value, extra={"run_id": run_id, "state": to.value})
        return saved

    def update(self, record: RunRecord, **fields: Any) -> RunRecord:
        """Change fields without moving state, conditional on the record's ETag."""
        return self._replace(replace(record, updated_at=utcnow(), **fields))

    @translated("run ledger list")
    def list(self) -> list[RunRecord]:
        rows = self._table.query_entities(f"PartitionKey eq '{PARTITION}'")
        out = [RunRecord.from_entity(e, etag=e.metadata.get("etag", "")) for e in rows]
        return sorted(out, key=lambda r: r.created_at, reverse=True)

    @translated("run ledger find_by_job")
    def find_by_job(self, job_name: str) -> RunRecord | None:
        safe = job_name.replace("'", "''")
        rows = list(self._table.query_entities(f"PartitionKey eq '{PARTITION}' and job_name eq '{safe}'"))
        if not rows:
            return None
        e = rows[0]
        return RunRecord.from_entity(e, etag=e.metadata.get("etag", ""))


def audit_entity(decision: Decision, *, at: datetime, dry_run: bool, sweep_id: str) -> dict[str, Any]:
    """The audit row: partition by UTC day, row key sortable by time and unique. A priced endpoint delete also
    records its price per hour, where that price came from, and the hours it had run idle."""
    at = as_utc(at).astimezone(UTC)
    priced: dict[str, Any] = {}
    if decision.hourly_usd is not None:
        priced["hourly_usd"] = float(decision.hourly_usd)
        priced["price_source"] = decision.price_source
    if decision.idle_hours is not None:
        priced["idle_hours"] = round(float(decision.idle_hours), 3)
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
        **priced,
    }


class TableAuditLog:
    """`AuditLog` over a table client (`azure.data.tables.TableClient` for the `tunegridaudit` table)."""

    def __init__(self, table: Any) -> None:
        self._table = table

    @translated("audit write")
    def write(self, decision: Decision, *, at: datetime, dry_run: bool, sweep_id: str) -> None:
        self._table.create_entity(audit_entity(decision, at=at, dry_run=dry_run, sweep_id=sweep_id))
