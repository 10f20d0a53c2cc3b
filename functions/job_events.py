"""Event Grid trigger: Azure ML run events (RunStatusChanged, RunCompleted) drive the rollout."""

from __future__ import annotations

import logging

import azure.functions as func

from shared.bootstrap import app_context, rollout_from_context
from shared.usecases.rollout import receive_run_event

log = logging.getLogger(__name__)
bp = func.Blueprint()


@bp.function_name("job_events")
@bp.event_grid_trigger(arg_name="event")
def job_events(event: func.EventGridEvent) -> None:
    """Transient errors propagate so Event Grid redelivers (the handler is idempotent); a malformed event is
    recorded and acknowledged by the use case, never retried into the dead-letter queue."""
    try:
        data = event.get_json()
    except ValueError:  # a body that is not JSON: the use case records it like any malformed event
        data = None
    outcome = receive_run_event(
        event_id=event.id,
        event_type=event.event_type,
        subject=event.subject,
        data=data,
        rollout=rollout_from_context(app_context()),
    )
    log.info("event %s: %s (%s)", event.id, outcome.action, outcome.reason, extra={"run_id": outcome.run_id})
