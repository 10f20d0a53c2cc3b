"""Hand-written fakes of our own ports, for unit tests of the use cases: the backend, and the ledger,
audit log and blob store in memory."""

from __future__ import annotations

import copy
import itertools
import json
import random
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from shared.domain.clock import utcnow
from shared.domain.costs import PriceQuote, ThroughputSample, TrainingPlan
from shared.domain.janitor_rules import Decision
from shared.domain.leases import DATASETS_PARTITION, ENDPOINTS_PARTITION, DatasetHead, EndpointLease, dataset_key
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
from shared.domain.runs import RunRecord, RunState, apply_transition
from shared.errors import BackendError, ConflictError, NotFound, TransientError, TunegridError, UpstreamError
from shared.ports import UpstreamReply
from shared.settings import CONTAINERS

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
    plan: TrainingPlan = field(
        default_factory=lambda: TrainingPlan(
            backend="fake",
            sku="Standard_NC24ads_A100_v4",
            region="eastus",
            gpus_per_node=1,
            epochs=3.0,
            inference_sku="Standard_NC24ads_A100_v4",
        )
    )
    """What `plan_training` answers (the cost estimate's input)."""
    metrics: dict[str, list[MetricPoint]] = field(
        default_factory=lambda: {
            "loss": [MetricPoint(1, 2.5), MetricPoint(2, 1.5)],
            "eval_loss": [MetricPoint(2, 1.7)],
        }
    )
    """What `get_job_metrics` answers for every job."""
    lock: threading.RLock = field(default_factory=threading.RLock)
    hooks: dict[str, Callable[..., None]] = field(default_factory=dict)
    """Per method: called with the call's arguments before it runs (outside the lock), to stall or fail one
    call from a test (a slow Azure call that outlives a lease; a refusal, as Azure refuses a quota or an
    instance type it does not offer, by raising `BackendError`)."""

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def _call(self, method: str, *args: Any) -> None:
        hook = self.hooks.get(method)
        if hook is not None:
            hook(*args)
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

    def plan_training(self, request: FineTuneRequest) -> TrainingPlan:
        self._call("plan_training", request.job_name)
        return self.plan

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
        """As both real backends: NotFound for an unknown job; a job already over is left as it is."""
        self._call("cancel_job", job_name)
        with self.lock:
            job = self.jobs.get(job_name)
            if job is None:
                raise NotFound(f"job {job_name} not found")
            if job.state.terminal:
                return Operation("cancel", job_name, job.raw_status, done=True)
            self.set_job(job_name, JobState.CANCELED, error="canceled by user")
        return Operation("cancel", job_name, "Succeeded", done=True)

    def get_job_metrics(self, job_name: str) -> dict[str, list[MetricPoint]]:
        self._call("get_job_metrics", job_name)
        return {k: list(v) for k, v in self.metrics.items()}

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


# ---- storage ports in memory -------------------------------------------------------------------
# They mirror `shared.adapters.tables.TableRunLedger`, `TableAuditLog` and
# `shared.adapters.storage.BlobStore` on Azurite; tests/test_storage_contract.py runs the same cases
# against both, so a use-case test on these fakes tests what the real adapters would do.

_etags = itertools.count(1)
"""One counter for every fake in the process, so no two writes anywhere share an ETag."""


def _next_etag(kind: str) -> str:
    n = next(_etags)
    return f"0x8DC{n:013X}" if kind == "blob" else f"W/\"memory'{n}'\""


