"""The backend's clients and state: the workspace `MLClient`, the registry client (built on first
use), the token credential, the shared transport, and the reads every part of the backend makes.

`AzureMLClients` is the base of the backend's mixins (`jobs`, `models`, `endpoints`, `scoring`,
`activity`): one constructor holds all the state, so each mixin only adds methods. Every SDK call
goes through `_call`, i.e. `ServiceCaller` (error translation and the one retry loop).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from enum import Enum
from typing import Any, TypeVar

from azure.core.credentials import TokenCredential
from azure.core.pipeline.transport import HttpTransport

from shared.adapters.azureml.observability import ARM_SCOPE, http_client
from shared.adapters.azureml.service_calls import Scope, ServiceCaller, not_found_is_none
from shared.domain.clock import utcnow
from shared.domain.resources import Operation
from shared.errors import ConfigError
from shared.settings import Settings

T = TypeVar("T")
log = logging.getLogger(__name__)


def build_credential(settings: Settings, *, env: Mapping[str, str] | None = None) -> TokenCredential:
    """Managed identity when running in Azure (or when a client id is configured), else the
    developer's credentials (az login, VS Code, environment), never an interactive browser."""
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    env = os.environ if env is None else env
    if env.get("IDENTITY_ENDPOINT") or env.get("MSI_ENDPOINT") or settings.client_id:
        return ManagedIdentityCredential(client_id=settings.client_id or None)
    return DefaultAzureCredential(exclude_interactive_browser_credential=True)


def service_word(value: Any) -> str:
    """An SDK enum or string as the service's word ('Succeeded', 'Failed', ...)."""
    if isinstance(value, Enum):
        value = value.value
    return str(value or "")


def operation_now(kind: str, target: str, poller: Any) -> Operation:
    """The poller's state now; reading it never waits."""
    status = service_word(poller.status()) or "InProgress"
    return Operation(kind=kind, target=target, status=status, done=bool(poller.done()))


class AzureMLClients:
    """The state the backend's parts share. Tests inject a transport (or clients) and a fake
    `TokenCredential`; nothing is sent until a method is called."""

    def __init__(
        self,
        settings: Settings,
        *,
        credential: TokenCredential,
        transport: HttpTransport | None = None,
        workspace_client: Any = None,
        registry_client: Any = None,
        caller: ServiceCaller | None = None,
        clock: Callable[[], datetime] = utcnow,
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
        self._clock = clock  # "now" for retirement dates and the metrics window; tests fix it
        self._client_kwargs: dict[str, Any] = {"enable_telemetry": False, "retry_total": 0, "user_agent": "tunegrid"}
        if transport is not None:
            self._client_kwargs["transport"] = transport
        self._ws = workspace_client if workspace_client is not None else self._workspace_client()
        self._registry = registry_client
        self._lock = threading.Lock()
        self._registry_lock = threading.Lock()
        self._workspace_entity: Any = None
        self._arm_client: Any = None
        self._alternatives_cache: dict[tuple[str, str], tuple[float, str]] = {}
        self._recent_plans: dict[str, tuple[float, Any]] = {}
        """job name -> (monotonic time, SubmissionPlan): `plan_training` reuses the plan `check_finetune` just made."""
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

    # -- clients ----------------------------------------------------------------------------------
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

    def _raw_model_version(self, name: str, version: str) -> dict[str, Any] | None:
        """A registry model version as the REST document. azure-ai-ml 1.35's `Model` entity has no
        `isArchived`, and keeps `system_metadata` only where the REST object has that attribute
        (the registry's objects do not), so the version is read once more through the model
        operations' own registry read (`models._get`, a private method: the only one returning the
        document). Another SDK without it leaves the entity's tags as the only source."""
        reg = self._registry_client()
        getter = getattr(reg.models, "_get", None)
        if getter is None:
            log.warning("this azure-ai-ml has no models._get: %s:%s is read from its tags only", name, version)
            return None
        raw = self._call(
            lambda: getter(name, str(version)),
            f"read the metadata of model {name}:{version} in registry {self._settings.registry_name}",
            what=f"model {name}:{version} in registry {self._settings.registry_name}",
            registry=True,
        )
        as_dict = getattr(raw, "as_dict", None)
        if callable(as_dict):
            return dict(as_dict())
        return dict(raw) if isinstance(raw, Mapping) else None

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

    def _arm_http(self) -> Any:
        """Plain HTTPS with an ARM token: the MLflow REST API and Azure Monitor's metrics API."""
        with self._lock:
            if self._arm_client is None:
                self._arm_client = http_client(self._transport, credential=self._credential, scope=ARM_SCOPE)
            return self._arm_client

    # -- reads shared by the parts (a 404 reads as None: check before acting) ---------------------
    def _job_entity(self, job_name: str) -> Any:
        return self._call(not_found_is_none(lambda: self._ws.jobs.get(job_name)), f"read job {job_name}")

    def _endpoint_entity(self, name: str) -> Any:
        return self._call(not_found_is_none(lambda: self._ws.online_endpoints.get(name)), f"read endpoint {name}")

    def _deployment_entity(self, endpoint: str, name: str) -> Any:
        return self._call(
            not_found_is_none(lambda: self._ws.online_deployments.get(name, endpoint)),
            f"read deployment {endpoint}/{name}",
        )
