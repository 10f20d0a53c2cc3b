"""The `FineTuneBackend` port and its value types.

Both adapters (Azure ML and the embedded local backend) implement this Protocol. Use cases in
`shared/` only ever see this module, never an adapter. Nothing here blocks on a long-running
operation: `begin_*` methods start work and return an `Operation`; later calls poll state.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

OWNER_TAG = "tunegrid-owner"
"""Tag key on jobs, models and endpoints this app created. Its value is the app instance name."""
RUN_TAG = "tunegridrunid"
"""Dot-free job tag carrying our run id: Event Grid advanced filters cannot use keys with dots."""
DATASET_TAG = "tunegriddataset"
KEEP_TAG = "tunegrid-keep"


class JobState(enum.StrEnum):
    """Coarse job state; `JobStatus.raw_status` keeps the backend's own word."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELED)


_AZURE_RUN_STATUS = {
    "notstarted": JobState.PENDING,
    "starting": JobState.PENDING,
    "provisioning": JobState.PENDING,
    "preparing": JobState.PENDING,
    "queued": JobState.PENDING,
    "running": JobState.RUNNING,
    "finalizing": JobState.RUNNING,
    "cancelrequested": JobState.RUNNING,
    "notresponding": JobState.RUNNING,
    "paused": JobState.RUNNING,
    "completed": JobState.COMPLETED,
    "finished": JobState.COMPLETED,
    "failed": JobState.FAILED,
    "canceled": JobState.CANCELED,
    "cancelled": JobState.CANCELED,
}


def job_state_from_run_status(status: str | None) -> JobState:
    """Map an Azure ML run status (as in jobs and Event Grid `runStatus`) to our coarse state."""
    return _AZURE_RUN_STATUS.get((status or "").replace(" ", "").lower(), JobState.PENDING)


class ProvisioningState(enum.StrEnum):
    CREATING = "Creating"
    UPDATING = "Updating"
    DELETING = "Deleting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELED = "Canceled"

    @classmethod
    def parse(cls, value: str | None) -> ProvisioningState:
        for member in cls:
            if member.value.lower() == (value or "").lower():
                return member
        return cls.UPDATING  # unknown words mean "still busy": never act on a guess

    @property
    def in_progress(self) -> bool:
        return self in (ProvisioningState.CREATING, ProvisioningState.UPDATING, ProvisioningState.DELETING)


@dataclass(frozen=True)
class DataRef:
    """A prepared dataset file in our storage account (the prepared-data container)."""

    container: str
    blob: str
    url: str


@dataclass(frozen=True)
class FineTuneRequest:
    """Everything a backend needs to start one fine-tune.

    `params` are the user's explicit sidecar values (component input names); the backend merges its
    own defaults under them. `compute` holds the sidecar's compute section."""

    run_id: str
    job_name: str
    dataset: str
    train: DataRef
    test: DataRef
    validation: DataRef | None = None
    base_model: str | None = None
    base_model_label: str | None = None
    base_model_version: str | None = None
    local_model: str | None = None
    """The local backend's base model (HF id, path or a builtin name); Azure ignores it."""
    params: Mapping[str, Any] = field(default_factory=dict)
    compute: Mapping[str, Any] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobRef:
    name: str
    studio_url: str | None = None
    display_name: str | None = None
    base_model_id: str | None = None


@dataclass(frozen=True)
class JobStatus:
    name: str
    state: JobState
    raw_status: str
    error: str | None = None
    studio_url: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricPoint:
    step: int
    value: float


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    id: str


@dataclass(frozen=True)
class DeploymentSpec:
    endpoint: str
    name: str
    model: ModelRef
    instance_type: str
    instance_count: int = 1
    request_timeout_ms: int = 90_000
    liveness_initial_delay_s: int = 600
    max_concurrent_requests_per_instance: int = 1
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeploymentInfo:
    endpoint: str
    name: str
    provisioning_state: ProvisioningState
    model_id: str | None = None
    created_at: datetime | None = None
    instance_type: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class EndpointInfo:
    name: str
    provisioning_state: ProvisioningState
    tags: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    scoring_uri: str | None = None
    traffic: Mapping[str, int] = field(default_factory=dict)
    mirror_traffic: Mapping[str, int] = field(default_factory=dict)
    deployments: tuple[DeploymentInfo, ...] = ()


