"""Hand-written fakes of our own ports, for unit tests of the use cases."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from shared.domain.resources import (
    DeploymentInfo,
    DeploymentSpec,
    EndpointActivity,
    EndpointCredentials,
    EndpointInfo,
    Finding,
    FineTuneRequest,
    JobRef,
    JobState,
    JobStatus,
    MetricPoint,
    ModelRef,
    Operation,
    ProvisioningState,
)
from shared.errors import BackendError, TransientError
from shared.ports import UpstreamReply

_RAW = {
    JobState.PENDING: "NotStarted",
    JobState.RUNNING: "Running",
    JobState.COMPLETED: "Completed",
    JobState.FAILED: "Failed",
    JobState.CANCELED: "Canceled",
}


@dataclass
class FakeBackend:
    """An in-memory backend. Long operations complete on the *next* read (`settle_after` reads), so
    tests exercise the "started now, finished later" path. Optional fault injection per call."""

    name: str = "fake"
    fail_rate: float = 0.0
    seed: int = 7
    settle_after: int = 1
    answer: str = "Hello from the fine-tuned model."
    submissions: list[FineTuneRequest] = field(default_factory=list)
    jobs: dict[str, JobStatus] = field(default_factory=dict)
    models: dict[tuple[str, str], ModelRef] = field(default_factory=dict)
    endpoints: dict[str, EndpointInfo] = field(default_factory=dict)
    deployments: dict[tuple[str, str], DeploymentInfo] = field(default_factory=dict)
    pending: dict[tuple[str, ...], int] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    log: list[tuple[str, Any]] = field(default_factory=list)
    failing_deployments: set[str] = field(default_factory=set)
    """Deployments whose provisioning fails."""
    mute_deployments: set[str] = field(default_factory=set)
    """Deployments that provision but answer with empty text (a bad model)."""
    findings: list[Finding] = field(default_factory=list)
    """What `check_finetune` answers (errors make ingest refuse the run before submitting)."""
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def _call(self, method: str, *args: Any) -> None:
        with self.lock:
            self.calls[method] += 1
            self.log.append((method, args))
            if self.fail_rate and self._rng.random() < self.fail_rate:
                raise TransientError(f"injected transient failure in {method}")

    def _tick(self, key: tuple[str, ...]) -> bool:
        """True once an operation has been observed `settle_after` times."""
        left = self.pending.get(key)
        if left is None:
            return True
        if left <= 0:
            del self.pending[key]
            return True
        self.pending[key] = left - 1
        return False

    # jobs
    def check_finetune(self, request: FineTuneRequest) -> list[Finding]:
        self._call("check_finetune", request.job_name)
        return list(self.findings)

    def submit_finetune(self, request: FineTuneRequest) -> JobRef:
        self._call("submit_finetune", request.job_name)
        with self.lock:
            if request.job_name not in self.jobs:
                self.submissions.append(request)
                self.jobs[request.job_name] = JobStatus(
                    request.job_name, JobState.PENDING, "NotStarted", tags=dict(request.tags)
                )
        return JobRef(name=request.job_name, studio_url=f"https://ml.example/jobs/{request.job_name}")

    def set_job(self, job_name: str, state: JobState, *, error: str | None = None) -> None:
        with self.lock:
            old = self.jobs[job_name]
            self.jobs[job_name] = replace(old, state=state, raw_status=_RAW[state], error=error)

    def get_job(self, job_name: str) -> JobStatus | None:
        self._call("get_job", job_name)
        return self.jobs.get(job_name)

    def cancel_job(self, job_name: str) -> Operation:
        self._call("cancel_job", job_name)
        self.set_job(job_name, JobState.CANCELED, error="canceled by user")
        return Operation("cancel", job_name, "Succeeded", done=True)

    def get_job_metrics(self, job_name: str) -> dict[str, list[MetricPoint]]:
        self._call("get_job_metrics", job_name)
        return {"loss": [MetricPoint(1, 2.5), MetricPoint(2, 1.5)], "eval_loss": [MetricPoint(2, 1.7)]}

    # registry
    def register_model(
        self, *, job_name: str, name: str, version: str, description: str, tags: Mapping[str, str]
    ) -> ModelRef:
        self._call("register_model", name, version)
        with self.lock:
            return self.models.setdefault((name, version), ModelRef(name, version, f"azureml:{name}:{version}"))

    def get_model(self, name: str, version: str) -> ModelRef | None:
        self._call("get_model", name, version)
        return self.models.get((name, version))

    # endpoints
    def _endpoint_view(self, name: str) -> EndpointInfo | None:
        ep = self.endpoints.get(name)
        if ep is None:
            return None
        if ep.provisioning_state.in_progress and self._tick(("endpoint", name)):
            ep = replace(ep, provisioning_state=ProvisioningState.SUCCEEDED)
            self.endpoints[name] = ep
        deps = tuple(self._deployment_view(name, d) for (e, d) in list(self.deployments) if e == name)
        return replace(ep, deployments=tuple(d for d in deps if d is not None))

    def list_endpoints(self) -> list[EndpointInfo]:
        self._call("list_endpoints")
        with self.lock:
            return [e for e in (self._endpoint_view(n) for n in list(self.endpoints)) if e is not None]

    def get_endpoint(self, name: str) -> EndpointInfo | None:
        self._call("get_endpoint", name)
        with self.lock:
            return self._endpoint_view(name)

    def begin_create_endpoint(self, name: str, *, tags: Mapping[str, str], description: str = "") -> Operation:
        self._call("begin_create_endpoint", name)
        with self.lock:
            if name not in self.endpoints:
                self.endpoints[name] = EndpointInfo(
                    name,
                    ProvisioningState.CREATING,
                    tags=dict(tags),
                    created_at=datetime.now(UTC),
                    scoring_uri=f"http://fake/{name}/score",
                )
                self.pending[("endpoint", name)] = self.settle_after
        return Operation("create_endpoint", name)

    def begin_create_deployment(self, spec: DeploymentSpec) -> Operation:
        self._call("begin_create_deployment", spec.endpoint, spec.name)
        with self.lock:
            key = (spec.endpoint, spec.name)
            if key not in self.deployments:
                self.deployments[key] = DeploymentInfo(
                    spec.endpoint,
                    spec.name,
                    ProvisioningState.CREATING,
                    model_id=spec.model.id,
                    created_at=datetime.now(UTC),
                    instance_type=spec.instance_type,
                )
                self.pending[("deployment", *key)] = self.settle_after
                ep = self.endpoints[spec.endpoint]
                if spec.name not in ep.traffic:
                    self.endpoints[spec.endpoint] = replace(ep, traffic={**ep.traffic, spec.name: 0})
        return Operation("create_deployment", f"{spec.endpoint}/{spec.name}")

    def _deployment_view(self, endpoint: str, name: str) -> DeploymentInfo | None:
        dep = self.deployments.get((endpoint, name))
        if dep is None:
            return None
        if dep.provisioning_state == ProvisioningState.DELETING and self._tick(("delete-deployment", endpoint, name)):
            del self.deployments[(endpoint, name)]
            ep = self.endpoints.get(endpoint)
            if ep is not None:
                self.endpoints[endpoint] = replace(ep, traffic={k: v for k, v in ep.traffic.items() if k != name})
            return None
        if dep.provisioning_state == ProvisioningState.CREATING and self._tick(("deployment", endpoint, name)):
            state = ProvisioningState.FAILED if name in self.failing_deployments else ProvisioningState.SUCCEEDED
            dep = replace(
                dep,
                provisioning_state=state,
                error="image failed to start" if state == ProvisioningState.FAILED else None,
            )
            self.deployments[(endpoint, name)] = dep
        return dep

    def get_deployment(self, endpoint: str, name: str) -> DeploymentInfo | None:
        self._call("get_deployment", endpoint, name)
        with self.lock:
            return self._deployment_view(endpoint, name)

    def begin_set_traffic(
        self, endpoint: str, traffic: Mapping[str, int], *, mirror_traffic: Mapping[str, int] | None = None
    ) -> Operation:
        self._call("begin_set_traffic", endpoint, dict(traffic), dict(mirror_traffic or {}))
        total = sum(traffic.values())
        if total not in (0, 100):
            raise BackendError(f"traffic must sum to 0 or 100, got {total}")
        with self.lock:
            ep = self.endpoints[endpoint]
            self.endpoints[endpoint] = replace(
                ep,
                traffic=dict(traffic),
                mirror_traffic=dict(mirror_traffic or {}),
                provisioning_state=ProvisioningState.UPDATING,
            )
            self.pending[("endpoint", endpoint)] = self.settle_after
        return Operation("set_traffic", endpoint)

    def begin_delete_deployment(self, endpoint: str, name: str) -> Operation:
        self._call("begin_delete_deployment", endpoint, name)
        with self.lock:
            key = (endpoint, name)
            if key in self.deployments:
                if self.endpoints[endpoint].traffic.get(name, 0) > 0:
                    raise BackendError(f"deployment {name} still has traffic")
                self.deployments[key] = replace(self.deployments[key], provisioning_state=ProvisioningState.DELETING)
                self.pending[("delete-deployment", *key)] = self.settle_after
        return Operation("delete_deployment", f"{endpoint}/{name}")

    def begin_delete_endpoint(self, name: str) -> Operation:
        self._call("begin_delete_endpoint", name)
        with self.lock:
            self.endpoints.pop(name, None)
            for key in [k for k in self.deployments if k[0] == name]:
                del self.deployments[key]
        return Operation("delete_endpoint", name)

    def get_credentials(self, endpoint: str) -> EndpointCredentials:
        self._call("get_credentials", endpoint)
        return EndpointCredentials(scoring_uri=f"http://fake/{endpoint}/score", key="fake-endpoint-key")

    def get_endpoint_activity(self, endpoint: str, *, since: datetime) -> EndpointActivity:
        self._call("get_endpoint_activity", endpoint)
        return EndpointActivity(requests=0, last_request_at=None, source="fake")


@dataclass
class FakeUpstream:
    """The `Upstream` port's blocking call (the roll-out's smoke test) over a `FakeBackend`: a deployment
    that is not ready answers 404, a mute one an empty text, any other the backend's `answer`."""

    backend: FakeBackend
    calls: list[tuple[str, str, Any]] = field(default_factory=list)

    def post_json_blocking(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> UpstreamReply:
        self.calls.append((endpoint, deployment, json.loads(body)))
        self.backend._call("score", endpoint, deployment)
        with self.backend.lock:
            dep = self.backend.deployments.get((endpoint, deployment))
        if dep is None or dep.provisioning_state != ProvisioningState.SUCCEEDED:
            return UpstreamReply(404, json.dumps({"message": f"deployment {deployment} is not ready"}).encode())
        text = "" if deployment in self.backend.mute_deployments else self.backend.answer
        return UpstreamReply(200, json.dumps({"output": text}).encode(), content_type="application/json")

    async def post_json(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> UpstreamReply:
        return self.post_json_blocking(endpoint, deployment, body, request_id=request_id, timeout_s=timeout_s)

    def open_stream(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the roll-out never streams")
