"""Timer trigger: resumes long rollout steps (provisioning, traffic shifts) and catches missed events.

Chosen over a delayed queue message because it also heals runs whose events were lost, and needs no
extra queue; the schedule is the ROLLOUT_SCHEDULE setting.
"""

from __future__ import annotations

import logging

import azure.functions as func

from shared.bootstrap import app_context, rollout_from_context
from shared.usecases.rollout import tick

log = logging.getLogger(__name__)
bp = func.Blueprint()


@bp.function_name("rollout_tick")
@bp.timer_trigger(arg_name="timer", schedule="%ROLLOUT_SCHEDULE%", run_on_startup=False, use_monitor=True)
def rollout_tick(timer: func.TimerRequest) -> None:
    moved = tick(rollout_from_context(app_context()))
    if moved or timer.past_due:
        log.info("rollout tick: %d runs advanced (past due: %s)", len(moved), timer.past_due)
