"""The one place that knows concrete adapters: builds them from settings, once per process.

Function code calls `app_context()`; tests build an `AppContext` with fakes or call
`reset_app_context()` after changing the environment.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from shared.settings import AUDIT_TABLE, LEDGER_TABLE, USAGE_TABLE, Settings

if TYPE_CHECKING:
    from shared.backends.base import FineTuneBackend
    from shared.ledger import Ledger
    from shared.storage import BlobStore, StorageClients

log = logging.getLogger(__name__)


def build_backend(settings: Settings) -> FineTuneBackend:
    """The configured backend. Imports are lazy: an Azure deployment never imports torch."""
    if settings.backend == "azureml":
        from shared.backends.azureml import AzureMLBackend

        return AzureMLBackend.from_settings(settings)
    from shared.backends.local import LocalBackend

    return LocalBackend.from_settings(settings)


@dataclass
class AppContext:
    """Per-process wiring. Attributes are built on first use, so a trigger only pays for what it needs."""

    settings: Settings
    overrides: dict[str, Any] = field(default_factory=dict)

    def _get(self, name: str, build: Any) -> Any:
        if name not in self.overrides:
            self.overrides[name] = build()
        return self.overrides[name]

    @cached_property
    def storage(self) -> StorageClients:
        return self._get("storage", self._build_storage)

    def _build_storage(self) -> StorageClients:
        from shared.storage import StorageClients

        clients = StorageClients.from_connection(self.settings.storage_connection)
        if self.settings.storage_connection.get(""):
            # A connection string means an emulator or a dev account: create what the app uses, as
            # `infra/` does in Azure (identity connections never get here).
            clients.ensure_resources()
        return clients

    @cached_property
    def blobs(self) -> BlobStore:
        from shared.storage import BlobStore

        return self._get("blobs", lambda: BlobStore(self.storage.blobs))

    @cached_property
    def ledger(self) -> Ledger:
        from shared.ledger import TableRunLedger

        return self._get("ledger", lambda: TableRunLedger(self.storage.tables.get_table_client(LEDGER_TABLE)))

    @cached_property
    def audit_table(self) -> Any:
        return self._get("audit_table", lambda: self.storage.tables.get_table_client(AUDIT_TABLE))

    @cached_property
    def usage_table(self) -> Any:
        return self._get("usage_table", lambda: self.storage.tables.get_table_client(USAGE_TABLE))

    @cached_property
    def backend(self) -> FineTuneBackend:
        return self._get("backend", lambda: build_backend(self.settings))


_lock = threading.Lock()
_context: AppContext | None = None


def app_context() -> AppContext:
    global _context
    with _lock:
        if _context is None:
            settings = Settings.from_env()
            log.info("settings loaded", extra={"backend": settings.backend})
            _context = AppContext(settings)
        return _context


def set_app_context(ctx: AppContext | None) -> None:
    """Install a context (tests, dev host) or clear it so the next call rebuilds from the environment."""
    global _context
    with _lock:
        _context = ctx


def reset_app_context() -> None:
    set_app_context(None)