@dataclass(frozen=True)
class Operation:
    """A started long-running operation. `done` is True when the backend finished it synchronously."""

    kind: str
    target: str
    status: str = "InProgress"
    done: bool = False


@dataclass(frozen=True)
class EndpointCredentials:
    """How to call an endpoint. Never log or return `key`; `__repr__` hides it."""

    scoring_uri: str
    key: str = field(repr=False)
    auth_scheme: str = "Bearer"
    expires_at: datetime | None = None

    def headers(self, *, deployment: str | None = None) -> dict[str, str]:
        h = {"Authorization": f"{self.auth_scheme} {self.key}"}
        if deployment:
            h["azureml-model-deployment"] = deployment
        return h


@dataclass(frozen=True)
class EndpointActivity:
    """Requests seen by the endpoint itself since a point in time (all callers, not only our proxy)."""

    requests: int
    last_request_at: datetime | None
    source: str


@runtime_checkable
class FineTuneBackend(Protocol):
    """The port. Every method returns quickly; none waits on provisioning or training."""

    name: str

    # jobs
    def submit_finetune(self, request: FineTuneRequest) -> JobRef: ...
    def get_job(self, job_name: str) -> JobStatus | None: ...
    def cancel_job(self, job_name: str) -> Operation: ...
    def get_job_metrics(self, job_name: str) -> dict[str, list[MetricPoint]]: ...

    # registry
    def register_model(
        self, *, job_name: str, name: str, version: str, description: str, tags: Mapping[str, str]
    ) -> ModelRef: ...
    def get_model(self, name: str, version: str) -> ModelRef | None: ...

    # endpoints and deployments
    def list_endpoints(self) -> list[EndpointInfo]: ...
    def get_endpoint(self, name: str) -> EndpointInfo | None: ...
    def begin_create_endpoint(self, name: str, *, tags: Mapping[str, str], description: str = "") -> Operation: ...
    def begin_create_deployment(self, spec: DeploymentSpec) -> Operation: ...
    def get_deployment(self, endpoint: str, name: str) -> DeploymentInfo | None: ...
    def begin_set_traffic(
        self, endpoint: str, traffic: Mapping[str, int], *, mirror_traffic: Mapping[str, int] | None = None
    ) -> Operation: ...
    def begin_delete_deployment(self, endpoint: str, name: str) -> Operation: ...
    def begin_delete_endpoint(self, name: str) -> Operation: ...
    def get_credentials(self, endpoint: str) -> EndpointCredentials: ...
    def invoke(
        self, endpoint: str, body: Mapping[str, Any], *, deployment: str | None = None, timeout_s: float = 90.0
    ) -> Any: ...

    # usage, for the janitor
    def get_endpoint_activity(self, endpoint: str, *, since: datetime) -> EndpointActivity: ...


_NAME_BAD = re.compile(r"[^a-zA-Z0-9-]+")


def azure_resource_name(*parts: str, max_len: int = 32, suffix: str = "") -> str:
    """A name valid for Azure ML endpoints/deployments: 3-32 chars, starts with a letter,
    letters, digits and hyphens, no trailing hyphen. Deterministic for the same input."""
    base = _NAME_BAD.sub("-", "-".join(p for p in parts if p)).strip("-").lower()
    base = re.sub(r"-{2,}", "-", base)
    if not base or not base[0].isalpha():
        base = "tg-" + base
    room = max_len - (len(suffix) + 1 if suffix else 0)
    base = base[:room].rstrip("-")
    name = f"{base}-{suffix}" if suffix else base
    if len(name) < 3:
        name = (name + "-tg")[:max_len]
    return name


_MODEL_BAD = re.compile(r"[^a-zA-Z0-9_.-]+")


def azure_model_name(*parts: str, max_len: int = 255) -> str:
    """A registered model name: letters, digits, `-`, `_` and `.`, starting with a letter or digit."""
    base = _MODEL_BAD.sub("-", "-".join(p for p in parts if p)).strip("-_.")
    base = re.sub(r"-{2,}", "-", base)
    return (base or "tunegrid-model")[:max_len]
