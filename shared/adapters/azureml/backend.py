"""`AzureMLBackend`: the seed notebook's Azure ML workflow behind the `FineTuneBackend` port.

Nothing here waits on a long-running operation: `begin_*` SDK calls return a poller whose state is
reported in an `Operation` (azure-core keeps polling on its own daemon thread, which never blocks
the caller); later steps read the resource's provisioning state. Every call checks before it acts,
so a repeated event is a no-op: the job name is deterministic and looked up first; a registered
model version is read first; an existing endpoint or deployment is reported, not re-created.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from enum import Enum
from typing import Any, TypeVar

from azure.core.credentials import TokenCredential
from azure.core.exceptions import (
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.core.pipeline.transport import HttpTransport
from azure.core.rest import HttpRequest

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
from shared.adapters.azureml.model_tags import (
    INFERENCE_ALLOW_LIST_TAG,
    in_allow_list,
    parse_allow_list,
    parse_model_tags,
)
from shared.adapters.azureml.observability import (
    ARM_SCOPE,
    endpoint_resource_id,
    http_client,
    mlflow_base_url,
    read_endpoint_activity,
    read_run_metrics,
)
from shared.adapters.azureml.service_calls import Scope, ServiceCaller, not_found_is_none
from shared.domain.clock import parse_time, utcnow
from shared.domain.naming import OWNER_TAG
from shared.domain.resources import (
    DeploymentInfo,
    DeploymentSpec,
    EndpointActivity,
    EndpointCredentials,
    EndpointInfo,
    FineTuneRequest,
    JobRef,
    JobState,
    JobStatus,
    MetricPoint,
    ModelRef,
    Operation,
    ProvisioningState,
    job_state_from_run_status,
)
from shared.errors import (
    BackendError,
    ComputeError,
    ConfigError,
    ConflictError,
    InvalidInput,
    MetricsUnavailable,
    NotFound,
    TunegridError,
    UpstreamError,
)
from shared.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_REQUEST_TIMEOUT_MS = 180_000
_ENDPOINT_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9-]{1,30}[a-zA-Z0-9]")
_FAILED_CHILD_DEPTH = 3


def build_credential(settings: Settings, *, env: Mapping[str, str] | None = None) -> TokenCredential:
    """Managed identity when running in Azure (or when a client id is configured), else the
    developer's credentials (az login, VS Code, environment), never an interactive browser."""
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    env = os.environ if env is None else env
    if env.get("IDENTITY_ENDPOINT") or env.get("MSI_ENDPOINT") or settings.client_id:
        return ManagedIdentityCredential(client_id=settings.client_id or None)
    return DefaultAzureCredential(exclude_interactive_browser_credential=True)


def _word(value: Any) -> str:
    """An SDK enum or string as the service's word ('Succeeded', 'Failed', ...)."""
    if isinstance(value, Enum):
        value = value.value
    return str(value or "")


def _created_at(entity: Any) -> datetime | None:
    """Endpoints keep `createdAt` in their properties; deployments in `creation_context`."""
    context = getattr(entity, "creation_context", None)
    if context is not None:
        raw = context.get("createdAt") if isinstance(context, Mapping) else getattr(context, "created_at", None)
        if raw:
            return parse_time(raw)
    properties = getattr(entity, "properties", None) or {}
    return parse_time(properties.get("createdAt")) if isinstance(properties, Mapping) else None


def _operation(kind: str, target: str, poller: Any) -> Operation:
    """The poller's state now; reading it never waits."""
    status = _word(poller.status()) or "InProgress"
    return Operation(kind=kind, target=target, status=status, done=bool(poller.done()))


def _poller_error(poller: Any) -> str | None:
    """The error of a finished long-running operation, read from the poller's last answer."""
    try:
        response = getattr(poller.polling_method(), "_pipeline_response", None)
        doc = response.http_response.json() if response is not None else None
        error = (doc or {}).get("error") if isinstance(doc, Mapping) else None
        if isinstance(error, Mapping) and error.get("message"):
            return f"{error.get('code') or 'Error'}: {error['message']}"
    except Exception:  # the poller is ours to read only; a shape we do not know says nothing
        log.debug("could not read the operation's error", exc_info=True)
    return None


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


