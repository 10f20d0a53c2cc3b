"""Run leases and endpoint leases, as values passed explicitly (see `shared.domain.leases`).

A step works on a `Held`: the lease and the record it was written on (same ETag). Every write under it is
conditional on that ETag and returns a new `Held`; when anyone else has written the record meanwhile (a
delivery that took an expired lease over, a cancel, a supersession), the write raises `ConflictError` and
the step stops. `authorise` renews the run lease, and the endpoint lease when the step acts on the
endpoint, just before every side effect: a side effect only ever follows a won conditional write.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace
from typing import Any

from shared.domain.leases import EndpointLease, RunLease, claim_binds, lease_binds, lease_on
from shared.domain.runs import RunRecord, RunState
from shared.errors import ConflictError
from shared.usecases.rollout.model import ENDPOINT_LEASE_TTLS, ENDPOINT_STATES, Rollout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Held:
    """A run lease and the record it was last written on (`record.etag == lease.etag`)."""

    lease: RunLease
    record: RunRecord

    @property
    def run_id(self) -> str:
        return self.record.run_id


def acquire(record: RunRecord, rollout: Rollout) -> Held | None:
    """Take the run lease for the record's state (ETag-conditional); None when someone holds it or took it first."""
    now = rollout.now()
    if lease_binds(record, now):
        return None
    lease = RunLease(
        run_id=record.run_id, token=uuid.uuid4().hex[:12], etag="", expires_at=now + rollout.ttl, state=record.state
    )
    try:
        leased = rollout.ledger.update(record, operation=lease.encode())
    except ConflictError:
        return None
    return Held(lease=replace(lease, etag=leased.etag), record=leased)


def write(held: Held, rollout: Rollout, **fields: Any) -> Held:
    """Change fields under the lease and renew it; `ConflictError` when the lease is lost."""
    lease = replace(held.lease, expires_at=rollout.now() + rollout.ttl)
    record = rollout.ledger.update(held.record, operation=lease.encode(), **fields)
    return Held(lease=replace(lease, etag=record.etag), record=record)


def authorise(held: Held, rollout: Rollout) -> Held:
    """Prove the lease is still ours right before a side effect: renew the run lease, and the endpoint lease
    when the run is in an endpoint state. Raises `ConflictError` when either is lost (then: no side effect)."""
    renewed = write(held, rollout)
    if renewed.record.state in ENDPOINT_STATES and renewed.record.endpoint and not hold_endpoint(renewed, rollout):
        raise ConflictError(f"run {held.run_id}: endpoint lease on {renewed.record.endpoint} lost")
    return renewed


def release(held: Held, rollout: Rollout, **fields: Any) -> RunRecord:
    """Give the run lease back without moving state (the step waits for a long operation). `ConflictError`
    when the lease was lost meanwhile: the caller finds out who moved the run, and undoes if it ended."""
    return rollout.ledger.update(held.record, operation="", **fields)


def move(held: Held, rollout: Rollout, to: RunState, **fields: Any) -> RunRecord:
    """Move the run under the lease (conditional on its ETag), ending the lease."""
    return rollout.ledger.transition(held.record, to, operation="", **fields)


def is_held(record: RunRecord, rollout: Rollout) -> bool:
    """Whether a delivery holds the record now: an unexpired run lease on its state, or an ingest claim that
    still binds. Writers other than the holder (publishing its run events) leave such a record alone."""
    now = rollout.now()
    return lease_binds(record, now) or claim_binds(record, now, rollout.claim_ttl)


def still_holds(run_id: str, token: str, rollout: Rollout) -> RunRecord | None:
    """The current record when the lease with `token` is still on it (after a step failed part-way); else None."""
    current = rollout.ledger.get(run_id)
    held = lease_on(current) if current is not None else None
    if current is None or held is None or held.token != token or held.state != current.state.value:
        return None
    return current


def give_back(run_id: str, token: str, rollout: Rollout) -> None:
    """Release a lease after a transient failure, so the next delivery retries at once instead of after the TTL."""
    try:
        current = still_holds(run_id, token, rollout)
        if current is not None:
            rollout.ledger.update(current, operation="")
    except Exception:  # the lease expires on its own after the TTL
        log.warning("run %s: could not give the step lease back", run_id, exc_info=True, extra={"run_id": run_id})


# ---- the endpoint lease: one roll-out per endpoint ----


def hold_endpoint(held: Held, rollout: Rollout) -> bool:
    """Take or renew the endpoint lease for this run; False while another run holds it.

    A lease is free when released, or left behind by a run that is no longer rolling out (live, ended, or gone).
    It does not pass to another run while its holder is still in a roll-out state, even past its expiry: a
    holder whose step stalled is resumed by another delivery of the same run (its run lease expires), and a
    second roll-out slipping into the middle of the first would shift the traffic twice (found by the soak run,
    where a holder's shift step outlasted its endpoint lease). The expiry (`ENDPOINT_LEASE_TTLS` run-lease TTLs)
    is kept on the row for the undo's check (`ending._take_out_deployment`)."""
    record = held.record
    ledger, now = rollout.ledger, rollout.now()
    current = ledger.get_endpoint_lease(record.endpoint) or EndpointLease(record.endpoint)
    if current.held_by(record.run_id):
        token = current.token
    else:
        holder = ledger.get(current.holder) if current.holder else None
        if holder is not None and holder.state in ENDPOINT_STATES and holder.endpoint == record.endpoint:
            log.info(
                "run %s: waiting for endpoint %s (run %s is %s)",
                record.run_id,
                record.endpoint,
                current.holder,
                holder.state.value,
                extra={"run_id": record.run_id, "endpoint": record.endpoint},
            )
            return False
        token = uuid.uuid4().hex[:12]
    try:
        ledger.put_endpoint_lease(current.taken_by(record.run_id, token, now, rollout.ttl * ENDPOINT_LEASE_TTLS))
    except ConflictError:
        return False
    return True


def release_endpoint(record: RunRecord, rollout: Rollout) -> None:
    """Release the endpoint lease when this run holds it (best effort: a lease left by an ended run is free)."""
    if not record.endpoint:
        return
    try:
        current = rollout.ledger.get_endpoint_lease(record.endpoint)
        if current is not None and current.held_by(record.run_id):
            rollout.ledger.put_endpoint_lease(current.released())
    except Exception:
        log.warning(
            "run %s: could not release the endpoint lease on %s",
            record.run_id,
            record.endpoint,
            exc_info=True,
            extra={"run_id": record.run_id},
        )
