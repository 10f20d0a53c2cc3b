"""Timer trigger: the janitor deletes idle endpoints this app owns (logic in `shared.janitor`)."""

from __future__ import annotations

import logging

import azure.functions as func

from shared.bootstrap import app_context, sweep_from_context

log = logging.getLogger(__name__)

bp = func.Blueprint()


@bp.function_name("janitor")
@bp.timer_trigger(arg_name="timer", schedule="%JANITOR_SCHEDULE%", run_on_startup=False, use_monitor=True)
def janitor(timer: func.TimerRequest) -> None:
    """One sweep per tick. Unexpected errors are logged and re-raised so the host records a failed run."""
    if timer.past_due:
        log.info("janitor tick is past due")
    try:
        report = sweep_from_context(app_context())
    except Exception:
        log.exception("janitor sweep failed")
        raise
    if report.failures:
        log.error(
            "janitor sweep %s: %d deletes failed; the next tick tries again",
            report.sweep_id,
            len(report.failures),
            extra={"sweep_id": report.sweep_id},
        )
