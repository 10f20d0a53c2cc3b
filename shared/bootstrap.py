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
from shared.settings import AUDIT_TABLE, COSTS_TABLE, LEDGER_TABLE, USAGE_TABLE, Settings

if TYPE_CHECKING:
    from shared.adapters.storage import BlobStore, StorageClients
    from shared.domain.costs import PriceQuote, ThroughputSample
    from shared.domain.validation import TokenCounter
    from shared.ports import FineTuneBackend, LastProxyUse, Ledger, RunEvents, Upstream
    from shared.usecases.estimate import CostPorts
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
        """The run ledger; with run events on, every state change is announced right after it is written."""
        return self._get("ledger", self._build_ledger)

    def _build_ledger(self) -> Ledger:
        from shared.adapters.tables import TableRunLedger
        from shared.usecases.run_events import NotifyingLedger

        table = TableRunLedger(self.storage.tables.get_table_client(LEDGER_TABLE))
        return NotifyingLedger(table, self.run_events) if self.run_events.enabled else table

    @cached_property
    def run_events(self) -> RunEvents:
        """Where run events go: the Event Grid topic of RUN_EVENTS_TOPIC_ENDPOINT, or nowhere when it is empty."""
        return self._get("run_events", self._build_run_events)

    def _build_run_events(self) -> RunEvents:
        if not self.settings.run_events_topic_endpoint:
            from shared.usecases.run_events import NO_RUN_EVENTS

            return NO_RUN_EVENTS
        from shared.adapters.run_events import EventGridRunEvents

        return EventGridRunEvents.from_settings(self.settings)

    @cached_property
    def audit_table(self) -> Any:
        return self._get("audit_table", lambda: self.storage.tables.get_table_client(AUDIT_TABLE))

    @cached_property
    def usage_table(self) -> Any:
        return self._get("usage_table", lambda: self.storage.tables.get_table_client(USAGE_TABLE))

    @cached_property
    def costs_table(self) -> Any:
        return self._get("costs_table", lambda: self.storage.tables.get_table_client(COSTS_TABLE))

    @cached_property
    def costs(self) -> CostPorts:
        """Prices (the Retail Prices API, cached in the costs table, else the repo's dated table) and the
        throughput history of earlier runs, for the estimate before submission and the janitor's savings."""
        return self._get("costs", self._build_costs)

    def _build_costs(self) -> CostPorts:
        from shared.adapters.cost_tables import TablePriceCache, TableThroughputHistory
        from shared.adapters.retail_prices import RetailPrices, RetailPricesApi
        from shared.usecases.estimate import CostPorts

        table = self.costs_table
        # The local backend has no bill: no price is ever asked for, so the API is not wired in.
        api = RetailPricesApi() if self.settings.backend == "azureml" else None
        return CostPorts(
            prices=RetailPrices(api=api, cache=TablePriceCache(table)), history=TableThroughputHistory(table)
        )

    @cached_property
    def backend(self) -> FineTuneBackend:
        return self._get("backend", lambda: build_backend(self.settings))

    @cached_property
    def upstream(self) -> Upstream:
        """The one way to call a scoring endpoint in this process (one HTTP client, one credential
        cache): the scoring proxy and the roll-out's smoke test share it."""
        return self._get("upstream", self._build_upstream)

    def _build_upstream(self) -> Upstream:
        from shared.adapters.endpoint_credentials import CredentialCache, EndpointCaller
        from shared.adapters.http_client import HttpClient

        credentials = CredentialCache(
            lambda endpoint: self.backend.get_credentials(endpoint), ttl_s=self.settings.proxy_credential_ttl_s
        )
        return EndpointCaller(HttpClient(), credentials)

    def close(self) -> None:
        """Stop what this context started on its own threads (the endpoint client's private loop)."""
        upstream = self.overrides.get("upstream")
        close_blocking = getattr(upstream, "close_blocking", None)
        if close_blocking is not None:
            close_blocking()
        close_events = getattr(self.overrides.get("run_events"), "close", None)
        if close_events is not None:
            close_events()


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
    """Install a context (tests, dev host) or clear it so the next call rebuilds from the environment;
    the context it replaces is closed."""
    global _context
    with _lock:
        old, _context = _context, ctx
    if old is not None and old is not ctx:
        old.close()


def reset_app_context() -> None:
    set_app_context(None)


# ---- use cases wired from a context -------------------------------------------------------------


def rollout_from_context(ctx: AppContext) -> Rollout:
    """The roll-out use case's ports from the process's `AppContext`."""
    from shared.usecases.rollout import Rollout

    costs = deferred_costs(ctx)  # the throughput history learns from each run; a resumed ingest estimates
    return Rollout(
        ledger=ctx.ledger,
        backend=ctx.backend,
        blobs=ctx.blobs,
        settings=ctx.settings,
        upstream=ctx.upstream,
        events=ctx.run_events,
        history=costs.history,
        costs=costs,
        token_counter=build_token_counter,
    )


class _DeferredCosts:
    """`PriceSource` and `ThroughputHistory` that build the context's cost ports on first use: a trigger that
    never asks for a price never opens the costs table, and a table that cannot be opened fails only the call
    that needed it (the estimate, the janitor and the roll-out each treat that as "no price" / "not recorded")."""

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def hourly_price(self, sku: str, region: str) -> PriceQuote | None:
        prices = self._ctx.costs.prices
        return prices.hourly_price(sku, region) if prices is not None else None

    def record(self, sample: ThroughputSample) -> None:
        history = self._ctx.costs.history
        if history is not None:
            history.record(sample)

    def recent(self, sku: str) -> list[ThroughputSample]:
        history = self._ctx.costs.history
        return history.recent(sku) if history is not None else []


def deferred_costs(ctx: AppContext) -> CostPorts:
    """The context's cost ports, built when first used (see `_DeferredCosts`)."""
    from shared.usecases.estimate import CostPorts

    deferred = _DeferredCosts(ctx)
    return CostPorts(prices=deferred, history=deferred)


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
        prices=deferred_costs(ctx).prices,
    )


def build_scoring_service(ctx: AppContext, **overrides: Any) -> ScoringService:
    """Wire the scoring use case to this process's adapters: ledger, the shared endpoint caller, usage table."""
    from shared.adapters.usage import UsageRecorder
    from shared.usecases.scoring import LiveModels, ScoringService

    settings = ctx.settings
    return ScoringService(
        settings=settings,
        models=overrides.pop("models", None)
        or LiveModels(
            lambda: ctx.ledger.list(),
            default_instances=settings.inference_instance_count,
            default_concurrency=settings.max_concurrent_requests_per_instance,
        ),
        upstream=overrides.pop("upstream", None) or ctx.upstream,
        usage=overrides.pop("usage", None) or UsageRecorder(lambda: ctx.usage_table),
        token_counter=overrides.pop("token_counter", None) or _lazy_token_counter(settings.validation_tokenizer),
        **overrides,
    )


def _lazy_token_counter(name: str) -> Callable[[], TokenCounter | None] | None:
    """The proxy's token counter, loaded on first use; a tokenizer that cannot be loaded is logged once
    and then not counted with (the answers still go out, with `stop` unless the upstream said more)."""
    if not name:
        return None
    loaded: list[TokenCounter | None] = []

    def counter() -> TokenCounter | None:
        if not loaded:
            try:
                loaded.append(build_token_counter(name))
            except ConfigError as exc:
                log.warning("the proxy counts no tokens: %s", exc)
                loaded.append(None)
        return loaded[0]

    return counter
