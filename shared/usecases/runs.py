"""Run status for people: the table of runs, one run's timeline and metrics, cancel."""

from __future__ import annotations

import logging
from typing import Any

from shared.domain.runs import RunState, is_run_id
from shared.errors import ConflictError, InvalidInput, NotFound
from shared.ports import Blobs, FineTuneBackend, Ledger
from shared.settings import Settings

log = logging.getLogger(__name__)


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
