"""The storage adapters translate azure-core errors into the app's own (use cases never see the SDK's)."""

from __future__ import annotations

import socket

import pytest
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient

from shared.adapters.storage import BlobStore
from shared.adapters.tables import TableRunLedger
from shared.domain.runs import new_record
from shared.errors import ConflictError, TransientError
from shared.settings import LEDGER_TABLE, TRAINING_CONTAINER
from tunegrid.azurite import azurite_connection_string


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def unreachable() -> str:
    """A storage connection string whose every endpoint refuses connections."""
    port = _closed_port()
    return azurite_connection_string("127.0.0.1", port, port, port)


def test_unreachable_blob_service_is_transient(unreachable: str) -> None:
    """A refused connection is a TransientError (the trigger re-raises it for a platform retry)."""
    service = BlobServiceClient.from_connection_string(unreachable, retry_total=0)
    blobs = BlobStore(service)
    with pytest.raises(TransientError, match="blob properties"):
        blobs.properties(TRAINING_CONTAINER, "x.jsonl")
    with pytest.raises(TransientError, match="reading blob"):
        list(blobs.chunks(TRAINING_CONTAINER, "x.jsonl"))


def test_unreachable_table_service_is_transient(unreachable: str) -> None:
    """The ledger's reads fail the same way."""
    tables = TableServiceClient.from_connection_string(unreachable, retry_total=0)
    ledger = TableRunLedger(tables.get_table_client(LEDGER_TABLE))
    with pytest.raises(TransientError, match="run ledger get"):
        ledger.get("r0")


@pytest.mark.azurite
def test_blob_changed_during_a_conditional_read_is_a_conflict(storage: object, unique: str) -> None:
    """Reading an old version by ETag after a re-upload is a ConflictError, not a raw SDK error."""
    blobs = BlobStore(storage.blobs)  # type: ignore[attr-defined]
    name = f"{unique}.jsonl"
    blobs.upload(TRAINING_CONTAINER, name, b"one\n")
    old = str(blobs.properties(TRAINING_CONTAINER, name)["etag"])
    blobs.upload(TRAINING_CONTAINER, name, b"two\n")
    with pytest.raises(ConflictError, match="changed concurrently"):
        list(blobs.chunks(TRAINING_CONTAINER, name, etag=old))


@pytest.mark.azurite
def test_stale_ledger_write_is_a_conflict(storage: object, unique: str) -> None:
    """A write with an old ETag loses with ConflictError."""
    ledger = TableRunLedger(storage.tables.get_table_client(LEDGER_TABLE))  # type: ignore[attr-defined]
    record, created = ledger.create(
        new_record(run_id=f"r{unique}", container=TRAINING_CONTAINER, blob="a.jsonl", blob_version="1", backend="fake")
    )
    assert created
    ledger.update(record, error="first")
    with pytest.raises(ConflictError):
        ledger.update(record, error="second")
