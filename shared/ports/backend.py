"""The `FineTuneBackend` port: what the use cases ask of a fine-tune backend.

Both adapters (Azure ML in `shared.adapters.azureml`, the embedded local backend in the local kit)
implement it. Nothing here blocks on a long-running operation: `begin_*` methods start work and
return an `Operation`; later calls poll state.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Protocol, runtime_checkable

from shared.domain.costs import TrainingPlan
from shared.domain.resources import (
    DeploymentInfo,
    DeploymentSpec,
    EndpointActivity,
    EndpointCredentials,
    EndpointInfo,
    Finding,
    FineTuneRequest,
    JobRef,
    JobStatus,
    MetricPoint,
    ModelRef,
    Operation,
)


@runtime_checkable
class FineTuneBackend(Protocol):
    """The port. Every method returns quickly; none waits on provisioning or training."""

    name: str

    # jobs
    def check_finetune(self, request: FineTuneRequest) -> list[Finding]:
        """What would stop (errors) or should worry (warnings) a submission of `request`: a retired
        base model, a SKU off the model's list, a choice the component does not offer. Reads only;
        `submit_finetune` refuses the same errors itself."""
        ...

    def plan_training(self, request: FineTuneRequest) -> TrainingPlan:
        """Where and how long `request` would train (the SKU, its region, nodes, epochs, batch), for the cost
        estimate made before submitting. Reads only."""
        ...

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
    def get_credentials(self, endpoint: str) -> EndpointCredentials:
        """Scoring URI and key. Endpoints are called only through the `Upstream` port, which caches these."""
        ...

    # usage, for the janitor
    def get_endpoint_activity(self, endpoint: str, *, since: datetime) -> EndpointActivity: ...


class EndpointPort(Protocol):
    """The part of `FineTuneBackend` the janitor uses."""

    def list_endpoints(self) -> list[EndpointInfo]: ...
    def get_endpoint(self, name: str) -> EndpointInfo | None: ...
    def get_endpoint_activity(self, endpoint: str, *, since: datetime) -> EndpointActivity: ...
    def begin_delete_endpoint(self, name: str) -> Operation: ...
    def begin_delete_deployment(self, endpoint: str, name: str) -> Operation: ...
