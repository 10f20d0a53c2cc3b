"""Run status for people: the table of runs, one run's timeline and metrics, cancel."""

from __future__ import annotations

import logging
from typing import Any

from shared.domain.runs import RunState
from shared.errors import InvalidInput, NotFound
from shared.ports import FineTuneBackend, Ledger

log = logging.getLogger(__name__)

CANCELABLE = (RunState.SUBMITTED, RunState.RUNNING)


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


def run_status(
    ledger: Ledger, backend: FineTuneBackend | None, run_id: str, *, with_series: bool = True
) -> dict[str, Any]:
    record = ledger.get(run_id)
    if record is None:
        raise NotFound(f"run {run_id} not found")
    doc = record.public()
    doc.pop("extra", None)
    doc["split"] = record.extra.get("split", {})
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
    return doc


def cancel_run(ledger: Ledger, backend: FineTuneBackend, run_id: str) -> str:
    record = ledger.get(run_id)
    if record is None:
        raise NotFound(f"run {run_id} not found")
    if record.state not in CANCELABLE:
        raise InvalidInput(f"run {run_id} is {record.state.value}; only submitted or running runs can be canceled")
    op = backend.cancel_job(record.job_name)
    log.info("cancel requested for run %s (job %s)", run_id, record.job_name, extra={"run_id": run_id})
    return op.status
