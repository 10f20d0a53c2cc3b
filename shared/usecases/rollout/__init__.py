"""Roll-out use case: a finished job becomes a live deployment without anyone watching.

The ledger drives a state machine:
    submitted -> running -> succeeded | failed | canceled
    succeeded -> registering -> deploying -> smoke-testing -> evaluating -> shifting-traffic -> live (-> retired)
    deploying | smoke-testing | evaluating | shifting-traffic -> rolled-back
    any state before live -> canceled | error | superseded
`evaluating` is the evaluation gate (`gate.py`): the new model must score about as well as the live one.
Events are only a nudge: every step re-reads the backend's truth and checks before it acts. Concurrency
rules (the README's architecture section states them too):
- Run lease: a step with side effects runs under a fenced lease on the run record (`leases.Held`): every
  write under it is conditional on the lease's ETag, and it is renewed right before each side effect, so a
  holder that lost it (it overran the TTL and another delivery took over, or the run was canceled or
  superseded) stops at its next write, before acting.
- Endpoint lease: the steps that act on an endpoint (deploy, smoke-test, evaluate, shift) first take or
  renew the endpoint's lease; runs that target the same endpoint wait their turn, so one roll-out at a time
  changes an endpoint's deployments and traffic, the gate compares with a live deployment that cannot
  change under it, and traffic converges in one shift.
- Supersession: see `shared.usecases.ingest` (the dataset head); a run that finds its dataset head moved
  past it ends `superseded` here, before its next step.
- Isolation: a step that fails with a non-transient error ends its run in `error` with the reason (run
  report and status); a tick goes on with the other runs whatever one run does.
- Run events: every state change writes its event into the record's outbox in the same conditional write
  (`shared.usecases.run_events`); publishing them never writes a record someone holds a lease or an ingest
  claim on, so it cannot break a holder's fence.
Long operations (endpoint and deployment provisioning, traffic updates) are started, recorded and resumed
by the next event or timer tick, never waited on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from shared.domain.events import RunEvent, parse_run_event
from shared.domain.leases import superseded_by
from shared.domain.runs import IN_FLIGHT, RunRecord, RunState
from shared.errors import ConflictError, NotFound, TransientError
from shared.usecases.rollout.ending import UNDO_PENDING, end_run, finish_undo, undo_or_mark
from shared.usecases.rollout.leases import acquire, give_back, is_held, still_holds
from shared.usecases.rollout.model import (
    LEASE_TTL,
    REPORT_STATES,
    EventOutcome,
    Rollout,
    lease_ttl_for,
)
from shared.usecases.rollout.reports import run_report, run_report_markdown, write_run_report
from shared.usecases.rollout.steps import LEASED_STEPS, OBSERVING_STEPS, guard_live

__all__ = [
    "LEASE_TTL",
    "REPORT_STATES",
    "EventOutcome",
    "Rollout",
    "TickReport",
    "advance_run",
    "handle_run_event",
    "lease_ttl_for",
    "receive_run_event",
    "run_report",
    "run_report_markdown",
    "tick",
    "write_run_report",
]

log = logging.getLogger(__name__)

RETRYABLE = (TransientError, OSError)
"""Errors a later delivery may not meet again (a network blip, throttling): the run waits, it does not fail."""


def receive_run_event(*, event_id: str, event_type: str, subject: str, data: Any, rollout: Rollout) -> EventOutcome:
    """One Event Grid delivery. A malformed event is recorded (`Ledger.reject`) and acknowledged: redelivering
    it cannot help, and Event Grid would retry it into the dead-letter queue. Transient errors propagate, so
    the delivery is retried; the timer catches up on anything a lost event would have moved."""
    try:
        event = parse_run_event(event_id=event_id, event_type=event_type, subject=subject, data=data)
    except ValueError as exc:
        return _reject(event_id, str(exc), rollout)
    if event is None:
        log.info("ignoring event %s of type %s", event_id, event_type)
        return EventOutcome("ignored", f"not a run event ({event_type})")
    try:
        return handle_run_event(event, rollout)
    except RETRYABLE:
        raise
    except Exception as exc:
        log.exception("event %s could not be handled", event_id)
        return _reject(event_id, f"{type(exc).__name__}: {exc}", rollout)


def _reject(event_id: str, reason: str, rollout: Rollout) -> EventOutcome:
    log.warning("event %s rejected: %s", event_id, reason)
    rollout.ledger.reject("job_events", event_id, reason)
    return EventOutcome("rejected", reason)


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


@dataclass
class TickReport:
    """What one tick did: the runs it tried (in order), those it moved, and those whose step failed."""

    attempted: list[str] = field(default_factory=list)
    moved: list[RunRecord] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.moved)


def tick(rollout: Rollout) -> TickReport:
    """Timer entry: publish the run events earlier writes left behind, then move every in-flight run on
    (resumes long steps, catches missed events). One run's failure, whatever it is, is logged and the tick
    goes on with the others."""
    from shared.usecases.ingest import INGEST_STATES, resume_stale_ingest
    from shared.usecases.run_events import publish_left_over

    publish_left_over(rollout.ledger, rollout.events, now=rollout.now(), held=lambda r: is_held(r, rollout))
    report = TickReport()
    for record in rollout.ledger.list():
        if record.operation == UNDO_PENDING:
            try:
                finish_undo(record, rollout)
            except Exception:  # isolation, as below
                log.warning("run %s: undo still unfinished", record.run_id, exc_info=True)
            continue
        if record.state == RunState.LIVE:
            try:
                guard_live(record, rollout)
            except Exception:  # isolation, as below
                log.warning("run %s: live traffic not checked", record.run_id, exc_info=True)
            continue
        if record.state not in INGEST_STATES and record.state not in IN_FLIGHT:
            continue
        report.attempted.append(record.run_id)
        try:
            if record.state in INGEST_STATES:
                resume_stale_ingest(record, rollout, claim_ttl=rollout.claim_ttl, token_counter=rollout.token_counter)
                moved = rollout.ledger.get(record.run_id) or record
            else:
                moved = advance_run(record.run_id, rollout)
        except Exception as exc:  # isolation: the next run must not wait for this one
            report.failed[record.run_id] = f"{type(exc).__name__}: {exc}"
            transient = isinstance(exc, RETRYABLE)
            log.warning(
                "run %s: %s; next tick retries",
                record.run_id,
                "transient error" if transient else "could not be moved",
                exc_info=not transient,
                extra={"run_id": record.run_id},
            )
            continue
        if moved.state != record.state:
            report.moved.append(moved)
    return report


def advance_run(run_id: str, rollout: Rollout, *, max_steps: int = 12) -> RunRecord:
    """Move one run as far as it can go now, stopping at the first step that has to wait.

    A step that fails with a transient error gives its lease back at once (the next delivery retries without
    waiting for the TTL) and the error propagates (the trigger decides about retries). Any other failure
    ends the run in `error`, with the reason, and does not propagate: it would fail the same way again.
    """
    record = rollout.ledger.get(run_id)
    if record is None:
        raise NotFound(f"run {run_id} not found")
    for _ in range(max_steps):
        if record.state not in OBSERVING_STEPS and record.state not in LEASED_STEPS:
            break
        ended = _supersede_if_newer(record, rollout)
        if ended is not None:
            record = ended
            break
        moved = _one_step(record, rollout)
        if moved is None or moved.state == record.state:
            record = moved or rollout.ledger.get(run_id) or record
            break
        record = moved
        if record.state in REPORT_STATES:
            write_run_report(record, rollout)
    return record


def _one_step(record: RunRecord, rollout: Rollout) -> RunRecord | None:
    """Run the record's step (under a lease when it acts); None when it did nothing (another delivery holds
    the run, or took it first)."""
    token = ""
    try:
        observe = OBSERVING_STEPS.get(record.state)
        if observe is not None:
            return observe(record, rollout)
        held = acquire(record, rollout)
        if held is None:
            return None
        token = held.lease.token
        return LEASED_STEPS[record.state](held, rollout)
    except ConflictError as exc:
        log.info("run %s: %s (another delivery is handling it)", record.run_id, exc, extra={"run_id": record.run_id})
        current = rollout.ledger.get(record.run_id)
        if current is not None and current.state.terminal and current.state != record.state:
            # Ended meanwhile (canceled, superseded): whatever this delivery started before it lost the run is
            # undone again, idempotently.
            current = undo_or_mark(current, rollout, was=record.state)
        return current
    except RETRYABLE:
        if token:
            give_back(record.run_id, token, rollout)
        raise
    except Exception as exc:
        return _fail(record, token, rollout, exc)


def _fail(record: RunRecord, token: str, rollout: Rollout, exc: Exception) -> RunRecord:
    """A non-transient failure of a step: the run ends in `error` with the reason (if this delivery still holds
    it; an observing step holds nothing and ends it when nobody moved it meanwhile)."""
    log.exception("run %s: step %s failed", record.run_id, record.state.value, extra={"run_id": record.run_id})
    reason = f"{record.state.value} failed: {type(exc).__name__}: {exc}"
    current = still_holds(record.run_id, token, rollout) if token else rollout.ledger.get(record.run_id)
    if current is None or current.state != record.state:
        return current or record
    try:
        return end_run(current, rollout, RunState.ERROR, reason)
    except ConflictError:
        return rollout.ledger.get(record.run_id) or record


def _supersede_if_newer(record: RunRecord, rollout: Rollout) -> RunRecord | None:
    """End the run `superseded` when a newer version of its dataset took the dataset head; None otherwise."""
    head = rollout.ledger.get_dataset_head(record.container, record.blob)
    newer = superseded_by(record, head)
    if newer is None:
        return None
    reason = f"superseded by run {newer}, a newer version of {record.container}/{record.blob}"
    try:
        return end_run(record, rollout, RunState.SUPERSEDED, reason)
    except ConflictError:
        return rollout.ledger.get(record.run_id) or record
