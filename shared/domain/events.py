"""Azure ML Event Grid payloads, parsed at the edge into frozen dataclasses.

Tolerates unknown fields and both key casings (camelCase as Azure ML sends run events, PascalCase
as in model events, snake_case from some SDKs).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.domain.naming import RUN_TAG
from shared.domain.resources import JobState, job_state_from_run_status
from shared.domain.runs import is_run_id

RUN_COMPLETED = "Microsoft.MachineLearningServices.RunCompleted"
RUN_STATUS_CHANGED = "Microsoft.MachineLearningServices.RunStatusChanged"
RUN_EVENT_TYPES = (RUN_COMPLETED, RUN_STATUS_CHANGED)
PARENT_RUN_TYPES = ("azureml.PipelineRun", "azureml.pipelinerun", "pipeline")
STEP_RUN_TYPE = "azureml.StepRun"


def _norm(key: str) -> str:
    return re.sub(r"[_\-]", "", key).lower()


def _get(data: Mapping[str, Any], *names: str) -> Any:
    wanted = {_norm(n) for n in names}
    for key, value in data.items():
        if _norm(key) in wanted:
            return value
    return None


@dataclass(frozen=True)
class RunEvent:
    """One Azure ML run event, reduced to what the rollout needs."""

    id: str
    event_type: str
    subject: str
    run_id: str
    run_type: str
    run_status: str
    experiment_name: str
    run_tags: Mapping[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None

    @property
    def state(self) -> JobState:
        if self.event_type == RUN_COMPLETED:
            return JobState.COMPLETED
        return job_state_from_run_status(self.run_status)

    @property
    def is_child_step(self) -> bool:
        return self.run_type == STEP_RUN_TYPE or bool(self.parent_run_id)

    @property
    def our_run_id(self) -> str | None:
        """Our run id from the dot-free tag, when the job is one this app submitted. A tag that is not one of
        our run ids (any text can be put in a tag) names no run of ours."""
        value = str(self.run_tags.get(RUN_TAG) or "")
        return value if is_run_id(value) else None


def parse_run_event(*, event_id: str, event_type: str, subject: str, data: Any) -> RunEvent | None:
    """None when the event is not an Azure ML run event (a model or deployment event, say)."""
    if _norm(event_type) not in {_norm(t) for t in RUN_EVENT_TYPES}:
        return None
    if not isinstance(data, Mapping):
        raise ValueError(f"event {event_id}: data is {type(data).__name__}, expected an object")
    tags = _get(data, "runTags") or {}
    if not isinstance(tags, Mapping):
        tags = {}
    run_id = _get(data, "runId") or ""
    if not run_id and subject:
        match = re.search(r"/runs/([^/]+)$", subject)
        run_id = match.group(1) if match else ""
    canonical = RUN_COMPLETED if _norm(event_type) == _norm(RUN_COMPLETED) else RUN_STATUS_CHANGED
    return RunEvent(
        id=event_id,
        event_type=canonical,
        subject=subject,
        run_id=str(run_id),
        run_type=str(_get(data, "runType") or ""),
        run_status=str(_get(data, "runStatus") or ("Completed" if canonical == RUN_COMPLETED else "")),
        experiment_name=str(_get(data, "experimentName") or ""),
        run_tags={str(k): str(v) for k, v in tags.items()},
        parent_run_id=str(tags.get("azureml.pipelinerunid") or tags.get("azureml.pipeline") or "") or None
        if str(_get(data, "runType") or "") == STEP_RUN_TYPE
        else None,
    )