class AzureMLBackend:
    """The port over azure-ai-ml. Build it with `from_settings`; tests inject a transport (or
    clients) and a fake `TokenCredential`."""

    name = "azureml"

    def __init__(
        self,
        settings: Settings,
        *,
        credential: TokenCredential,
        transport: HttpTransport | None = None,
        workspace_client: Any = None,
        registry_client: Any = None,
        metrics_client_factory: Callable[[], Any] | None = None,
        caller: ServiceCaller | None = None,
    ) -> None:
        missing = [
            n
            for n, v in (
                ("AZURE_SUBSCRIPTION_ID", settings.subscription_id),
                ("AZURE_RESOURCE_GROUP", settings.resource_group),
                ("AZUREML_WORKSPACE_NAME", settings.workspace_name),
            )
            if not v
        ]
        if missing and workspace_client is None:
            raise ConfigError(f"the Azure ML backend needs settings: {', '.join(missing)}")
        self._settings = settings
        self._credential = credential
        self._transport = transport
        self._caller = caller or ServiceCaller()
        self._client_kwargs: dict[str, Any] = {"enable_telemetry": False, "retry_total": 0, "user_agent": "tunegrid"}
        if transport is not None:
            self._client_kwargs["transport"] = transport
        self._ws = workspace_client if workspace_client is not None else self._workspace_client()
        self._registry = registry_client
        self._metrics_client_factory = metrics_client_factory
        self._lock = threading.Lock()
        self._registry_lock = threading.Lock()
        self._workspace_entity: Any = None
        self._http: Any = None
        self._arm_http: Any = None
        self._credentials_cache: dict[str, tuple[float, EndpointCredentials]] = {}
        self._deployment_pollers: dict[tuple[str, str], Any] = {}
        workspace_id = (
            f"/subscriptions/{settings.subscription_id}/resourceGroups/{settings.resource_group}"
            f"/providers/Microsoft.MachineLearningServices/workspaces/{settings.workspace_name}"
        )
        self._ws_scope = Scope(
            "AzureML Data Scientist",
            "workspace",
            workspace_id,
            "submit jobs, register models and manage online endpoints",
        )
        self._registry_scope = Scope(
            "AzureML Registry User",
            "registry",
            settings.registry_name,
            "read the base model and the pipeline component (the public `azureml` registry is readable by any signed-in identity)",
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, *, env: Mapping[str, str] | None = None, transport: HttpTransport | None = None
    ) -> AzureMLBackend:
        """Builds clients only; no request is sent until a method is called."""
        return cls(settings, credential=build_credential(settings, env=env), transport=transport)

    # -- plumbing ---------------------------------------------------------------------------------
    def _workspace_client(self) -> Any:
        from azure.ai.ml import MLClient

        return MLClient(
            self._credential,
            subscription_id=self._settings.subscription_id,
            resource_group_name=self._settings.resource_group,
            workspace_name=self._settings.workspace_name,
            **self._client_kwargs,
        )

    def _call(self, fn: Callable[[], T], action: str, *, what: str | None = None, registry: bool = False) -> T:
        return self._caller.call(
            fn, action=action, scope=self._registry_scope if registry else self._ws_scope, what=what
        )

    def _registry_client(self) -> Any:
        """Built on first use: the constructor asks the registry discovery service where it lives."""
        with self._registry_lock:
            if self._registry is None:
                from azure.ai.ml import MLClient

                name = self._settings.registry_name
                self._registry = self._call(
                    lambda: MLClient(self._credential, registry_name=name, **self._client_kwargs),
                    f"connect to the registry {name}",
                    what=f"registry {name}",
                    registry=True,
                )
            return self._registry

    def _workspace(self) -> Any:
        with self._lock:
            cached = self._workspace_entity
        if cached is None:
            name = self._settings.workspace_name
            cached = self._call(
                lambda: self._ws.workspaces.get(name), f"read the workspace {name}", what=f"workspace {name}"
            )
            with self._lock:
                self._workspace_entity = cached
        return cached

    def _scoring_http(self) -> Any:
        with self._lock:
            if self._http is None:
                self._http = http_client(self._transport)
            return self._http

    def _mlflow_http(self) -> Any:
        with self._lock:
            if self._arm_http is None:
                self._arm_http = http_client(self._transport, credential=self._credential, scope=ARM_SCOPE)
            return self._arm_http

    # -- jobs -------------------------------------------------------------------------------------
    def _job_entity(self, job_name: str) -> Any:
        return self._call(not_found_is_none(lambda: self._ws.jobs.get(job_name)), f"read job {job_name}")

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
                _word(existing.status),
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
        raw = _word(job.status) or "NotStarted"
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
            if child is not None and job_state_from_run_status(_word(child.status)) == JobState.FAILED:
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
        raw = _word(job.status)
        if job_state_from_run_status(raw).terminal:
            return Operation(kind="cancel-job", target=job_name, status=raw, done=True)
        poller = self._call(lambda: self._ws.jobs.begin_cancel(job_name), f"cancel job {job_name}")
        return _operation("cancel-job", job_name, poller)

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

    # -- registry ---------------------------------------------------------------------------------
    def get_model(self, name: str, version: str) -> ModelRef | None:
        model = self._call(
            not_found_is_none(lambda: self._ws.models.get(name, version=version)), f"read model {name}:{version}"
        )
        return None if model is None else ModelRef(name=model.name, version=str(model.version), id=model.id)

    def _inference_allow_list_tag(self, base_model_id: str | None) -> str | None:
        """The base model's `inference_compute_allow_list` tag, read from the registry (best effort)."""
        match = re.fullmatch(r"azureml://registries/([^/]+)/models/([^/]+)/versions/([^/]+)", base_model_id or "")
        if not match or match.group(1) != self._settings.registry_name:
            return None
        _, name, version = match.groups()
        try:
            reg = self._registry_client()
            model = self._call(
                lambda: reg.models.get(name, version=version), f"read the base model {name}:{version}", registry=True
            )
        except TunegridError as exc:
            log.warning("inference allow list of %s unavailable: %s", base_model_id, exc)
            return None
        return (getattr(model, "tags", None) or {}).get(INFERENCE_ALLOW_LIST_TAG)

    def register_model(
        self, *, job_name: str, name: str, version: str, description: str, tags: Mapping[str, str]
    ) -> ModelRef:
        existing = self.get_model(name, version)
        if existing is not None:
            log.info("model %s:%s is already registered", name, version)
            return existing
        job = self._job_entity(job_name)
        if job is None:
            raise NotFound(f"job {job_name} not found: nothing to register")
        raw = _word(job.status)
        if job_state_from_run_status(raw) != JobState.COMPLETED:
            raise BackendError(
                f"job {job_name} is {raw}; only a completed job's {TRAINED_MODEL_OUTPUT} can be registered"
            )
        job_tags = dict(getattr(job, "tags", None) or {})
        model_tags: dict[str, str] = {OWNER_TAG: self._settings.instance, "tunegridjob": job_name}
        base_id = job_tags.get(BASE_MODEL_ID_TAG)
        if base_id:
            model_tags[BASE_MODEL_ID_TAG] = base_id
            allow = self._inference_allow_list_tag(base_id)
            if allow:
                model_tags[INFERENCE_ALLOW_LIST_TAG] = allow
        model_tags.update({str(k): str(v) for k, v in tags.items()})

        from azure.ai.ml.constants import AssetTypes
        from azure.ai.ml.entities import Model

        entity = Model(
            path=f"azureml://jobs/{job_name}/outputs/{TRAINED_MODEL_OUTPUT}",
            type=AssetTypes.MLFLOW_MODEL,
            name=name,
            version=version,
            description=description,
            tags=model_tags,
        )
        try:
            model = self._call(lambda: self._ws.models.create_or_update(entity), f"register model {name}:{version}")
        except ConflictError:
            again = self.get_model(name, version)
            if again is None:
                raise
            return again
        log.info("registered model %s:%s from job %s", name, version, job_name)
        return ModelRef(name=model.name, version=str(model.version), id=model.id)

    # -- endpoints and deployments ----------------------------------------------------------------
    @staticmethod
    def _check_name(kind: str, name: str) -> None:
        if not _ENDPOINT_NAME.fullmatch(name or ""):
            raise InvalidInput(
                f"{kind} name {name!r} is not valid in Azure: 3-32 characters, a letter first, letters, digits and hyphens, no trailing hyphen"
            )

    def _endpoint_entity(self, name: str) -> Any:
        return self._call(not_found_is_none(lambda: self._ws.online_endpoints.get(name)), f"read endpoint {name}")

    def _deployment_entity(self, endpoint: str, name: str) -> Any:
        return self._call(
            not_found_is_none(lambda: self._ws.online_deployments.get(name, endpoint)),
            f"read deployment {endpoint}/{name}",
        )

    def _deployment_info(self, endpoint: str, deployment: Any) -> DeploymentInfo:
        state = ProvisioningState.parse(_word(deployment.provisioning_state))
        error = None
        if state == ProvisioningState.FAILED:
            detail = _poller_error(self._deployment_pollers.get((endpoint, deployment.name)))
            error = f"deployment {deployment.name} of endpoint {endpoint} is in provisioning state Failed" + (
                f": {detail}"
                if detail
                else f" (container logs: `az ml online-deployment get-logs -e {endpoint} -n {deployment.name}`)"
            )
        return DeploymentInfo(
            endpoint=endpoint,
            name=deployment.name,
            provisioning_state=state,
            model_id=str(deployment.model) if deployment.model else None,
            created_at=_created_at(deployment),
            instance_type=getattr(deployment, "instance_type", None),
            error=error,
        )

    def _endpoint_info(self, endpoint: Any, deployments: list[Any]) -> EndpointInfo:
        return EndpointInfo(
            name=endpoint.name,
            provisioning_state=ProvisioningState.parse(_word(endpoint.provisioning_state)),
            tags=dict(endpoint.tags or {}),
            created_at=_created_at(endpoint),
            scoring_uri=getattr(endpoint, "scoring_uri", None),
            traffic={k: int(v) for k, v in (endpoint.traffic or {}).items()},
            mirror_traffic={k: int(v) for k, v in (getattr(endpoint, "mirror_traffic", None) or {}).items()},
            deployments=tuple(self._deployment_info(endpoint.name, d) for d in deployments),
        )

    def _deployments_of(self, endpoint: str) -> list[Any]:
        return self._call(
            lambda: list(self._ws.online_deployments.list(endpoint)), f"list the deployments of endpoint {endpoint}"
        )

    def list_endpoints(self) -> list[EndpointInfo]:
        endpoints = self._call(lambda: list(self._ws.online_endpoints.list()), "list online endpoints")
        return [self._endpoint_info(e, self._deployments_of(e.name)) for e in endpoints]

    def get_endpoint(self, name: str) -> EndpointInfo | None:
        endpoint = self._endpoint_entity(name)
        return None if endpoint is None else self._endpoint_info(endpoint, self._deployments_of(name))

    def get_deployment(self, endpoint: str, name: str) -> DeploymentInfo | None:
        deployment = self._deployment_entity(endpoint, name)
        return None if deployment is None else self._deployment_info(endpoint, deployment)

    def begin_create_endpoint(self, name: str, *, tags: Mapping[str, str], description: str = "") -> Operation:
        self._check_name("endpoint", name)
        existing = self._endpoint_entity(name)
        if existing is not None:
            state = ProvisioningState.parse(_word(existing.provisioning_state))
            return Operation(kind="create-endpoint", target=name, status=state.value, done=not state.in_progress)
        from azure.ai.ml.entities import ManagedOnlineEndpoint

        entity = ManagedOnlineEndpoint(
            name=name,
            auth_mode="key",
            description=description or f"Tunegrid endpoint ({self._settings.instance})",
            tags={OWNER_TAG: self._settings.instance, **{str(k): str(v) for k, v in tags.items()}},
        )
        poller = self._call(lambda: self._ws.online_endpoints.begin_create_or_update(entity), f"create endpoint {name}")
        return _operation("create-endpoint", name, poller)

    def _inference_allow_list(self, model: ModelRef) -> tuple[str, ...] | None:
        entity = self._call(
            lambda: self._ws.models.get(model.name, version=model.version),
            f"read model {model.name}:{model.version}",
            what=f"model {model.name}:{model.version} in workspace {self._settings.workspace_name}",
        )
        raw = (getattr(entity, "tags", None) or {}).get(INFERENCE_ALLOW_LIST_TAG)
        return parse_allow_list(f"{model.name}:{model.version}", INFERENCE_ALLOW_LIST_TAG, raw)

    def begin_create_deployment(self, spec: DeploymentSpec) -> Operation:
        self._check_name("deployment", spec.name)
        target = f"{spec.endpoint}/{spec.name}"
        existing = self._deployment_entity(spec.endpoint, spec.name)
        if existing is not None:
            state = ProvisioningState.parse(_word(existing.provisioning_state))
            return Operation(kind="create-deployment", target=target, status=state.value, done=not state.in_progress)
        allow = self._inference_allow_list(spec.model)
        if allow is None:
            log.info(
                "model %s:%s carries no inference allow list; %s is not checked",
                spec.model.name,
                spec.model.version,
                spec.instance_type,
            )
        elif not in_allow_list(spec.instance_type, allow):
            raise ComputeError(
                f"instance type {spec.instance_type} is not in the inference allow list of the base model: {', '.join(allow)}"
            )
        timeout_ms = spec.request_timeout_ms
        if timeout_ms > MAX_REQUEST_TIMEOUT_MS:
            log.warning("request_timeout_ms %d capped at %d (Azure's maximum)", timeout_ms, MAX_REQUEST_TIMEOUT_MS)
            timeout_ms = MAX_REQUEST_TIMEOUT_MS
        from azure.ai.ml.entities import ManagedOnlineDeployment, OnlineRequestSettings, ProbeSettings

        entity = ManagedOnlineDeployment(
            name=spec.name,
            endpoint_name=spec.endpoint,
            model=spec.model.id,
            instance_type=spec.instance_type,
            instance_count=spec.instance_count,
            liveness_probe=ProbeSettings(initial_delay=spec.liveness_initial_delay_s),
            request_settings=OnlineRequestSettings(
                request_timeout_ms=timeout_ms,
                max_concurrent_requests_per_instance=spec.max_concurrent_requests_per_instance,
            ),
            tags={OWNER_TAG: self._settings.instance, **{str(k): str(v) for k, v in spec.tags.items()}},
        )
        poller = self._call(
            lambda: self._ws.online_deployments.begin_create_or_update(entity), f"create deployment {target}"
        )
        with self._lock:
            if len(self._deployment_pollers) > 100:  # keep the failed ones' errors; forget finished successes
                for key in [k for k, p in self._deployment_pollers.items() if p.done() and _poller_error(p) is None]:
                    del self._deployment_pollers[key]
            self._deployment_pollers[(spec.endpoint, spec.name)] = poller
        return _operation("create-deployment", target, poller)

    @staticmethod
    def _check_traffic(traffic: Mapping[str, int], mirror: Mapping[str, int]) -> None:
        for what, shares in (("traffic", traffic), ("mirror traffic", mirror)):
            for name, share in shares.items():
                if isinstance(share, bool) or not isinstance(share, int) or not 0 <= share <= 100:
                    raise InvalidInput(f"{what} of {name} must be an integer percentage, got {share!r}")
        if sum(traffic.values()) not in (0, 100):
            raise InvalidInput(f"traffic must add up to 0 or 100 %, got {sum(traffic.values())} ({dict(traffic)})")
        if sum(mirror.values()) > 50:
            raise InvalidInput(f"mirror traffic may be at most 50 %, got {sum(mirror.values())}")
        both = sorted(n for n, share in mirror.items() if share and traffic.get(n))
        if both:
            raise InvalidInput(f"a deployment cannot take live and mirrored traffic at once: {', '.join(both)}")

    def begin_set_traffic(
        self, endpoint: str, traffic: Mapping[str, int], *, mirror_traffic: Mapping[str, int] | None = None
    ) -> Operation:
        current = self._endpoint_entity(endpoint)
        if current is None:
            raise NotFound(f"endpoint {endpoint} not found in workspace {self._settings.workspace_name}")
        live = {k: int(v) for k, v in traffic.items() if v}
        mirror = {
            k: int(v)
            for k, v in (mirror_traffic if mirror_traffic is not None else (current.mirror_traffic or {})).items()
            if v
        }
        self._check_traffic(live, mirror)
        known = set((current.traffic or {}).keys())
        unknown = sorted(n for n in {*live, *mirror} if n not in known)
        if unknown:
            raise NotFound(f"endpoint {endpoint} has no deployment named {', '.join(unknown)}")
        now_live = {k: int(v) for k, v in (current.traffic or {}).items() if v}
        now_mirror = {k: int(v) for k, v in (current.mirror_traffic or {}).items() if v}
        if now_live == live and now_mirror == mirror:
            return Operation(kind="set-traffic", target=endpoint, status="Succeeded", done=True)
        from azure.ai.ml.entities import ManagedOnlineEndpoint

        # A fresh entity, as in the notebook (`endpoint.traffic = {...}` then begin_create_or_update):
        # the one read back carries read-only properties (createdAt, ...) that must not be sent.
        entity = ManagedOnlineEndpoint(
            name=endpoint,
            auth_mode=current.auth_mode or "key",
            description=current.description,
            tags=dict(current.tags or {}),
            identity=current.identity,
            traffic=live,
            mirror_traffic=mirror,
        )
        poller = self._call(
            lambda: self._ws.online_endpoints.begin_create_or_update(entity), f"set the traffic of endpoint {endpoint}"
        )
        return _operation("set-traffic", endpoint, poller)

    def begin_delete_deployment(self, endpoint: str, name: str) -> Operation:
        target = f"{endpoint}/{name}"
        deployment = self._deployment_entity(endpoint, name)
        if deployment is None:
            return Operation(kind="delete-deployment", target=target, status="Deleted", done=True)
        if ProvisioningState.parse(_word(deployment.provisioning_state)) == ProvisioningState.DELETING:
            return Operation(kind="delete-deployment", target=target, status="Deleting", done=False)
        current = self._endpoint_entity(endpoint)
        share = int((current.traffic or {}).get(name, 0) or 0) if current is not None else 0
        mirrored = int((getattr(current, "mirror_traffic", None) or {}).get(name, 0) or 0) if current is not None else 0
        if share or mirrored:
            raise ConflictError(
                f"deployment {target} still takes {share} % live and {mirrored} % mirrored traffic; shift it away before deleting"
            )
        poller = self._call(
            lambda: self._ws.online_deployments.begin_delete(name=name, endpoint_name=endpoint),
            f"delete deployment {target}",
        )
        return _operation("delete-deployment", target, poller)

    def begin_delete_endpoint(self, name: str) -> Operation:
        endpoint = self._endpoint_entity(name)
        if endpoint is None:
            return Operation(kind="delete-endpoint", target=name, status="Deleted", done=True)
        if ProvisioningState.parse(_word(endpoint.provisioning_state)) == ProvisioningState.DELETING:
            return Operation(kind="delete-endpoint", target=name, status="Deleting", done=False)
        poller = self._call(lambda: self._ws.online_endpoints.begin_delete(name=name), f"delete endpoint {name}")
        with self._lock:
            self._credentials_cache.pop(name, None)
        return _operation("delete-endpoint", name, poller)

    # -- scoring ----------------------------------------------------------------------------------
    def get_credentials(self, endpoint: str) -> EndpointCredentials:
        entity = self._endpoint_entity(endpoint)
        if entity is None:
            raise NotFound(f"endpoint {endpoint} not found in workspace {self._settings.workspace_name}")
        if not getattr(entity, "scoring_uri", None):
            raise BackendError(
                f"endpoint {endpoint} has no scoring URI yet (provisioning state {_word(entity.provisioning_state)})"
            )
        keys = self._call(lambda: self._ws.online_endpoints.get_keys(endpoint), f"read the keys of endpoint {endpoint}")
        primary = getattr(keys, "primary_key", None) or getattr(keys, "secondary_key", None)
        if primary:
            return EndpointCredentials(scoring_uri=entity.scoring_uri, key=primary)
        token = getattr(keys, "access_token", None)
        if not token:
            raise BackendError(f"endpoint {endpoint} returned neither a key nor a token")
        return EndpointCredentials(
            scoring_uri=entity.scoring_uri,
            key=token,
            expires_at=parse_time(getattr(keys, "expiry_time_utc", None) or None),
        )

    def _cached_credentials(self, endpoint: str) -> EndpointCredentials:
        now = time.monotonic()
        with self._lock:
            hit = self._credentials_cache.get(endpoint)
        if hit is not None and hit[0] > now:
            return hit[1]
        creds = self.get_credentials(endpoint)
        ttl = float(self._settings.proxy_credential_ttl_s)
        if creds.expires_at is not None:
            ttl = min(ttl, (creds.expires_at - utcnow()).total_seconds() - 60)
        if ttl > 0:
            with self._lock:
                self._credentials_cache[endpoint] = (now + ttl, creds)
        return creds

    def invoke(
        self, endpoint: str, body: Mapping[str, Any], *, deployment: str | None = None, timeout_s: float = 90.0
    ) -> Any:
        """POST the body to the endpoint's scoring URI with its key; `deployment` targets one
        deployment by name (header `azureml-model-deployment`), bypassing the traffic split."""
        creds = self._cached_credentials(endpoint)
        headers = {
            **creds.headers(deployment=deployment),
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        request = HttpRequest("POST", creds.scoring_uri, json=dict(body), headers=headers)
        where = f"endpoint {endpoint}" + (f" deployment {deployment}" if deployment else "")
        try:
            response = self._scoring_http().send_request(
                request, connection_timeout=min(timeout_s, 30.0), read_timeout=timeout_s
            )
        except (ServiceRequestTimeoutError, ServiceResponseTimeoutError) as exc:
            raise UpstreamError(f"{where} did not answer within {timeout_s:.0f} s", timeout=True) from exc
        except (ServiceRequestError, ServiceResponseError) as exc:
            raise UpstreamError(f"could not reach {where}: {type(exc).__name__}") from exc
        status = response.status_code
        if status in (401, 403):
            with self._lock:
                self._credentials_cache.pop(endpoint, None)
            raise UpstreamError(
                f"{where} refused the key (HTTP {status}); the keys may have been regenerated", status=status
            )
        if status >= 400:
            text = response.text()[:300] if response.content else ""
            raise UpstreamError(f"{where} answered HTTP {status}: {text}", status=status)
        try:
            return response.json()
        except ValueError:
            return response.text()

    # -- usage ------------------------------------------------------------------------------------
    def _metrics_client(self) -> Any:
        if self._metrics_client_factory is not None:
            return self._metrics_client_factory()
        from azure.monitor.querymetrics import MetricsClient

        location = str(getattr(self._workspace(), "location", "") or "")
        if not location:
            raise MetricsUnavailable(f"the location of workspace {self._settings.workspace_name} is unknown")
        kwargs: dict[str, Any] = {"retry_total": 0}
        if self._transport is not None:
            kwargs["transport"] = self._transport
        return MetricsClient(f"https://{location}.metrics.monitor.azure.com", self._credential, **kwargs)

    def get_endpoint_activity(self, endpoint: str, *, since: datetime) -> EndpointActivity:
        s = self._settings
        resource_id = endpoint_resource_id(s.subscription_id, s.resource_group, s.workspace_name, endpoint)
        scope = Scope("Monitoring Reader", "online endpoint", resource_id, "read its request metrics")
        try:
            return self._caller.call(
                lambda: read_endpoint_activity(self._metrics_client, resource_id, since=since),
                action=f"read the requests of endpoint {endpoint}",
                scope=scope,
            )
        except MetricsUnavailable:
            raise
        except TunegridError as exc:
            raise MetricsUnavailable(str(exc)) from exc
