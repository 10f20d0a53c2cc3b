"""Azure Table adapters: the run ledger (`tunegridruns`) and the janitor's audit log (`tunegridaudit`).

The only code that talks to these tables through azure-data-tables, and the only place their SDK
errors become ours (`ConflictError` for a lost ETag race, `NotFound`).

The ledger table holds four kinds of rows, one partition each: the run records (`runs`), the endpoint
leases (`endpoints`, key: the endpoint name), the dataset heads (`datasets`, key: a hash of the dataset
name) and the rejected deliveries (`rejected`, key: time + random suffix). A table that is missing (an
emulator restarted empty, a table deleted by hand) is created again on the first operation that finds it
missing, in every process, not once per process: reads then find nothing, writes are retried once.
"""

from __future__ import annotations

import builtins
import logging
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from shared.adapters.storage_errors import translated
from shared.domain.clock import as_utc, utcnow
from shared.domain.janitor_rules import Decision
from shared.domain.leases import DATASETS_PARTITION, ENDPOINTS_PARTITION, DatasetHead, EndpointLease, dataset_key
from shared.domain.runs import PARTITION, RunRecord, RunState, apply_transition
from shared.errors import ConflictError, NotFound

log = logging.getLogger(__name__)

T = TypeVar("T")

REJECTED_PARTITION = "rejected"
_KEY_FORBIDDEN = re.compile(r"[/\\#?\x00-\x1f\x7f-\x9f]")
MAX_KEY_CHARS = 512
"""PartitionKey and RowKey are at most 1 KiB each, in UTF-16: 512 characters is always within it."""


def valid_key(key: str) -> bool:
    """Whether Azure Tables accepts `key` as a PartitionKey or RowKey (no `/ \\ # ?`, no control characters,
    at most 1 KiB). A lookup by an invalid key names no row: answer "not found" without a request (Azurite
    answers 500 to one, which would look transient and be retried for ever)."""
    return bool(key) and len(key) <= MAX_KEY_CHARS and _KEY_FORBIDDEN.search(key) is None


def _error_code(exc: BaseException) -> str:
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


def _table_missing(exc: ResourceNotFoundError, *, insert: bool = False) -> bool:
    """A 404 that says the table itself is missing. An insert can only 404 for that reason (Azurite sends it
    without an error code); a read or update may also mean a missing row (`ResourceNotFound`)."""
    return insert or _error_code(exc) == "TableNotFound"


