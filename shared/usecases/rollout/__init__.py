"""Roll-out use case: a finished job becomes a live deployment without anyone watching.

The ledger drives a state machine:
    submitted -> running -> succeeded | failed | canceled
    succeeded -> registering -> deploying -> smoke-testing -> evaluating -> shifting-traffic -> live (-> retired)
    deploying | smoke-testing | evaluating | shifting-traffic -> rolled-back
`evaluating` is the evaluation gate (`gate.py`): the new model must score about as well as the live one.
Events are only a nudge: every step re-reads the backend's truth, checks before it acts, and takes a
short lease on the record (an ETag-conditional write) so that duplicate, concurrent or out-of-order
deliveries never repeat work. Long operations (endpoint and deployment provisioning, traffic updates)
are started, recorded and resumed by the next event or timer tick, never waited on.
"""

from __future__ import annotations

import logging

from shared.domain.events import RunEvent
from shared.domain.runs import RunRecord, RunState
from shared.errors import ConflictError, NotFound, TransientError
from shared.usecases.rollout.leases import give_back, held
from shared.usecases.rollout.model import IN_FLIGHT, LEASE_TTL, REPORT_STATES, EventOutcome, Rollout
from shared.usecases.rollout.reports import run_report, run_report_markdown, write_run_report
from shared.usecases.rollout.steps import STEPS

__all__ = [
    "IN_FLIGHT",
    "LEASE_TTL",
    "REPORT_STATES",
    "EventOutcome",
    "Rollout",
    "advance_run",
    "handle_run_event",
    "run_report",
    "run_report_markdown",
    "tick",
    "write_run_report",
]

log = logging.getLogger(__name__)


def handle_run_event(event: RunEvent, rollout: Rollout) -> EventOutcome:
    """Act only on the parent run of a job this app submitted; everything else is logged and ignored."""
    if event.is_child_step:
        log.info("ignoring event %s: child step %s of pipeline %s", event.id, event.run_id, event.parent_run_id)
        return EventOutcome("ignored", "child pipeline step")
    record = None
    if event.our_run_id:
        record = rollout.ledger.get(event.our_run_id)
    if record is None and event.run_id:
        record = rollout.ledger.find_by_job(event.run_id)
    if record is None:
        log.info("ignoring event %s: run %s was not submitted by this app", event.id, event.run_id)
        return EventOutcome("ignored", "foreign run")
    if record.job_name and event.run_id and record.job_name != event.run_id:
        log.info(
            "ignoring event %s: run %s is not job %s of run %s", event.id, event.run_id, record.job_name, record.run_id
        )
        return EventOutcome("ignored", "not the parent job", run_id=record.run_id)
    log.info(
        "event %s: job %s %s (run %s is %s)",
        event.id,
        event.run_id,
        event.run_status or event.event_type,
        record.run_id,
        record.state.value,
        extra={"run_id": record.run_id},
    )
    final = advance_run(record.run_id, rollout)
    return EventOutcome("advanced", f"run is {final.state.value}", run_id=record.run_id, state=final.state.value)


def tick(rollout: Rollout) -> list[RunRecord]:
    """Timer entry: move every in-flight run on (resumes long steps, catches missed events)."""
    from shared.usecases.ingest import resume_stale_submission
    from shared.usecases.run_events import publish_left_over

    publish_left_over(rollout.ledger, rollout.events, now=rollout.now())
    moved = []
    for record in rollout.ledger.list():
        if record.state == RunState.SUBMITTING:
            resume_stale_submission(record, ledger=rollout.ledger, backend=rollout.backend, now=rollout.now())
            continue
        if record.state not in IN_FLIGHT:
            continue
        try:
            moved.append(advance_run(record.run_id, rollout))
        except TransientError:
            log.warning(
                "run %s: transient error, next tick retries",
                record.run_id,
                exc_info=True,
                extra={"run_id": record.run_id},
            )
    return moved


def advance_run(run_id: str, rollout: Rollout, *, max_steps: int = 12) -> RunRecord:
    """Move one run as far as it can go now, stopping at the first step that has to wait.

    A step that fails gives its lease back at once, so the next event or tick retries it without
    waiting for the lease to expire; the error propagates (the trigger decides about retries).
    """
    record = rollout.ledger.get(run_id)
    if record is None:
        raise NotFound(f"run {run_id} not found")
    for _ in range(max_steps):
        step = STEPS.get(record.state)
        if step is None:
            break
        held.token = ""
        try:
            moved = step(record, rollout)
        except ConflictError as exc:
            log.info("run %s: %s (another delivery is handling it)", run_id, exc, extra={"run_id": run_id})
            moved = None
        except Exception:
            give_back(run_id, rollout)
            raise
        if moved is None or moved.state == record.state:
            record = moved or rollout.ledger.get(run_id) or record
            break
        record = moved
        if record.state in REPORT_STATES:
            write_run_report(record, rollout)
    return record
