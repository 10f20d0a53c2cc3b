"""The fine-tune job: check, plan and submit the notebook's pipeline, read its state, cancel it, and
read what it logged.

Before anything is submitted, the plan checks the base model's lifecycle (retired or archived:
refused, naming the date and a fine-tunable alternative from the same registry; deprecated:
warned), the VM sizes against the model's own lists and the retired families, and every choice
parameter against the enum of the component version fetched (`model_lifecycle`,
`component_choices`). The job name is deterministic and looked up first, so a repeated submission
finds the first job.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from shared.adapters.azureml.clients import AzureMLClients, operation_now, service_word
from shared.adapters.azureml.component_choices import choice_findings, component_enums
from shared.adapters.azureml.compute_check import cluster_size, resolve_gpus
from shared.adapters.azureml.job_spec import (
    BASE_MODEL_ID_TAG,
    FROM_MODEL_LIST,
    INSTANCE_TYPE_INPUTS,
    INSTANCE_TYPE_SETTINGS,
    MODEL_LISTED_INPUTS,
    MODEL_OUTPUT_OF_COMPONENT,
    TRAINED_MODEL_OUTPUT,
    ComputePlan,
    FineTuneJobSpec,
    MlflowModel,
    UriFile,
    build_job_spec,
    compute_plan,
)
from shared.adapters.azureml.model_lifecycle import (
    ModelMetadata,
    alternative_sentence,
    candidate_order,
    default_sku,
    finetune_lifecycle_findings,
    is_retired_for_finetuning,
    pick_alternative,
    read_model_entity,
    read_model_version,
    sku_findings,
    vm_size_findings,
)
from shared.adapters.azureml.model_tags import MODEL_DEFAULTS_TAG, parse_model_defaults
from shared.adapters.azureml.observability import mlflow_base_url, read_run_metrics
from shared.domain.costs import TrainingPlan
from shared.domain.resources import (
    Finding,
    FindingLevel,
    FineTuneRequest,
    JobRef,
    JobState,
    JobStatus,
    MetricPoint,
    Operation,
    job_state_from_run_status,
)
from shared.errors import ComputeError, ConfigError, ConflictError, InvalidInput, NotFound, TunegridError

log = logging.getLogger(__name__)

_FAILED_CHILD_DEPTH = 3
_MAX_LISTED_MODELS = 5000
"""Registry model containers read when looking for an alternative (paged by the SDK)."""
_ALTERNATIVE_READS = 12
"""Model versions read at most when looking for an alternative to a retired model."""
_ALTERNATIVE_TTL_S = 3600.0
_PLAN_REUSE_S = 300.0
"""How long `plan_training` reuses the plan `check_finetune` made for the same job (one ingest delivery)."""


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


@dataclass(frozen=True)
class SubmissionPlan:
    """What a submission would send, and what the checks found. `spec` is None when an error
    stopped the planning early (the base model is retired, say)."""

    findings: tuple[Finding, ...]
    spec: FineTuneJobSpec | None = None
    component: Any = None
    model: ModelMetadata | None = None
    finetune_size: str = ""
    """The fine-tune step's VM size (serverless: chosen or from the model's list; a cluster: its size)."""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.is_error]


COMPUTE_FINDINGS = frozenset({"sku_retired", "sku_unsupported", "sku_not_allowed", "no_sku_list", "no_usable_sku"})


def refusal(findings: list[Finding]) -> TunegridError:
    """The error `submit_finetune` raises for the checks' errors: ComputeError when only VM sizes are
    at fault, else ConfigError (a setting or the sidecar names something that cannot run)."""
    message = "fine-tune refused before submission: " + "; ".join(f.message for f in findings)
    return ComputeError(message) if all(f.code in COMPUTE_FINDINGS for f in findings) else ConfigError(message)


def _param_sources(request: FineTuneRequest, model_defaults: Mapping[str, Any], model: str) -> dict[str, str]:
    sources = {name: f"{model}'s model_specific_defaults" for name in model_defaults}
    sources.update({name: f"the sidecar's finetune.{name}" for name in request.params})
    return sources


class JobsMixin(AzureMLClients):
    """`check_finetune`, `submit_finetune`, `get_job`, `cancel_job`, `get_job_metrics` (and `plan_submission`)."""

    def _job_ref(self, job: Any, *, base_model_id: str | None = None) -> JobRef:
        tags = dict(getattr(job, "tags", None) or {})
        return JobRef(
            name=job.name,
            studio_url=getattr(job, "studio_url", None),
            display_name=getattr(job, "display_name", None),
            base_model_id=base_model_id or tags.get(BASE_MODEL_ID_TAG),
        )

    def _base_model(self, request: FineTuneRequest) -> tuple[Any, ModelMetadata]:
        s = self._settings
        name = request.base_model or s.base_model_name
        version = request.base_model_version or (None if request.base_model_label else s.base_model_version) or None
        label = None if version else (request.base_model_label or s.base_model_label or "latest")
        reg = self._registry_client()
        ref = f"version {version}" if version else f"label {label}"
        entity = self._call(
            lambda: reg.models.get(name, version=version) if version else reg.models.get(name, label=label),
            f"read the base model {name} ({ref}) from registry {s.registry_name}",
            what=f"base model {name} ({ref}) in registry {s.registry_name}",
            registry=True,
        )
        raw = self._raw_model_version(entity.name, str(entity.version))
        return entity, read_model_entity(entity, raw=raw, registry=s.registry_name)

    def _alternative(self, meta: ModelMetadata) -> str:
        """A sentence naming a fine-tunable chat-completion model of the same registry with no
        deprecation date, read from the registry's own listing (its family first, at most
        `_ALTERNATIVE_READS` versions read); remembered for an hour."""
        registry = self._settings.registry_name
        key = (registry, meta.name)
        with self._lock:
            hit = self._alternatives_cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        reg = self._registry_client()
        try:
            containers = self._call(
                lambda: list(itertools.islice(reg.models.list(), _MAX_LISTED_MODELS)),
                f"list the models of registry {registry}",
                registry=True,
            )
            latest = {str(c.name): str(getattr(c, "latest_version", "") or "") for c in containers}
            found: ModelMetadata | None = None
            for name in candidate_order(latest, like=meta.name)[:_ALTERNATIVE_READS]:
                if not latest[name]:
                    continue
                raw = self._raw_model_version(name, latest[name])
                if raw is None:
                    continue
                found = pick_alternative([read_model_version(raw, registry=registry)], like=meta.name)
                if found is not None:
                    break
            sentence = alternative_sentence(found, registry=registry)
        except TunegridError as exc:
            log.warning("no alternative to %s: %s", meta.ref, exc)
            return alternative_sentence(None, registry=registry, detail=f" (its models could not be read: {exc})")
        with self._lock:
            self._alternatives_cache[key] = (time.monotonic() + _ALTERNATIVE_TTL_S, sentence)
        return sentence

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

    def _compute(
        self, request: FineTuneRequest, meta: ModelMetadata, *, now: datetime
    ) -> tuple[ComputePlan, list[Finding], str]:
        """Sizes from settings, the sidecar or the model's list, checked against the model's lists and
        the retired families; then the GPU count of the fine-tune size."""
        plan = compute_plan(self._settings, request.compute)
        findings: list[Finding] = []
        if plan.serverless:
            chosen = dict(plan.instance_types)
            for key in INSTANCE_TYPE_INPUTS:
                value, source = chosen[key], plan.sources.get(key, key)
                where = f"serverless {key}, from {source}"
                if key not in MODEL_LISTED_INPUTS:
                    findings += vm_size_findings(value, where=where, now=now, gpu_step=False)
                elif value:
                    findings += sku_findings(
                        value, meta.finetune_skus, meta=meta, role="fine-tune", where=where, now=now
                    )
                else:
                    default, errors = default_sku(
                        meta.finetune_skus,
                        meta=meta,
                        role="fine-tune",
                        setting=f"{INSTANCE_TYPE_SETTINGS[key]} or the sidecar's compute.{key}",
                    )
                    findings += errors
                    chosen[key] = default or ""
            plan = dataclasses.replace(plan, instance_types=chosen)
            size, where = chosen["instance_type_finetune"], "serverless instance_type_finetune"
        else:
            size = cluster_size(
                self._ws, lambda fn, action: self._call(fn, action), plan, workspace_name=self._settings.workspace_name
            )
            where = f"cluster {plan.target}"
            findings += sku_findings(size, meta.finetune_skus, meta=meta, role="fine-tune", where=where, now=now)
        if any(f.is_error for f in findings) or not size:
            return plan, findings, size
        gpus = resolve_gpus(self._ws, lambda fn, action: self._call(fn, action), plan, size=size, where=where)
        return gpus, findings, size

    def plan_submission(self, request: FineTuneRequest, *, now: datetime | None = None) -> SubmissionPlan:
        """Resolve and check the base model (lifecycle), the compute (the model's SKU lists) and the
        component (its choices), then build the job's spec (the same function the dry run uses).
        Reads only; submits nothing. Policy problems are findings; a missing cluster or model, or a
        service error, raises."""
        now = now or self._clock()
        entity, meta = self._base_model(request)
        findings: list[Finding] = []
        alternative = self._alternative(meta) if is_retired_for_finetuning(meta, now=now) else ""
        findings += finetune_lifecycle_findings(meta, now=now, alternative=alternative)
        if any(f.is_error for f in findings):
            return SubmissionPlan(tuple(findings), model=meta)
        plan, compute_findings, size = self._compute(request, meta, now=now)
        findings += compute_findings
        if any(f.is_error for f in findings):
            return SubmissionPlan(tuple(findings), model=meta)
        defaults = parse_model_defaults(meta.ref, (meta.tags or {}).get(MODEL_DEFAULTS_TAG))
        component = self._component()
        spec = build_job_spec(
            self._settings,
            request,
            model_name=entity.name,
            model_path=entity.id,
            component=component.id,
            compute=plan,
            model_defaults=defaults,
            component_inputs=set((getattr(component, "inputs", None) or {}).keys()) or None,
            notes=[
                f"{key} = {plan.instance_types[key]}, the first usable size of {meta.ref}'s list "
                f"({meta.finetune_skus.source if meta.finetune_skus else 'none'})"
                for key in MODEL_LISTED_INPUTS
                if plan.serverless and plan.sources.get(key) == FROM_MODEL_LIST
            ],
        )
        sources = _param_sources(request, defaults, meta.ref)
        findings += choice_findings(
            {**spec.compute_inputs, **spec.training_inputs},
            component_enums(component),
            component=f"{component.name} {component.version}",
            sources=sources,
        )
        return SubmissionPlan(tuple(findings), spec=spec, component=component, model=meta, finetune_size=size)

    def _remembered_plan(self, request: FineTuneRequest) -> SubmissionPlan:
        """The plan `check_finetune` made for this job moments ago, else a new one."""
        with self._lock:
            hit = self._recent_plans.get(request.job_name)
        if hit is not None and time.monotonic() - hit[0] < _PLAN_REUSE_S:
            return cast(SubmissionPlan, hit[1])
        return self._remember(request, self.plan_submission(request))

    def _remember(self, request: FineTuneRequest, plan: SubmissionPlan) -> SubmissionPlan:
        now = time.monotonic()
        with self._lock:
            for name, (at, _) in list(self._recent_plans.items()):
                if now - at >= _PLAN_REUSE_S:
                    del self._recent_plans[name]
            self._recent_plans[request.job_name] = (now, plan)
        return plan

    def check_finetune(self, request: FineTuneRequest) -> list[Finding]:
        """The plan's findings; a compute, config or input problem found while planning (a missing
        cluster, unreadable tags) is an error finding too. Permission and service errors raise."""
        try:
            return list(self._remember(request, self.plan_submission(request)).findings)
        except (ComputeError, ConfigError, InvalidInput) as exc:
            code = "compute" if isinstance(exc, ComputeError) else "config"
            return [Finding(FindingLevel.ERROR, code, str(exc))]

    def plan_training(self, request: FineTuneRequest) -> TrainingPlan:
        """The fine-tune step's size and the workspace's region, with the merged training parameters (the
        same spec `submit_finetune` sends), for the cost estimate."""
        planned = self._remembered_plan(request)
        if planned.spec is None or not planned.finetune_size:
            raise refusal(planned.errors) if planned.errors else ConfigError("the fine-tune VM size is unknown")
        inputs = planned.spec.training_inputs
        gpus = int(inputs.get("number_of_gpu_to_use_finetuning") or 1)
        nodes = int(inputs.get("num_nodes_finetune") or 1)
        inference = planned.model.inference_skus if planned.model is not None else None
        return TrainingPlan(
            backend="azureml",
            sku=planned.finetune_size,
            region=str(getattr(self._workspace(), "location", "") or ""),
            nodes=nodes,
            gpus_per_node=gpus,
            epochs=float(inputs.get("num_train_epochs") or 1),
            max_steps=int(inputs.get("max_steps") or -1),
            rows_per_step=int(inputs.get("per_device_train_batch_size") or 1)
            * int(inputs.get("gradient_accumulation_steps") or 1)
            * gpus
            * nodes,
            max_seq_length=int(inputs.get("max_seq_length") or -1),
            inference_sku=(inference.first_usable() or "") if inference is not None else "",
        )

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
        planned = self.plan_submission(request)
        if planned.errors or planned.spec is None:
            raise refusal(planned.errors)
        for finding in planned.findings:
            log.warning("job %s: %s", request.job_name, finding.message, extra=extra)
        spec, component = planned.spec, planned.component
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
                lambda: read_run_metrics(self._arm_http(), base, job_name),
                f"read the MLflow metrics of job {job_name}",
            )
        except (TunegridError, ValueError) as exc:
            log.warning("metrics of job %s unavailable: %s", job_name, exc)
            return {}
