"""Ending a run before it goes live (cancel, a non-transient failure, a newer version), and undoing what it
started. The move is won first (ETag-conditional); only the winner undoes, and undoing is idempotent by
name, so a delivery that lost its lease to the move may undo again without harm."""

from __future__ import annotations

import logging
from typing import Any

from shared.domain.runs import RunRecord, RunState
from shared.errors import ConflictError, NotFound, TunegridError
from shared.usecases.rollout.leases import Held, move, release_endpoint
from shared.usecases.rollout.model import Rollout
from shared.usecases.rollout.reports import write_run_report

log = logging.getLogger(__name__)

UNDO_PENDING = "undo-pending"
"""`operation` of an ended run whose undo could not finish (a transient error): the tick tries it again."""

JOB_STATES = frozenset({RunState.SUBMITTING, RunState.SUBMITTED, RunState.RUNNING})
"""States in which the run's job may still be queued or training."""
DEPLOYMENT_STATES = frozenset(
    {RunState.DEPLOYING, RunState.SMOKE_TESTING, RunState.EVALUATING, RunState.SHIFTING_TRAFFIC}
)
"""States in which the run's deployment may exist."""


def end_held(held: Held, rollout: Rollout, to: RunState, reason: str, **fields: Any) -> RunRecord:
    """End a run from inside its step: win the move to the end state under the run lease first (conditional on
    its ETag); only then undo (delete the 0 % deployment, release the endpoint lease)."""
    ended = move(held, rollout, to, error=reason[:4000], **fields)
    return undo_or_mark(ended, rollout, was=held.record.state)


def end_run(record: RunRecord, rollout: Rollout, to: RunState, reason: str) -> RunRecord:
    """Move `record` (conditional on its ETag) to an end state, then undo what it started and write its run
    report. `ConflictError` when the record changed since it was read: the caller re-reads and decides."""
    ended = rollout.ledger.transition(record, to, operation="", claimed_at="", error=reason[:4000])
    log.warning("run %s: %s: %s", record.run_id, to.value, reason, extra={"run_id": record.run_id})
    ended = undo_or_mark(ended, rollout, was=record.state)
    write_run_report(ended, rollout)
    return ended


def undo_or_mark(ended: RunRecord, rollout: Rollout, *, was: RunState) -> RunRecord:
    """`undo`, and when it could not finish, mark the ended run `undo-pending` for the tick to finish it."""
    if undo(ended, rollout, was=was):
        return ended
    try:
        return rollout.ledger.update(ended, operation=UNDO_PENDING)
    except (TunegridError, OSError) as exc:  # the janitor's orphan rule still removes a 0 % deployment left
        log.warning("run %s: undo left unfinished and not marked: %s", ended.run_id, exc)
        return ended


def finish_undo(record: RunRecord, rollout: Rollout) -> bool:
    """Try again the undo of an ended run marked `undo-pending`; True when it is complete now."""
    if record.operation != UNDO_PENDING or not record.state.terminal:
        return True
    was = RunState(record.timeline[-2][0]) if len(record.timeline) > 1 else record.state
    if not undo(record, rollout, was=was):
        return False
    try:
        rollout.ledger.update(record, operation="")
    except ConflictError:
        pass  # someone else finished it, or marked it again: the next tick looks again
    return True


def end_if_alive(run_id: str, rollout: Rollout, to: RunState, reason: str) -> RunRecord | None:
    """`end_run` on the current record, retried while other writers change it; None when it is already over."""
    for _ in range(8):
        current = rollout.ledger.get(run_id)
        if current is None or current.state.terminal or current.state == RunState.LIVE:
            return None
        try:
            return end_run(current, rollout, to, reason)
        except ConflictError:
            continue
    raise ConflictError(f"run {run_id} kept changing while being ended")


def undo(record: RunRecord, rollout: Rollout, *, was: RunState) -> bool:
    """Undo what a run that ended in state `was` may have started: cancel its job, take its deployment out
    (removed at 0 %; with traffic, the traffic goes back to the previous deployment first and the 0 %
    deployment is left to the next roll-out on the endpoint or the janitor's orphan rule), and release the
    endpoint lease. Idempotent; False when something failed (logged), so that it is tried again."""
    backend = rollout.backend
    complete = True
    if was in JOB_STATES and record.job_name:
        try:
            backend.cancel_job(record.job_name)
            log.info("run %s: job %s canceled", record.run_id, record.job_name, extra={"run_id": record.run_id})
        except NotFound:
            pass
        except (TunegridError, OSError) as exc:
            complete = False
            log.warning("run %s: could not cancel job %s: %s", record.run_id, record.job_name, exc)
    if was in DEPLOYMENT_STATES and record.endpoint and record.deployment:
        try:
            _take_out_deployment(record, rollout)
        except (TunegridError, OSError) as exc:
            complete = False
            log.warning(
                "run %s: deployment %s/%s not taken out yet: %s",
                record.run_id,
                record.endpoint,
                record.deployment,
                exc,
                extra={"run_id": record.run_id},
            )
    release_endpoint(record, rollout)
    return complete


def _take_out_deployment(record: RunRecord, rollout: Rollout) -> None:
    backend = rollout.backend
    endpoint = backend.get_endpoint(record.endpoint)
    if endpoint is None or not any(d.name == record.deployment for d in endpoint.deployments):
        return
    mine = endpoint.traffic.get(record.deployment, 0) or endpoint.mirror_traffic.get(record.deployment, 0)
    if not mine:
        backend.begin_delete_deployment(record.endpoint, record.deployment)
        log.info("run %s: deleting its deployment %s (0 %% traffic)", record.run_id, record.deployment)
        return
    lease = rollout.ledger.get_endpoint_lease(record.endpoint)
    previous = record.previous_deployment
    if lease is not None and lease.holder and not lease.held_by(record.run_id) and not lease.free_at(rollout.now()):
        return  # another run rolls out on this endpoint now: its shift takes the traffic over
    if (
        previous
        and any(d.name == previous for d in endpoint.deployments)
        and not endpoint.provisioning_state.in_progress
    ):
        traffic = {name: 0 for name in endpoint.traffic}
        traffic[previous] = 100
        backend.begin_set_traffic(record.endpoint, traffic, mirror_traffic={})
        log.info("run %s: traffic of %s back to %s", record.run_id, record.endpoint, previous)
