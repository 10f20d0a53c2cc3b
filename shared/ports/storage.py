"""Storage ports: the run ledger and blob storage (Azure Tables and Blobs in `shared.adapters`)."""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from shared.domain.leases import DatasetHead, EndpointLease
from shared.domain.runs import RunRecord, RunState


class Ledger(Protocol):
    """The run records, and beside them in the same table the endpoint leases, the dataset heads and the
    rejected deliveries. Every write of a record, lease or head is conditional on the ETag it was read with;
    a lost race is `ConflictError`. A missing table is created on first use after any `NotFound`."""

    def create(self, record: RunRecord) -> tuple[RunRecord, bool]: ...
    def get(self, run_id: str) -> RunRecord | None: ...
    def transition(
        self, run: RunRecord | str, to: RunState, *, expect: Iterable[RunState] | None = None, **fields: Any
    ) -> RunRecord:
        """The one place a state change is written. Given a record (the holder of a lease, a claim), the move
        is conditional on that record's ETag: a stale holder gets `ConflictError`. Given a run id, the current
        record is read and the move is conditional on what was read (compare-and-set on the state)."""
        ...

    def update(self, record: RunRecord, **fields: Any) -> RunRecord: ...
    def list(self) -> list[RunRecord]: ...
    def find_by_job(self, job_name: str) -> RunRecord | None: ...
    def find_by_dataset(self, container: str, blob: str) -> builtins.list[RunRecord]: ...
    def get_endpoint_lease(self, endpoint: str) -> EndpointLease | None: ...
    def put_endpoint_lease(self, lease: EndpointLease) -> EndpointLease:
        """Insert (no ETag: `ConflictError` when one exists) or replace conditional on the lease's ETag."""
        ...

    def get_dataset_head(self, container: str, blob: str) -> DatasetHead | None: ...
    def put_dataset_head(self, head: DatasetHead) -> DatasetHead:
        """Insert (no ETag: `ConflictError` when one exists) or replace conditional on the head's ETag."""
        ...

    def reject(self, source: str, subject: str, reason: str) -> None:
        """Record a delivery that was acknowledged without acting on it (a bad event, a bad blob name)."""
        ...

    def rejections(self, *, limit: int = 100) -> builtins.list[dict[str, Any]]: ...


class RunLedgerPort(Protocol):
    """The part of the ledger the janitor uses."""

    def get(self, run_id: str) -> RunRecord | None: ...
    def list(self) -> list[RunRecord]: ...
    def transition(
        self, run: RunRecord | str, to: RunState, *, expect: Iterable[RunState] | None = None, **fields: Any
    ) -> RunRecord: ...


class Blobs(Protocol):
    """What the use cases need from blob storage (`shared.adapters.storage.BlobStore` implements it)."""

    def properties(self, container: str, name: str) -> dict[str, Any] | None: ...
    def chunks(self, container: str, name: str, *, etag: str | None = None) -> Iterator[bytes]: ...
    def read_bytes(self, container: str, name: str, *, limit: int = ...) -> bytes | None: ...
    def upload(
        self,
        container: str,
        name: str,
        data: bytes | Iterable[bytes],
        *,
        content_type: str = ...,
        overwrite: bool = ...,
        metadata: Mapping[str, str] | None = ...,
    ) -> str: ...
    def url(self, container: str, name: str) -> str: ...
