"""Storage clients for the data account, built from a Functions-style connection.

Locally the connection is an Azurite connection string; in Azure it is the identity form
(`DataStorage__blobServiceUri`, `__tableServiceUri`, `__queueServiceUri`, `__credential`,
`__clientId`). This is the only module that builds storage clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import ResourceExistsError
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient

from shared.adapters.storage_errors import storage_errors, translated
from shared.errors import ConfigError
from shared.settings import CONTAINERS, TABLES


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

    def ensure_resources(self) -> None:
        """Create the containers and tables the app uses (idempotent; Azure infra declares them too)."""
        for container in CONTAINERS:
            try:
                self.blobs.create_container(container)
            except ResourceExistsError:
                pass
        for table in TABLES:
            self.tables.create_table_if_not_exists(table)


class BlobStore:
    """The blob operations the use cases need, over one `BlobServiceClient`."""

    CHUNK = 4 * 1024 * 1024

    def __init__(self, service: BlobServiceClient) -> None:
        self._service = service

    @translated("blob url")
    def url(self, container: str, name: str) -> str:
        return str(self._service.get_blob_client(container, name).url)

    @translated("blob properties")
    def properties(self, container: str, name: str) -> dict[str, Any] | None:
        """`{"etag", "size", "last_modified"}` or None when the blob does not exist."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            props = self._service.get_blob_client(container, name).get_blob_properties()
        except ResourceNotFoundError:
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
            downloader = client.download_blob(**kwargs)
            yield from downloader.chunks()

    @translated("blob read_bytes")
    def read_bytes(self, container: str, name: str, *, limit: int = 1024 * 1024) -> bytes | None:
        """A small blob's content (a sidecar), or None when absent. Refuses blobs over `limit` bytes."""
        from azure.core.exceptions import ResourceNotFoundError

        client = self._service.get_blob_client(container, name)
        try:
            props = client.get_blob_properties()
            if props.size > limit:
                raise ValueError(f"{container}/{name} is {props.size} bytes, over the {limit}-byte limit")
            return bytes(client.download_blob().readall())
        except ResourceNotFoundError:
            return None

    @translated("blob upload")
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
        from azure.storage.blob import ContentSettings

        client = self._service.get_blob_client(container, name)
        client.upload_blob(
            data,
            overwrite=overwrite,
            content_settings=ContentSettings(content_type=content_type),
            metadata=dict(metadata or {}),
        )
        return str(client.url)

    @translated("blob list_names")
    def list_names(self, container: str, *, prefix: str | None = None) -> list[str]:
        return [b.name for b in self._service.get_container_client(container).list_blobs(name_starts_with=prefix)]
