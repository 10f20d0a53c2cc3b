"""Run status for people: the table of runs, one run's timeline and metrics, cancel."""

from __future__ import annotations

import logging
from typing import Any

import orjson

from shared.domain.naming import report_base
from shared.domain.runs import RunRecord, RunState, is_run_id
from shared.errors import ConflictError, InvalidInput, NotFound
from shared.ports import Blobs, FineTuneBackend, Ledger, RunLedgerPort
from shared.settings import REPORTS_CONTAINER, Settings

log = logging.getLogger(__name__)

ROLLOUT_STATES = (
    RunState.DEPLOYING,
    RunState.SMOKE_TESTING,
    RunState.EVALUATING,
    RunState.SHIFTING_TRAFFIC,
    RunState.LIVE,
)
"""States in which the run's endpoint exists and its traffic split is worth showing."""

LISTED_ISSUES = 20
"""Errors and warnings of the validation report carried in the status (the counts are complete)."""
REPORT_LIMIT = 64 * 1024 * 1024
STATS_SHOWN = (
    "bytes",
    "sha256",
    "blank_lines",
    "messages_per_row",
    "tokens_per_row",
    "total_tokens",
    "total_assistant_tokens",
    "token_count_method",
)


def list_runs(ledger: Ledger, *, limit: int = 100) -> list[dict[str, Any]]:
    rows = []
    for r in ledger.list()[:limit]:
        rows.append(
            {
                "run_id": r.run_id,
                "state": r.state.value,
                "dataset": f"{r.container}/{r.blob}",
                "created_at": r.created_at.isoformat(),
                "updated_at": r.updated_at.isoformat(),
                "job_name": r.job_name,
                "model": f"{r.model_name}:{r.model_version}" if r.model_name else "",
                "endpoint": r.endpoint,
                "error": r.error,
            }
        )
    return rows


def validation_report_blob(record: RunRecord) -> str:
    """Where ingest stored the run's validation report in `validation-reports` (`NAME/RUN_ID.report.json`,
    NAME cut and hashed when the whole would pass Azure's 1,024-character limit: `report_base`)."""
    return f"{report_base(record.blob, record.run_id)}.report.json"


def validation_summary(blobs: Blobs, record: RunRecord) -> dict[str, Any]:
    """The validation report cut to what a person reads first; {} before ingest has written it."""
    if not record.report_url:
        return {}
    try:
        raw = blobs.read_bytes(REPORTS_CONTAINER, validation_report_blob(record), limit=REPORT_LIMIT)
        report: dict[str, Any] = orjson.loads(raw) if raw else {}
    except Exception as exc:  # the page and the API still answer without the report
        log.warning("run %s: validation report unavailable: %s", record.run_id, exc, extra={"run_id": record.run_id})
        return {}
    if not report:
        return {}
    stats = report.get("stats") or {}
    summary: dict[str, Any] = {
        "valid": bool(report.get("valid")),
        "rows": report.get("rows"),
        "valid_rows": report.get("valid_rows"),
        "error_counts": report.get("error_counts") or {},
        "warning_counts": report.get("warning_counts") or {},
        "errors": list(report.get("errors") or [])[:LISTED_ISSUES],
        "warnings": list(report.get("warnings") or [])[:LISTED_ISSUES],
        "stats": {k: stats[k] for k in STATS_SHOWN if k in stats},
    }
    test_file = report.get("test_file")
    if isinstance(test_file, dict):
        summary["test_file"] = {
            k: test_file.get(k) for k in ("name", "valid", "rows", "valid_rows", "error_counts", "warning_counts")
        }
    return summary


def run_status(
    ledger: Ledger,
    backend: FineTuneBackend | None,
    run_id: str,
    *,
    blobs: Blobs | None = None,
    with_series: bool = True,
) -> dict[str, Any]:
    """The run record as JSON plus what the backend knows now: the metrics series and the endpoint's traffic.

    With `blobs`, also a summary of the validation report (`validation`)."""
    record = ledger.get(run_id)
    if record is None:
        raise NotFound(f"run {run_id} not found")
    doc = record.public()
    doc.pop("extra", None)
    doc["split"] = record.extra.get("split", {})
    if record.extra.get("duplicate_of"):
        doc["duplicate_of"] = record.extra["duplicate_of"]  # the run reused instead of training this one again
    doc["metrics_series"] = {}
    if (
        with_series
        and backend is not None
        and record.job_name
        and record.state not in (RunState.SUBMITTING, RunState.VALIDATING)
    ):
        try:
            series = backend.get_job_metrics(record.job_name)
            doc["metrics_series"] = {k: [[p.step, p.value] for p in v] for k, v in series.items()}
        except Exception as exc:
            log.warning("run %s: metrics unavailable: %s", run_id, exc, extra={"run_id": run_id})
    if with_series and backend is not None and record.endpoint and record.state in ROLLOUT_STATES:
        try:
            endpoint = backend.get_endpoint(record.endpoint)
        except Exception as exc:
            log.warning("run %s: endpoint unavailable: %s", run_id, exc, extra={"run_id": run_id})
            endpoint = None
        if endpoint is not None:
            doc["traffic"] = dict(endpoint.traffic)
            doc["mirror_traffic"] = dict(endpoint.mirror_traffic)
    if blobs is not None:
        doc["validation"] = validation_summary(blobs, record)
    return doc


def cancel_run(ledger: Ledger, backend: FineTuneBackend, run_id: str, *, blobs: Blobs, settings: Settings) -> str:
    """Cancel a run in any state before `live`: it ends `canceled` at once (the move is won first, so a step
    in progress stops at its next write), then what it started is undone: its job is canceled, its 0 %
    deployment removed, its endpoint lease released (`shared.usecases.rollout.ending`). Returns the new state."""
    from shared.usecases.rollout import Rollout
    from shared.usecases.rollout.ending import end_run

    rollout = Rollout(ledger=ledger, backend=backend, blobs=blobs, settings=settings)
    for _ in range(8):
        record = ledger.get(run_id) if is_run_id(run_id) else None
        if record is None:
            raise NotFound(f"run {run_id} not found")
        if record.state.terminal:
            raise InvalidInput(f"run {run_id} is already {record.state.value}; there is nothing to cancel")
        if record.state == RunState.LIVE:
            raise InvalidInput(
                f"run {run_id} is live; a live run is replaced by a newer run or removed by the janitor, not canceled"
            )
        try:
            ended = end_run(record, rollout, RunState.CANCELED, "canceled by user")
        except ConflictError:
            continue  # a step moved it meanwhile: look again
        log.info("run %s canceled (was %s)", run_id, record.state.value, extra={"run_id": run_id})
        return ended.state.value
    raise ConflictError(f"run {run_id} kept changing; try again")


RETIRE_ATTEMPTS = 8
"""How many times `retire_live` re-reads a live record that changed under it before it gives up."""


def retire_live(ledger: RunLedgerPort, run_id: str, reason: str) -> RunRecord | None:
    """Move a live run to `retired`, with `reason` as its error.

    A live record has no lease: other writers change it at any time (the run-event publisher empties its
    outbox, the traffic guard marks it checked), so a conflict re-reads it and tries again; a run left live
    by mistake would stay live for good. None when it is no longer live (retired or ended by someone else);
    `ConflictError` when it kept changing."""
    for _ in range(RETIRE_ATTEMPTS):
        try:
            return ledger.transition(run_id, RunState.RETIRED, expect=[RunState.LIVE], error=reason)
        except ConflictError:
            current = ledger.get(run_id)
            if current is None or current.state != RunState.LIVE:
                return None
    raise ConflictError(f"live run {run_id} kept changing while being retired")
