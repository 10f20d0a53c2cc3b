"""The fine-tune job: plan and submit the notebook's pipeline, read its state, cancel it, and read
what it logged.

The job name is deterministic and looked up first, so a repeated submission finds the first job.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from shared.adapters.azureml.clients import AzureMLClients, operation_now, service_word
from shared.adapters.azureml.compute_check import resolve_compute
from shared.adapters.azureml.job_spec import (
    BASE_MODEL_ID_TAG,
    MODEL_OUTPUT_OF_COMPONENT,
    TRAINED_MODEL_OUTPUT,
    FineTuneJobSpec,
    MlflowModel,
    UriFile,
    build_job_spec,
    compute_plan,
)
from shared.adapters.azureml.model_tags import parse_model_tags
from shared.adapters.azureml.observability import mlflow_base_url, read_run_metrics
from shared.domain.resources import (
    FineTuneRequest,
    JobRef,
    JobState,
    JobStatus,
    MetricPoint,
    Operation,
    job_state_from_run_status,
)
from shared.errors import ConflictError, NotFound, TunegridError

log = logging.getLogger(__name__)

_FAILED_CHILD_DEPTH = 3


def pipeline_job_from_spec(spec: FineTuneJobSpec, component: Any) -> Any:
    """The notebook's `@pipeline` job, built from the same spec the dry run prints."""
    from azure.ai.ml import Input
    from azure.ai.ml.dsl import pipeline

    kwargs: dict[str, Any] = {}
    for name, value in spec.inputs().items():
        if isinstance(value, UriFile):
            kwargs[name] = Input(type="uri_file", path=value.path)
        elif isinstance(value, MlflowModel):
            kwargs[name] = value.path  # the notebook passes `foundation_model.id`
        else:
            kwargs[name] = value

    @pipeline(name=re.sub(r"[^a-zA-Z0-9_-]", "_", spec.display_name)[:255])  # type: ignore[call-overload]
    def create_pipeline() -> dict[str, Any]:
        chat_completion_pipeline = component(**kwargs)
        return {TRAINED_MODEL_OUTPUT: getattr(chat_completion_pipeline.outputs, MODEL_OUTPUT_OF_COMPONENT)}

    job = create_pipeline()
    job.settings.force_rerun = spec.settings["force_rerun"]
    job.settings.continue_on_step_failure = spec.settings["continue_on_step_failure"]
    job.name = spec.name
    job.display_name = spec.display_name
    job.experiment_name = spec.experiment_name
    job.tags = dict(spec.tags)
    return job


