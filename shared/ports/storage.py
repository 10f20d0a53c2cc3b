"""Storage ports: the run ledger and blob storage (Azure Tables and Blobs in `shared.adapters`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from shared.domain.runs import RunRecord, RunState


class Ledger(Protocol):
    def create(self, record: RunRecord) -> tuple[RunRecord, bool]: ...
    def get(self, run_id: str) -> RunRecord | None: ...
    def transition(
        self, run_id: str, to: RunState, *, expect: Iterable[RunState] | None = None, **fields: Any
    ) -> RunRecord: ...
    def update(self, record: RunRecord, **fields: Any) -> RunRecord: ...
    def list(self) -> list[RunRecord]: ...
    def find_by_job(self, job_name: str) -> RunRecord | None: ...


class RunLedgerPort(Protocol):
    """The part of the ledger the janitor uses."""

    def list(self) -> list[RunRecord]: ...
    def transition(
        self, run_id: str, to: RunState, *, expect: Iterable[RunState] | None = None, **fields: Any
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
