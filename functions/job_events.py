"""Event Grid trigger: Azure ML run events (RunStatusChanged, RunCompleted) drive the rollout."""

from __future__ import annotations

import logging

import azure.functions as func

from shared.bootstrap import app_context, rollout_from_context
from shared.domain.events import parse_run_event
from shared.usecases.rollout import handle_run_event

log = logging.getLogger(__name__)
bp = func.Blueprint()


@bp.function_name("job_events")
@bp.event_grid_trigger(arg_name="event")
def job_events(event: func.EventGridEvent) -> None:
    """Unexpected errors propagate so Event Grid redelivers; the handler is idempotent."""
    parsed = parse_run_event(
        event_id=event.id, event_type=event.event_type, subject=event.subject, data=event.get_json()
    )
    if parsed is None:
        log.info("ignoring event %s of type %s", event.id, event.event_type)
        return
    outcome = handle_run_event(parsed, rollout_from_context(app_context()))
    log.info("event %s: %s (%s)", event.id, outcome.action, outcome.reason, extra={"run_id": outcome.run_id})
