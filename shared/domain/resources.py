"""What a fine-tune backend's jobs, models, endpoints and deployments look like to the app.

Plain values exchanged through the `FineTuneBackend` port (`shared.ports`); both adapters (Azure ML
and the local kit's embedded backend) return them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


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
    instance_count: int | None = None


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
    location: str | None = None
    """The Azure region (None on the local backend): what the janitor prices an idle endpoint in."""


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


class FindingLevel(enum.StrEnum):
    ERROR = "error"
    """The job would fail or cost money for nothing: it is refused before anything is submitted."""
    WARNING = "warning"
    """Worth knowing (a deprecated model, a model with no SKU list); the job is still submitted."""


@dataclass(frozen=True)
class Finding:
    """One result of a backend's pre-submission checks (`FineTuneBackend.check_finetune`), shown in
    the validation report the user reads. `code` is stable (e.g. `model_retired`, `sku_not_allowed`)."""

    level: FindingLevel
    code: str
    message: str

    @property
    def is_error(self) -> bool:
        return self.level == FindingLevel.ERROR

    def to_dict(self) -> dict[str, str]:
        return {"level": self.level.value, "code": self.code, "message": self.message}