class InMemoryLedger:
    """The `Ledger` port in memory. Rows are stored as the table entity (`RunRecord.to_entity`) and read
    back through `RunRecord.from_entity`, as the table adapter does; every write gets a new ETag and a
    write with a stale one raises `ConflictError`. Endpoint leases, dataset heads and rejections are rows of
    their own, as in the table. After `drop_table` (the table is gone) reads find nothing and the next write
    recreates it, as the adapter heals a missing table. Safe to share between threads."""

    def __init__(self, records: Iterable[RunRecord] = ()) -> None:
        self._lock = threading.RLock()
        self._rows: dict[str, tuple[dict[str, Any], str]] = {}
        self._others: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
        self._table = True
        self.transitions = 0
        """How many moves were written (for assertions; not part of the port)."""
        for record in records:
            self.create(record)

    def drop_table(self) -> None:
        """The table is gone, rows and all (an emulator restarted empty; test helper, not part of the port)."""
        with self._lock:
            self._rows.clear()
            self._others.clear()
            self._table = False

    def _heal(self) -> None:
        self._table = True

    def _read(self, run_id: str) -> RunRecord | None:
        row = self._rows.get(run_id) if self._table else None
        return None if row is None else RunRecord.from_entity(copy.deepcopy(row[0]), etag=row[1])

    def _replace(self, record: RunRecord) -> RunRecord:
        if not record.etag:  # azure-core refuses a conditional write without an ETag before sending it
            raise ValueError("IfNotModified must be specified with etag.")
        with self._lock:
            self._heal()
            row = self._rows.get(record.run_id)
            if row is None:
                raise NotFound(f"run {record.run_id} not found")
            if row[1] != record.etag:
                raise ConflictError(f"run {record.run_id} changed concurrently")
            etag = _next_etag("table")
            self._rows[record.run_id] = (record.to_entity(), etag)
        return replace(record, etag=etag)

    def create(self, record: RunRecord) -> tuple[RunRecord, bool]:
        """Insert the record; when it exists already return the stored one and False."""
        with self._lock:
            self._heal()
            if record.run_id in self._rows:
                existing = self._read(record.run_id)
                assert existing is not None
                return existing, False
            etag = _next_etag("table")
            self._rows[record.run_id] = (record.to_entity(), etag)
        return replace(record, etag=etag), True

    def get(self, run_id: str) -> RunRecord | None:
        from shared.adapters.tables import valid_key

        if not valid_key(run_id):
            return None
        with self._lock:
            return self._read(run_id)

    def transition(
        self, run: RunRecord | str, to: RunState, *, expect: Iterable[RunState] | None = None, **fields: Any
    ) -> RunRecord:
        current = run if isinstance(run, RunRecord) else self.get(run)
        if current is None:
            raise NotFound(f"run {run} not found")
        saved = self._replace(apply_transition(current, to, expect, fields))
        with self._lock:
            self.transitions += 1
        return saved

    def update(self, record: RunRecord, **fields: Any) -> RunRecord:
        """Change fields without moving state, conditional on the record's ETag."""
        return self._replace(replace(record, updated_at=utcnow(), **fields))

    def list(self) -> list[RunRecord]:
        """Newest first; ties in row-key order, as the table returns rows before the adapter sorts them."""
        with self._lock:
            out = [r for r in (self._read(run_id) for run_id in sorted(self._rows)) if r is not None]
        return sorted(out, key=lambda r: r.created_at, reverse=True)

    def find_by_job(self, job_name: str) -> RunRecord | None:
        with self._lock:
            for run_id in sorted(self._rows):
                if self._rows[run_id][0].get("job_name") == job_name:
                    return self._read(run_id)
        return None

    def find_by_dataset(self, container: str, blob: str) -> list[RunRecord]:
        """The runs of one dataset name, oldest first."""
        with self._lock:
            out = [
                r
                for run_id in sorted(self._rows)
                if self._rows[run_id][0].get("container") == container and self._rows[run_id][0].get("blob") == blob
                for r in [self._read(run_id)]
                if r is not None
            ]
        return sorted(out, key=lambda r: (r.created_at, r.run_id))

    def _get_other(self, partition: str, key: str) -> tuple[dict[str, Any], str] | None:
        from shared.adapters.tables import valid_key

        if not valid_key(key):
            return None
        with self._lock:
            row = self._others.get((partition, key)) if self._table else None
            return None if row is None else (copy.deepcopy(row[0]), row[1])

    def _put_other(self, partition: str, key: str, values: dict[str, Any], etag: str, what: str) -> str:
        with self._lock:
            self._heal()
            row = self._others.get((partition, key))
            if not etag and row is not None:
                raise ConflictError(f"{what} was taken concurrently")
            if etag and row is None:
                raise ConflictError(f"{what} is gone")
            if etag and row is not None and row[1] != etag:
                raise ConflictError(f"{what} changed concurrently")
            new = _next_etag("table")
            self._others[(partition, key)] = (copy.deepcopy(values), new)
            return new

    def get_endpoint_lease(self, endpoint: str) -> EndpointLease | None:
        row = self._get_other(ENDPOINTS_PARTITION, endpoint)
        if row is None:
            return None
        values, etag = row
        return EndpointLease(endpoint=endpoint, etag=etag, **values)

    def put_endpoint_lease(self, lease: EndpointLease) -> EndpointLease:
        values = {"holder": lease.holder, "token": lease.token, "expires_at": lease.expires_at}
        etag = self._put_other(
            ENDPOINTS_PARTITION, lease.endpoint, values, lease.etag, f"endpoint lease {lease.endpoint}"
        )
        return replace(lease, etag=etag)

    def get_dataset_head(self, container: str, blob: str) -> DatasetHead | None:
        row = self._get_other(DATASETS_PARTITION, dataset_key(container, blob))
        if row is None:
            return None
        values, etag = row
        return DatasetHead(container=container, blob=blob, etag=etag, **values)

    def put_dataset_head(self, head: DatasetHead) -> DatasetHead:
        values = {"run_id": head.run_id, "generation": head.generation}
        etag = self._put_other(
            DATASETS_PARTITION, head.key, values, head.etag, f"dataset head of {head.container}/{head.blob}"
        )
        return replace(head, etag=etag)

    def reject(self, source: str, subject: str, reason: str) -> None:
        from shared.adapters.tables import rejection_entity

        row = rejection_entity(source, subject, reason, at=utcnow())
        with self._lock:
            self._heal()
            self._others[(row["PartitionKey"], row["RowKey"])] = (row, _next_etag("table"))

    def rejections(self, *, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = [v for (p, _), (v, _) in self._others.items() if p == "rejected"] if self._table else []
        out = [{k: r[k] for k in ("source", "subject", "reason", "at")} for r in rows]
        return sorted(out, key=lambda r: r["at"], reverse=True)[:limit]


class InMemoryAuditLog:
    """The `AuditLog` port in memory: keeps the exact rows `TableAuditLog` writes (`audit_entity`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[dict[str, Any]] = []

    def write(self, decision: Decision, *, at: datetime, dry_run: bool, sweep_id: str) -> None:
        from shared.adapters.tables import audit_entity

        row = audit_entity(decision, at=at, dry_run=dry_run, sweep_id=sweep_id)
        with self._lock:
            self._rows.append(row)

    def rows(self) -> list[dict[str, Any]]:
        """The rows in row-key (time) order, as a table query returns one day's partition."""
        with self._lock:
            return sorted((dict(r) for r in self._rows), key=lambda r: (r["PartitionKey"], r["RowKey"]))


@dataclass(frozen=True)
class StoredBlob:
    data: bytes
    etag: str
    last_modified: datetime
    content_type: str
    metadata: Mapping[str, str]


def _storage_error(kind: type[TunegridError], status: int, code: str, message: str) -> TunegridError:
    """The domain error `BlobStore` raises for the storage service's answer (see
    `shared.adapters.storage_errors.translate`): same type, with the service's error code in the message."""
    return kind(f"in-memory blob store: {code} (HTTP {status}): {message}")


class InMemoryBlobs:
    """The `Blobs` port (and `BlobStore.list_names`) in memory. Raises what `BlobStore` raises:
    `ConflictError` (412 ConditionNotMet) when `chunks` is pinned to an ETag the blob no longer has, or
    when the blob changes mid-stream; `NotFound` (404 BlobNotFound) when it is gone; `ConflictError`
    (409 BlobAlreadyExists) for `upload(overwrite=False)` on an existing blob. One of the app's containers
    found missing (after `drop_container`) is created again, as `BlobStore` does: reads find nothing, an
    upload of bytes or a seekable file goes through, one from a one-shot iterator is a `TransientError`.
    Safe to share between threads."""

    def __init__(
        self,
        *,
        containers: Iterable[str] = CONTAINERS,
        heal: Iterable[str] = CONTAINERS,
        account_url: str = "https://inmemory.blob.core.windows.net",
        chunk_size: int = 4 * 1024 * 1024,
    ) -> None:
        """`containers`: those that exist (the app's, as `StorageClients.ensure_resources` creates them);
        `heal`: those it creates again when it finds them missing (`BlobStore`'s `heal`)."""
        self.account_url = account_url.rstrip("/")
        self.chunk_size = chunk_size
        self._lock = threading.Lock()
        self._containers = set(containers)
        self._heal = set(heal)
        self._blobs: dict[tuple[str, str], StoredBlob] = {}

    def create_container(self, container: str) -> None:
        with self._lock:
            self._containers.add(container)

    def drop_container(self, container: str) -> None:
        """The container is gone, blobs and all (an emulator restarted empty; test helper, not part of the port)."""
        with self._lock:
            self._containers.discard(container)
            for key in [k for k in self._blobs if k[0] == container]:
                del self._blobs[key]

    def _need_container(self, container: str) -> None:
        """ContainerNotFound, after creating the container again when it is one of ours (call under the lock)."""
        if container not in self._containers:
            if container in self._heal:
                self._containers.add(container)
            raise _storage_error(NotFound, 404, "ContainerNotFound", "The specified container does not exist.")

    def _healed_read(self, container: str) -> None:
        """A read that finds the container missing creates it when it is one of ours (as `BlobStore` does)."""
        with self._lock:
            if container not in self._containers and container in self._heal:
                self._containers.add(container)

    def url(self, container: str, name: str) -> str:
        return f"{self.account_url}/{container}/{urllib.parse.quote(name, safe='~/')}"

    def blob(self, container: str, name: str) -> StoredBlob | None:
        """The stored blob with its content type and metadata (for assertions; not part of the port)."""
        with self._lock:
            return self._blobs.get((container, name))

    def properties(self, container: str, name: str) -> dict[str, Any] | None:
        """`{"etag", "size", "last_modified"}` or None when the blob does not exist."""
        self._healed_read(container)
        found = self.blob(container, name)
        if found is None:
            return None
        return {"etag": found.etag, "size": len(found.data), "last_modified": found.last_modified}

    def chunks(self, container: str, name: str, *, etag: str | None = None) -> Iterator[bytes]:
        """Stream a blob in chunks; with `etag`, fail if the blob changed since (no mixed versions)."""
        with self._lock:
            self._need_container(container)
        found = self.blob(container, name)
        if etag and (found is None or found.etag != etag):
            raise _storage_error(
                ConflictError,
                412,
                "ConditionNotMet",
                "The condition specified using HTTP conditional header(s) is not met.",
            )
        if found is None:
            raise _storage_error(NotFound, 404, "BlobNotFound", "The specified blob does not exist.")
        for start in range(0, len(found.data), self.chunk_size):
            if start:  # the SDK pins every later range request to the first response's ETag
                now = self.blob(container, name)
                if now is None or now.etag != found.etag:
                    raise _storage_error(
                        ConflictError,
                        412,
                        "ConditionNotMet",
                        "The condition specified using HTTP conditional header(s) is not met.",
                    )
            yield found.data[start : start + self.chunk_size]

    def read_bytes(self, container: str, name: str, *, limit: int = 1024 * 1024) -> bytes | None:
        """A small blob's content (a sidecar), or None when absent. Refuses blobs over `limit` bytes."""
        self._healed_read(container)
        found = self.blob(container, name)
        if found is None:
            return None
        if len(found.data) > limit:
            raise ValueError(f"{container}/{name} is {len(found.data)} bytes, over the {limit}-byte limit")
        return found.data

    def upload(
        self,
        container: str,
        name: str,
        data: bytes | Iterable[bytes],
        *,
        content_type: str = "application/octet-stream",
        overwrite: bool = True,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        with self._lock:
            if container not in self._containers and container in self._heal:
                self._containers.add(container)
                if not isinstance(data, bytes | str) and not callable(getattr(data, "seek", None)):
                    raise TransientError(
                        f"blob upload: container {container} was missing and is created again; the data was a "
                        "one-shot stream, so the upload must be retried"
                    )
        content = _blob_content(data)
        with self._lock:
            self._need_container(container)
            if not overwrite and (container, name) in self._blobs:
                raise _storage_error(ConflictError, 409, "BlobAlreadyExists", "The specified blob already exists.")
            self._blobs[(container, name)] = StoredBlob(
                data=content,
                etag=_next_etag("blob"),
                last_modified=datetime.now(UTC).replace(microsecond=0),
                content_type=content_type,
                metadata=dict(metadata or {}),
            )
        return self.url(container, name)

    def list_names(self, container: str, *, prefix: str | None = None) -> list[str]:
        """Names in lexical order, as the List Blobs operation returns them."""
        self._healed_read(container)
        with self._lock:
            self._need_container(container)
            return sorted(n for c, n in self._blobs if c == container and n.startswith(prefix or ""))


def _blob_content(data: Any) -> bytes:
    """What the storage SDK's `upload_blob` accepts: bytes, str (UTF-8), a readable stream, or an
    iterator of bytes; a list, tuple, set or dict is refused with the SDK's TypeError."""
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, bytes):
        return data
    if hasattr(data, "read"):
        return bytes(data.read())
    if hasattr(data, "__iter__") and not isinstance(data, list | tuple | set | dict):
        return b"".join(data)
    raise TypeError(f"Unsupported data type: {type(data)}")


Answerer = Callable[[str, list[dict[str, Any]]], str]
"""A deployment's controlled answer: (deployment, conversation) -> text."""


@dataclass
class FakeUpstream:
    """The `Upstream` port's blocking call (the roll-out's smoke test and evaluation gate) over a `FakeBackend`:
    a deployment that is not ready answers 404, a mute one an empty text, one in `answerers` what its function
    says for the conversation, one in `unreachable` fails as a refused connection does (`UpstreamError`, what
    `EndpointCaller` raises), one in `statuses` answers that HTTP status; any other the backend's `answer`."""

    backend: FakeBackend
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    answerers: dict[str, Answerer] = field(default_factory=dict)
    unreachable: set[str] = field(default_factory=set)
    statuses: dict[str, int] = field(default_factory=dict)

    def post_json_blocking(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> UpstreamReply:
        doc = json.loads(body)
        with self.backend.lock:
            self.calls.append((endpoint, deployment, doc))
        self.backend._call("score", endpoint, deployment)
        if deployment in self.unreachable:
            raise UpstreamError(f"cannot connect to {endpoint}/{deployment}: Connection refused")
        if deployment in self.statuses:
            status = self.statuses[deployment]
            return UpstreamReply(status, json.dumps({"message": f"HTTP {status} from {deployment}"}).encode())
        with self.backend.lock:
            dep = self.backend.deployments.get((endpoint, deployment))
        if dep is None or dep.provisioning_state != ProvisioningState.SUCCEEDED:
            return UpstreamReply(404, json.dumps({"message": f"deployment {deployment} is not ready"}).encode())
        if deployment in self.backend.mute_deployments:
            text = ""
        elif deployment in self.answerers:
            text = self.answerers[deployment](deployment, doc["input_data"]["input_string"][0])
        else:
            text = self.backend.answer
        return UpstreamReply(200, json.dumps({"output": text}).encode(), content_type="application/json")

    def to(self, deployment: str) -> list[Any]:
        """The bodies sent to `deployment`, in order."""
        with self.backend.lock:
            return [body for _, name, body in self.calls if name == deployment]

    async def post_json(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> UpstreamReply:
        return self.post_json_blocking(endpoint, deployment, body, request_id=request_id, timeout_s=timeout_s)

    def open_stream(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the roll-out never streams")


@dataclass
class RecordingRunEvents:
    """The `RunEvents` port in memory: keeps what was published, in order; `failures` makes the next calls
    raise (an unreachable topic), one exception per call, as the Event Grid adapter raises them."""

    published: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0
    failures: list[Exception] = field(default_factory=list)
    enabled: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, events: Iterable[Mapping[str, Any]]) -> None:
        with self.lock:
            self.calls += 1
            if self.failures:
                raise self.failures.pop(0)
            self.published.extend(copy.deepcopy(dict(e)) for e in events)

    def states(self, run_id: str) -> list[str]:
        return [e["data"]["state"] for e in self.published if e["data"]["runId"] == run_id]


class InMemoryThroughputHistory:
    """The `ThroughputHistory` port in memory (`TableThroughputHistory` keeps one row per run and SKU)."""

    def __init__(self, samples: Iterable[ThroughputSample] = ()) -> None:
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, str], ThroughputSample] = {}
        for sample in samples:
            self.record(sample)

    def record(self, sample: ThroughputSample) -> None:
        with self._lock:
            self._rows[(sample.sku.lower(), sample.run_id)] = sample

    def recent(self, sku: str) -> list[ThroughputSample]:
        with self._lock:
            rows = [s for (k, _), s in self._rows.items() if k == sku.lower()]
        return sorted(rows, key=lambda s: s.at, reverse=True)


@dataclass
class FixedPrices:
    """The `PriceSource` port with fixed answers: (sku, region) -> USD per hour; anything else has no price."""

    prices: dict[tuple[str, str], float] = field(default_factory=dict)
    asked: list[tuple[str, str]] = field(default_factory=list)

    def hourly_price(self, sku: str, region: str) -> PriceQuote | None:
        self.asked.append((sku, region))
        value = self.prices.get((sku, region))
        if value is None:
            return None
        return PriceQuote(sku=sku, region=region, usd_per_hour=value, source="fixed test price", as_of="2026-01-01")
