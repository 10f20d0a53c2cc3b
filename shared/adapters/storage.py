"""Storage clients for the data account, built from a Functions-style connection.

Locally the connection is an Azurite connection string; in Azure it is the identity form
(`DataStorage__blobServiceUri`, `__tableServiceUri`, `__queueServiceUri`, `__credential`,
`__clientId`). This is the only module that builds storage clients.

`BlobStore` recreates one of the app's containers on the first operation that finds it missing (an
emulator restarted empty, a container deleted by hand), in every process: reads then find nothing, and an
upload is sent again when its data can be read again (bytes, or a seekable file). An upload from a
one-shot iterator cannot be replayed: the container is created and the upload fails with
`TransientError`, so the caller's retry (the platform's, for a trigger) sends it again.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, TypeGuard

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient

from shared.adapters.storage_errors import storage_errors, translated
from shared.errors import ConfigError, TransientError
from shared.settings import CONTAINERS, TABLES

log = logging.getLogger(__name__)


def _credential(values: Mapping[str, str]) -> Any:
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if values.get("credential", "").lower() == "managedidentity":
        client_id = values.get("clientId")
        return ManagedIdentityCredential(client_id=client_id) if client_id else ManagedIdentityCredential()
    return DefaultAzureCredential(exclude_interactive_browser_credential=True)


@dataclass(frozen=True)
class StorageClients:
    blobs: BlobServiceClient
    tables: TableServiceClient

    @classmethod
    def from_connection(cls, values: Mapping[str, str]) -> StorageClients:
        conn = values.get("")
        if conn:
            return cls(
                blobs=BlobServiceClient.from_connection_string(conn),
                tables=TableServiceClient.from_connection_string(conn),
            )
        blob_uri = values.get("blobServiceUri") or values.get("serviceUri")
        table_uri = values.get("tableServiceUri")
        if not blob_uri or not table_uri:
            raise ConfigError(
                "storage connection needs a connection string or both __blobServiceUri and __tableServiceUri"
            )
        cred = _credential(values)
        return cls(
            blobs=BlobServiceClient(blob_uri, credential=cred), tables=TableServiceClient(table_uri, credential=cred)
        )

    @translated("create the app's containers and tables")
    def ensure_resources(self) -> None:
        """Create the containers and tables the app uses (idempotent; Azure infra declares them too)."""
        for container in CONTAINERS:
            try:
                self.blobs.create_container(container)
            except ResourceExistsError:
                pass
        for table in TABLES:
            self.tables.create_table_if_not_exists(table)


def _container_missing(exc: ResourceNotFoundError) -> bool:
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "") == "ContainerNotFound"


class BlobStore:
    """The blob operations the use cases need, over one `BlobServiceClient`."""

    CHUNK = 4 * 1024 * 1024

    def __init__(self, service: BlobServiceClient, *, heal: Collection[str] = CONTAINERS) -> None:
        """`heal`: the containers this store may create when it finds them missing (the app's own)."""
        self._service = service
        self._heal = frozenset(heal)

    def _healed(self, container: str, exc: ResourceNotFoundError) -> bool:
        """Create `container` when `exc` says it is missing and it is one of ours; True when it was."""
        if container not in self._heal or not _container_missing(exc):
            return False
        try:
            self._service.create_container(container)
        except ResourceExistsError as again:
            if "ContainerBeingDeleted" in str(getattr(again, "error_code", "") or again):
                # Azure keeps a deleted container's name for about 30 s: a retry later succeeds.
                raise TransientError(f"container {container} is being deleted; retry later") from again
            return True
        log.warning("container %s was missing: created it again", container)
        return True

    @translated("blob url")
    def url(self, container: str, name: str) -> str:
        return str(self._service.get_blob_client(container, name).url)

    @translated("blob properties")
    def properties(self, container: str, name: str) -> dict[str, Any] | None:
        """`{"etag", "size", "last_modified"}` or None when the blob does not exist."""
        try:
            props = self._service.get_blob_client(container, name).get_blob_properties()
        except ResourceNotFoundError as exc:
            self._healed(container, exc)
            return None
        return {"etag": props.etag.strip('"'), "size": props.size, "last_modified": props.last_modified}

    def chunks(self, container: str, name: str, *, etag: str | None = None) -> Iterator[bytes]:
        """Stream a blob in chunks; with `etag`, fail if the blob changed since (no mixed versions):
        `ConflictError` when it did, `TransientError` when the service or network failed."""
        from azure.core import MatchConditions

        with storage_errors(f"reading blob {container}/{name}"):
            client = self._service.get_blob_client(container, name)
            kwargs: dict[str, Any] = {"max_concurrency": 1}
            if etag:
                kwargs.update(etag=f'"{etag}"', match_condition=MatchConditions.IfNotModified)
            try:
                downloader = client.download_blob(**kwargs)
            except ResourceNotFoundError as exc:
                self._healed(container, exc)
                raise
            yield from downloader.chunks()

    @translated("blob read_bytes")
    def read_bytes(self, container: str, name: str, *, limit: int = 1024 * 1024) -> bytes | None:
        """A small blob's content (a sidecar), or None when absent. Refuses blobs over `limit` bytes."""
        client = self._service.get_blob_client(container, name)
        try:
            props = client.get_blob_properties()
            if props.size > limit:
                raise ValueError(f"{container}/{name} is {props.size} bytes, over the {limit}-byte limit")
            return bytes(client.download_blob().readall())
        except ResourceNotFoundError as exc:
            self._healed(container, exc)
            return None

    @translated("blob upload")
    def upload(
        self,
        container: str,
        name: str,
        data: bytes | Iterable[bytes] | IO[bytes],
        *,
        content_type: str = "application/octet-stream",
        overwrite: bool = True,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        from azure.storage.blob import ContentSettings

        client = self._service.get_blob_client(container, name)
        stream = data if _seekable(data) else None
        start = stream.tell() if stream is not None else None

        def send() -> None:
            client.upload_blob(
                data,
                overwrite=overwrite,
                content_settings=ContentSettings(content_type=content_type),
                metadata=dict(metadata or {}),
            )

        try:
            send()
        except ResourceNotFoundError as exc:
            if not self._healed(container, exc):
                raise
            if isinstance(data, bytes | str):
                send()
            elif stream is not None and start is not None:
                stream.seek(start)
                send()
            else:
                raise TransientError(
                    f"blob upload: container {container} was missing and is created again; the data was a "
                    "one-shot stream, so the upload must be retried"
                ) from exc
        return str(client.url)

    @translated("blob list_names")
    def list_names(self, container: str, *, prefix: str | None = None) -> list[str]:
        listing = self._service.get_container_client(container).list_blobs(name_starts_with=prefix)
        try:
            return [b.name for b in listing]
        except ResourceNotFoundError as exc:
            if not self._healed(container, exc):
                raise
            return []


def _seekable(data: object) -> TypeGuard[IO[bytes]]:
    return (
        callable(getattr(data, "seek", None))
        and callable(getattr(data, "tell", None))
        and bool(getattr(data, "seekable", lambda: True)())
    )
