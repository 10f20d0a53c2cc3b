"""Step leases on a run record: an ETag-conditional write that says "this delivery is doing the step"."""

from __future__ import annotations

import functools
import logging
import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from shared.domain.runs import RunRecord, RunState
from shared.errors import ConflictError
from shared.usecases.rollout.model import LEASE_TTL, Rollout

log = logging.getLogger(__name__)


held = threading.local()


def give_back(run_id: str, rollout: Rollout) -> None:
    token = getattr(held, "token", "")
    if not token:
        return
    try:
        current = rollout.ledger.get(run_id)
        if current is not None and f"|{token}|" in current.operation:
            rollout.ledger.update(current, operation="")
    except Exception:  # the lease expires on its own after LEASE_TTL
        log.warning("run %s: could not give the step lease back", run_id, exc_info=True, extra={"run_id": run_id})


def take_lease(record: RunRecord, rollout: Rollout) -> RunRecord | None:
    """Take the step lease on this record (ETag-conditional); None when someone else holds it."""
    now = rollout.now()
    if record.operation:
        state, _, stamp = ([*record.operation.split("|"), "", ""])[:3]
        try:
            fresh = state == record.state.value and now - datetime.fromisoformat(stamp) < LEASE_TTL
        except ValueError:
            fresh = False
        if fresh:
            return None
    token = uuid.uuid4().hex[:12]
    try:
        leased = rollout.ledger.update(record, operation=f"{record.state.value}|{token}|{now.isoformat()}")
    except ConflictError:
        return None
    held.token = token
    return leased


def leased(step: Callable[[RunRecord, Rollout], RunRecord | None]) -> Callable[[RunRecord, Rollout], RunRecord | None]:
    """Run a step only under its lease; the step gets the leased record (its ETag is the lease's)."""

    @functools.wraps(step)
    def leased_step(record: RunRecord, rollout: Rollout) -> RunRecord | None:
        leased = take_lease(record, rollout)
        return None if leased is None else step(leased, rollout)

    return leased_step


def release(record: RunRecord, rollout: Rollout, **fields: Any) -> RunRecord:
    """Give the lease back without moving state (the step must wait for a long operation)."""
    try:
        return rollout.ledger.update(record, operation="", **fields)
    except ConflictError:
        return rollout.ledger.get(record.run_id) or record


def move(record: RunRecord, rollout: Rollout, to: RunState, **fields: Any) -> RunRecord:
    return rollout.ledger.transition(record.run_id, to, expect=[record.state], operation="", **fields)