class _SelfHealingTable:
    """One table client, recreated on first use after it went missing."""

    def __init__(self, table: Any) -> None:
        self._table = table

    def heal(self) -> None:
        try:
            self._table.create_table()
        except ResourceExistsError:
            return
        log.warning("table %s was missing: created it again", self._table.table_name)

    def write(self, op: Callable[[], T], *, insert: bool = False) -> T:
        """Run a write; when the table is missing, create it and run the write once more."""
        try:
            return op()
        except ResourceNotFoundError as exc:
            if not _table_missing(exc, insert=insert):
                raise
        self.heal()
        return op()

    def rows(self, query: Callable[[], Iterable[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Run a query to the end; a missing table has no rows (and is created for the writes to come)."""
        try:
            return list(query())
        except ResourceNotFoundError as exc:
            if not _table_missing(exc):
                raise
        self.heal()
        return []

    def row(self, partition: str, key: str) -> Any | None:
        if not valid_key(key):
            return None
        try:
            return self._table.get_entity(partition, key)
        except ResourceNotFoundError as exc:
            if _table_missing(exc):
                self.heal()
            return None


def _etag(entity: Any) -> str:
    return str(getattr(entity, "metadata", {}).get("etag", ""))


class TableRunLedger:
    """`Ledger` over an Azure Table (`azure.data.tables.TableClient`)."""

    def __init__(self, table: Any) -> None:
        self._table = table
        self._healing = _SelfHealingTable(table)

    @translated("run ledger create")
    def create(self, record: RunRecord) -> tuple[RunRecord, bool]:
        """Insert the record; when it exists already return the stored one and False."""
        try:
            meta = self._healing.write(lambda: self._table.create_entity(record.to_entity()), insert=True)
            return replace(record, etag=meta.get("etag", "")), True
        except ResourceExistsError:
            existing = self.get(record.run_id)
            if existing is None:  # deleted in between: extremely unlikely, let the platform retry
                raise ConflictError(f"run {record.run_id} vanished during create") from None
            return existing, False

    @translated("run ledger get")
    def get(self, run_id: str) -> RunRecord | None:
        ent = self._healing.row(PARTITION, run_id)
        return None if ent is None else RunRecord.from_entity(ent, etag=_etag(ent))

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
            if _table_missing(exc):
                self._healing.heal()
            raise NotFound(f"run {record.run_id} not found") from exc
        return replace(record, etag=meta.get("etag", ""))

    def transition(
        self, run: RunRecord | str, to: RunState, *, expect: Iterable[RunState] | None = None, **fields: Any
    ) -> RunRecord:
        """The one place a state change is written (see `Ledger.transition`). A later outbox row for the
        run-state event belongs here, in the same partition, written with the record in one transaction."""
        current = run if isinstance(run, RunRecord) else self.get(run)
        if current is None:
            raise NotFound(f"run {run} not found")
        moved = apply_transition(current, to, expect, fields)
        saved = self._replace(moved)
        log.info(
            "run %s: %s -> %s",
            current.run_id,
            current.state.value,
            to.value,
            extra={"run_id": current.run_id, "state": to.value},
        )
        return saved

    def update(self, record: RunRecord, **fields: Any) -> RunRecord:
        """Change fields without moving state, conditional on the record's ETag."""
        return self._replace(replace(record, updated_at=utcnow(), **fields))

    def _records(self, query: str) -> list[RunRecord]:
        rows = self._healing.rows(lambda: self._table.query_entities(query))
        return [RunRecord.from_entity(e, etag=_etag(e)) for e in rows]

    @translated("run ledger list")
    def list(self) -> list[RunRecord]:
        out = self._records(f"PartitionKey eq '{PARTITION}'")
        return sorted(out, key=lambda r: r.created_at, reverse=True)

    @translated("run ledger find_by_job")
    def find_by_job(self, job_name: str) -> RunRecord | None:
        safe = job_name.replace("'", "''")
        rows = self._records(f"PartitionKey eq '{PARTITION}' and job_name eq '{safe}'")
        return rows[0] if rows else None

    @translated("run ledger find_by_dataset")
    def find_by_dataset(self, container: str, blob: str) -> builtins.list[RunRecord]:
        """The runs of one dataset name, oldest first."""
        c, b = container.replace("'", "''"), blob.replace("'", "''")
        out = self._records(f"PartitionKey eq '{PARTITION}' and container eq '{c}' and blob eq '{b}'")
        return sorted(out, key=lambda r: (r.created_at, r.run_id))

    # ---- rows beside the records: endpoint leases and dataset heads ----

    def _put(self, entity: dict[str, Any], etag: str, what: str) -> str:
        """Insert (no ETag) or replace conditional on `etag`; the new ETag. A lost race is `ConflictError`."""
        try:
            if not etag:
                meta = self._healing.write(lambda: self._table.create_entity(entity), insert=True)
            else:
                meta = self._table.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
                )
        except ResourceExistsError as exc:
            raise ConflictError(f"{what} was taken concurrently") from exc
        except ResourceModifiedError as exc:
            raise ConflictError(f"{what} changed concurrently") from exc
        except ResourceNotFoundError as exc:
            if _table_missing(exc):
                self._healing.heal()
            raise ConflictError(f"{what} is gone") from exc
        return str(meta.get("etag", ""))

    @translated("endpoint lease get")
    def get_endpoint_lease(self, endpoint: str) -> EndpointLease | None:
        ent = self._healing.row(ENDPOINTS_PARTITION, endpoint)
        if ent is None:
            return None
        expires = ent.get("expires_at")
        return EndpointLease(
            endpoint=endpoint,
            holder=str(ent.get("holder", "")),
            token=str(ent.get("token", "")),
            expires_at=as_utc(expires) if isinstance(expires, datetime) else None,
            etag=_etag(ent),
        )

    @translated("endpoint lease put")
    def put_endpoint_lease(self, lease: EndpointLease) -> EndpointLease:
        entity: dict[str, Any] = {
            "PartitionKey": ENDPOINTS_PARTITION,
            "RowKey": lease.endpoint,
            "holder": lease.holder,
            "token": lease.token,
        }
        if lease.expires_at is not None:
            entity["expires_at"] = as_utc(lease.expires_at)
        return replace(lease, etag=self._put(entity, lease.etag, f"endpoint lease {lease.endpoint}"))

    @translated("dataset head get")
    def get_dataset_head(self, container: str, blob: str) -> DatasetHead | None:
        ent = self._healing.row(DATASETS_PARTITION, dataset_key(container, blob))
        if ent is None:
            return None
        return DatasetHead(
            container=container,
            blob=blob,
            run_id=str(ent.get("run_id", "")),
            generation=int(ent.get("generation", 0)),
            etag=_etag(ent),
        )

    @translated("dataset head put")
    def put_dataset_head(self, head: DatasetHead) -> DatasetHead:
        entity = {
            "PartitionKey": DATASETS_PARTITION,
            "RowKey": head.key,
            "container": head.container,
            "blob": head.blob,
            "run_id": head.run_id,
            "generation": head.generation,
        }
        return replace(head, etag=self._put(entity, head.etag, f"dataset head of {head.container}/{head.blob}"))

    # ---- rejected deliveries ----

    @translated("rejection write")
    def reject(self, source: str, subject: str, reason: str) -> None:
        self._healing.write(
            lambda: self._table.create_entity(rejection_entity(source, subject, reason, at=utcnow())), insert=True
        )

    @translated("rejections list")
    def rejections(self, *, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """The latest rejections, newest first."""
        rows = self._healing.rows(lambda: self._table.query_entities(f"PartitionKey eq '{REJECTED_PARTITION}'"))
        out = [{k: e[k] for k in ("source", "subject", "reason", "at")} for e in rows]
        return sorted(out, key=lambda r: r["at"], reverse=True)[:limit]


def rejection_entity(source: str, subject: str, reason: str, *, at: datetime) -> dict[str, Any]:
    """A rejected delivery: sortable by time, unique, with the subject and reason cut to what a row can hold."""
    at = as_utc(at).astimezone(UTC)
    return {
        "PartitionKey": REJECTED_PARTITION,
        "RowKey": f"{at.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:12]}",
        "source": source,
        "subject": subject[:2048],
        "reason": reason[:4000],
        "at": at,
    }


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
        self._healing = _SelfHealingTable(table)

    @translated("audit write")
    def write(self, decision: Decision, *, at: datetime, dry_run: bool, sweep_id: str) -> None:
        entity = audit_entity(decision, at=at, dry_run=dry_run, sweep_id=sweep_id)
        self._healing.write(lambda: self._table.create_entity(entity), insert=True)
