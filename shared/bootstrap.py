"""The one place that knows concrete adapters: builds them from settings, once per process.

Function code calls `app_context()`; tests build an `AppContext` with fakes or call
`reset_app_context()` after changing the environment.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, cast

from shared.domain.clock import utcnow
from shared.errors import ConfigError
from shared.settings import AUDIT_TABLE, LEDGER_TABLE, USAGE_TABLE, Settings

if TYPE_CHECKING:
    from shared.adapters.storage import BlobStore, StorageClients
    from shared.domain.validation import TokenCounter
    from shared.ports import FineTuneBackend, LastProxyUse, Ledger
    from shared.usecases.janitor import SweepReport
    from shared.usecases.rollout import Rollout
    from shared.usecases.scoring import ScoringService

log = logging.getLogger(__name__)


BACKENDS: Mapping[str, str] = {
    "azureml": "shared.adapters.azureml:AzureMLBackend",
    # The embedded local backend lives in the local kit, which is never deployed: it is named here by
    # a dotted path, not imported, so the deployed package has no import edge to the kit.
    "local": "tunegrid.local:LocalBackend",
}


def build_backend(settings: Settings) -> FineTuneBackend:
    """The configured backend, imported on first use: an Azure deployment never imports torch."""
    module_name, _, attr = BACKENDS[settings.backend].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"FINETUNE_BACKEND={settings.backend} needs {module_name}, which this installation lacks ({exc.name})"
        ) from exc
    backend_class = getattr(module, attr)
    return cast("FineTuneBackend", backend_class.from_settings(settings))


def build_token_counter(name: str) -> TokenCounter:
    """Exact token counts for ingest (`VALIDATION_TOKENIZER`): the `tokenizers` adapter (Rust, no torch)."""
    from shared.adapters.tokenizer import TokenizersCounter

    return TokenizersCounter.load(name)


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
        from shared.adapters.storage import StorageClients

        clients = StorageClients.from_connection(self.settings.storage_connection)
        if self.settings.storage_connection.get(""):
            # A connection string means an emulator or a dev account: create what the app uses, as
            # `infra/` does in Azure (identity connections never get here).
            clients.ensure_resources()
        return clients

    @cached_property
    def blobs(self) -> BlobStore:
        from shared.adapters.storage import BlobStore

        return self._get("blobs", lambda: BlobStore(self.storage.blobs))

    @cached_property
    def ledger(self) -> Ledger:
        from shared.adapters.tables import TableRunLedger

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
            log.debug("settings loaded", extra={"backend": settings.backend})
            _context = AppContext(settings)
        return _context


def set_app_context(ctx: AppContext | None) -> None:
    """Install a context (tests, dev host) or clear it so the next call rebuilds from the environment."""
    global _context
    with _lock:
        _context = ctx


def reset_app_context() -> None:
    set_app_context(None)


# ---- use cases wired from a context -------------------------------------------------------------


def rollout_from_context(ctx: AppContext) -> Rollout:
    """The roll-out use case's ports from the process's `AppContext`."""
    from shared.usecases.rollout import Rollout

    return Rollout(
        ledger=ctx.ledger,
        backend=ctx.backend,
        blobs=ctx.blobs,
        settings=ctx.settings,
        token_counter=build_token_counter,
    )


def proxy_last_use_from_table(usage_table: Any) -> LastProxyUse:
    """The proxy's usage record (`shared.adapters.usage`) as the janitor's `LastProxyUse` port.

    Imported per call: should the module or its table be unusable, the error lands in the decision
    (`metrics-unavailable`, nothing deleted) instead of failing the whole sweep."""

    def last_use(endpoint: str) -> datetime | None:
        from shared.adapters.usage import read_last_used

        return read_last_used(usage_table, endpoint)

    return last_use


def sweep_from_context(
    ctx: AppContext,
    *,
    dry_run: bool | None = None,
    idle_minutes: float | None = None,
    grace_minutes: float | None = None,
    last_proxy_use: LastProxyUse | None = None,
    now: Callable[[], datetime] = utcnow,
) -> SweepReport:
    """Wire the sweep from the process's `AppContext` (timer trigger and CLI)."""
    from shared.adapters.tables import TableAuditLog
    from shared.domain.janitor_rules import JanitorPolicy
    from shared.usecases.janitor import sweep_idle_endpoints

    settings = ctx.settings
    policy = JanitorPolicy.from_settings(settings, idle_minutes=idle_minutes, grace_minutes=grace_minutes)
    return sweep_idle_endpoints(
        backend=ctx.backend,
        ledger=ctx.ledger,
        audit=TableAuditLog(ctx.audit_table),
        last_proxy_use=last_proxy_use or proxy_last_use_from_table(ctx.usage_table),
        policy=policy,
        dry_run=settings.janitor_dry_run if dry_run is None else dry_run,
        now=now,
    )


def build_scoring_service(ctx: AppContext, **overrides: Any) -> ScoringService:
    """Wire the scoring use case to this process's adapters: ledger, backend credentials, usage table."""
    from shared.adapters.endpoint_credentials import CredentialCache, EndpointCaller
    from shared.adapters.upstream import HttpPool
    from shared.adapters.usage import UsageRecorder
    from shared.usecases.scoring import LiveModels, ScoringService

    settings = ctx.settings
    credentials = CredentialCache(
        lambda endpoint: ctx.backend.get_credentials(endpoint), ttl_s=settings.proxy_credential_ttl_s
    )
    return ScoringService(
        settings=settings,
        models=overrides.pop("models", None) or LiveModels(lambda: ctx.ledger.list()),
        upstream=overrides.pop("upstream", None) or EndpointCaller(HttpPool(), credentials),
        usage=overrides.pop("usage", None) or UsageRecorder(lambda: ctx.usage_table),
        **overrides,
    )