class JobsMixin(AzureMLClients):
    """`submit_finetune`, `get_job`, `cancel_job`, `get_job_metrics` (and `plan_submission`)."""

    def _job_ref(self, job: Any, *, base_model_id: str | None = None) -> JobRef:
        tags = dict(getattr(job, "tags", None) or {})
        return JobRef(
            name=job.name,
            studio_url=getattr(job, "studio_url", None),
            display_name=getattr(job, "display_name", None),
            base_model_id=base_model_id or tags.get(BASE_MODEL_ID_TAG),
        )

    def _base_model(self, request: FineTuneRequest) -> Any:
        s = self._settings
        name = request.base_model or s.base_model_name
        version = request.base_model_version or (None if request.base_model_label else s.base_model_version) or None
        label = None if version else (request.base_model_label or s.base_model_label or "latest")
        reg = self._registry_client()
        ref = f"version {version}" if version else f"label {label}"
        return self._call(
            lambda: reg.models.get(name, version=version) if version else reg.models.get(name, label=label),
            f"read the base model {name} ({ref}) from registry {s.registry_name}",
            what=f"base model {name} ({ref}) in registry {s.registry_name}",
            registry=True,
        )

    def _component(self) -> Any:
        s = self._settings
        name, version = s.pipeline_component, s.pipeline_component_version or None
        label = s.pipeline_component_label or "latest"
        reg = self._registry_client()
        ref = f"version {version}" if version else f"label {label}"
        return self._call(
            lambda: (
                reg.components.get(name=name, version=version)
                if version
                else reg.components.get(name=name, label=label)
            ),
            f"read the pipeline component {name} ({ref}) from registry {s.registry_name}",
            what=f"pipeline component {name} ({ref}) in registry {s.registry_name}",
            registry=True,
        )

    def plan_submission(self, request: FineTuneRequest) -> tuple[FineTuneJobSpec, Any]:
        """Resolve the base model, the compute and the component, then build the job's spec (the
        same function the dry run uses). Reads only; submits nothing."""
        model = self._base_model(request)
        tags = parse_model_tags(f"{model.name}:{model.version}", getattr(model, "tags", None))
        plan = resolve_compute(
            self._ws,
            lambda fn, action: self._call(fn, action),
            compute_plan(self._settings, request.compute),
            model=f"{model.name}:{model.version}",
            allow_list=tags.finetune_allow_list,
            workspace_name=self._settings.workspace_name,
        )
        component = self._component()
        spec = build_job_spec(
            self._settings,
            request,
            model_name=model.name,
            model_path=model.id,
            component=component.id,
            compute=plan,
            model_defaults=tags.defaults,
            component_inputs=set((getattr(component, "inputs", None) or {}).keys()) or None,
        )
        return spec, component

    def submit_finetune(self, request: FineTuneRequest) -> JobRef:
        extra = {"run_id": request.run_id}
        existing = self._job_entity(request.job_name)
        if existing is not None:
            log.info(
                "job %s already exists (%s): not submitting again",
                request.job_name,
                service_word(existing.status),
                extra=extra,
            )
            return self._job_ref(existing)
        spec, component = self.plan_submission(request)
        try:
            created = self._call(
                lambda: self._ws.jobs.create_or_update(
                    pipeline_job_from_spec(spec, component), experiment_name=spec.experiment_name
                ),
                f"submit the pipeline job {spec.name}",
            )
        except ConflictError:
            created = self._job_entity(spec.name)
            if created is None:
                raise
            log.info("job %s was created concurrently: using it", spec.name, extra=extra)
        log.info("submitted job %s (%s)", created.name, spec.display_name, extra=extra)
        return self._job_ref(created, base_model_id=spec.model_path)

    def get_job(self, job_name: str) -> JobStatus | None:
        job = self._job_entity(job_name)
        if job is None:
            return None
        raw = service_word(job.status) or "NotStarted"
        state = job_state_from_run_status(raw)
        return JobStatus(
            name=job.name,
            state=state,
            raw_status=raw,
            error=self._failure_reason(job_name) if state == JobState.FAILED else None,
            studio_url=getattr(job, "studio_url", None),
            tags=dict(getattr(job, "tags", None) or {}),
        )

    def _failed_step(self, job_name: str, depth: int = 0) -> Any:
        """The deepest failed descendant of a pipeline job (the chat_completion_pipeline node is
        itself a pipeline, so the failing step is a grandchild)."""
        if depth >= _FAILED_CHILD_DEPTH:
            return None
        children = self._call(
            lambda: list(self._ws.jobs.list(parent_job_name=job_name)), f"list the steps of job {job_name}"
        )
        for child in children:
            if child is not None and job_state_from_run_status(service_word(child.status)) == JobState.FAILED:
                return self._failed_step(child.name, depth + 1) or child
        return None

    def _failure_reason(self, job_name: str) -> str | None:
        """The error message of the failed step (falling back to the job's own error)."""
        try:
            step = self._failed_step(job_name)
            target = step.name if step is not None else job_name
            # azure-ai-ml 1.35 exposes a run's error only through its run-history operations.
            run = self._call(lambda: self._ws.jobs._runs_operations.get_run(target), f"read the error of run {target}")
        except TunegridError as exc:
            log.warning("job %s failed; its reason could not be read: %s", job_name, exc)
            return None
        error = getattr(getattr(run, "error", None), "error", None)
        message = getattr(error, "message", None)
        code = getattr(error, "code", None)
        where = f"step {step.display_name or step.name}" if step is not None else f"job {job_name}"
        if not message:
            return f"{where} failed (Azure ML gave no error message)"
        return f"{where} failed: {code + ': ' if code else ''}{message}"[:4000]

    def cancel_job(self, job_name: str) -> Operation:
        job = self._job_entity(job_name)
        if job is None:
            raise NotFound(f"job {job_name} not found in workspace {self._settings.workspace_name}")
        raw = service_word(job.status)
        if job_state_from_run_status(raw).terminal:
            return Operation(kind="cancel-job", target=job_name, status=raw, done=True)
        poller = self._call(lambda: self._ws.jobs.begin_cancel(job_name), f"cancel job {job_name}")
        return operation_now("cancel-job", job_name, poller)

    def get_job_metrics(self, job_name: str) -> dict[str, list[MetricPoint]]:
        """Metrics of the job's MLflow run; {} (and a log line saying why) when they cannot be read."""
        try:
            base = mlflow_base_url(str(getattr(self._workspace(), "mlflow_tracking_uri", "") or ""))
            return self._call(
                lambda: read_run_metrics(self._mlflow_http(), base, job_name),
                f"read the MLflow metrics of job {job_name}",
            )
        except (TunegridError, ValueError) as exc:
            log.warning("metrics of job %s unavailable: %s", job_name, exc)
            return {}
