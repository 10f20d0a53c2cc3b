"""Which models are live: the ledger's live runs, held in memory per process and re-read in the background."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from shared.domain.clock import parse_time
from shared.usecases.scoring.errors import ModelNotFound, NoLiveModel

if TYPE_CHECKING:
    from shared.domain.runs import RunRecord

log = logging.getLogger(__name__)

DEFAULT_ALIASES = frozenset({"", "default", "latest"})


@dataclass(frozen=True, slots=True)
class LiveModel:
    run_id: str
    model_name: str
    model_version: str
    endpoint: str
    deployment: str
    live_since: datetime
    capacity: int = 1
    """Calls the deployment serves at once: instance_count x max_concurrent_requests_per_instance."""

    @property
    def created(self) -> int:
        return int(self.live_since.timestamp())


@dataclass
class _ModelTable:
    live: list[LiveModel]
    index: dict[str, LiveModel]
    other: dict[str, str]
    loaded_at: float


def _live_since(record: RunRecord) -> datetime:
    for state, at in reversed(record.timeline):
        if state == "live":
            return parse_time(at) or record.updated_at
    return record.updated_at


def capacity_of(record: RunRecord, *, default_instances: int, default_concurrency: int) -> int:
    """The deployment's capacity from its spec: the run's sidecar overrides, else the settings the
    roll-out deployed it with (as `shared.usecases.rollout` builds the DeploymentSpec)."""
    overrides = (record.extra.get("sidecar") or {}).get("deployment") or {}
    instances = overrides.get("instance_count", default_instances)
    concurrency = overrides.get("max_concurrent_requests_per_instance", default_concurrency)
    try:
        return max(1, int(instances) * int(concurrency))
    except (TypeError, ValueError):
        return 1


def build_model_table(
    records: Iterable[RunRecord],
    *,
    loaded_at: float = 0.0,
    default_instances: int = 1,
    default_concurrency: int = 1,
) -> _ModelTable:
    live: list[LiveModel] = []
    other: dict[str, str] = {}
    for r in records:
        state = r.state.value if hasattr(r.state, "value") else str(r.state)
        if state == "live" and r.endpoint and r.model_name:
            capacity = capacity_of(r, default_instances=default_instances, default_concurrency=default_concurrency)
            live.append(
                LiveModel(r.run_id, r.model_name, r.model_version, r.endpoint, r.deployment, _live_since(r), capacity)
            )
        else:
            other.setdefault(r.run_id, state)
            if r.model_name:
                other.setdefault(r.model_name, state)
    live.sort(key=lambda m: m.live_since, reverse=True)
    index: dict[str, LiveModel] = {}
    for m in live:  # newest first: a model name maps to its newest live run
        index.setdefault(m.model_name, m)
        index.setdefault(f"{m.model_name}:{m.model_version}", m)
        index[m.run_id] = m
    return _ModelTable(live, index, other, loaded_at)


class LiveModels:
    """The live runs of the ledger, held in memory and re-read at most every `ttl_s` seconds.

    A stale table is served while a background task re-reads it, so no request ever waits on
    storage except the very first one of the process.
    """

    def __init__(
        self,
        list_runs: Callable[[], Iterable[RunRecord]],
        *,
        ttl_s: float = 5.0,
        default_instances: int = 1,
        default_concurrency: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._list_runs = list_runs
        self._defaults = {"default_instances": default_instances, "default_concurrency": default_concurrency}
        self._ttl = ttl_s
        self._clock = clock
        self._table: _ModelTable | None = None
        self._task: asyncio.Task[_ModelTable] | None = None

    async def _load(self) -> _ModelTable:
        try:
            records = await asyncio.to_thread(lambda: list(self._list_runs()))
        except Exception as exc:
            log.warning("cannot read the run ledger: %s", type(exc).__name__)
            if self._table is not None:  # keep serving the last good table, try again later
                self._table.loaded_at = self._clock()
                return self._table
            raise NoLiveModel("the run ledger cannot be read right now") from None
        self._table = build_model_table(records, loaded_at=self._clock(), **self._defaults)
        return self._table

    def _refresh(self) -> asyncio.Task[_ModelTable]:
        task = self._task
        loop = asyncio.get_running_loop()
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._task = loop.create_task(self._load())
            task.add_done_callback(_consume_exception)
        return task

    async def table(self, *, max_age_s: float | None = None) -> _ModelTable:
        table = self._table
        if table is None:
            return await self._refresh()
        age = self._clock() - table.loaded_at
        if max_age_s is not None and age > max_age_s:
            return await self._refresh()
        if age > self._ttl:
            self._refresh()
        return table

    def cached(self, selector: str | None) -> LiveModel | None:
        """Synchronous fast path of `resolve`: the answer from a fresh table, or None (then await resolve)."""
        table = self._table
        if table is None or self._clock() - table.loaded_at > self._ttl:
            return None
        if not selector or selector.lower() in DEFAULT_ALIASES:
            return table.live[0] if table.live else None
        return table.index.get(selector)

    async def resolve(self, selector: str | None) -> LiveModel:
        key = (selector or "").strip()
        table = await self.table()
        if key.lower() in DEFAULT_ALIASES:
            if not table.live:
                table = await self.table(max_age_s=1.0)
            if not table.live:
                raise NoLiveModel("no model is live yet: nothing to answer with")
            return table.live[0]
        model = table.index.get(key)
        if model is None:
            table = await self.table(max_age_s=1.0)  # it may have gone live a moment ago
            model = table.index.get(key)
        if model is None:
            state = table.other.get(key)
            why = f" (its run is {state})" if state else ""
            raise ModelNotFound(f"the model '{key}' does not exist or is not live{why}")
        return model

    async def listing(self) -> list[LiveModel]:
        return list((await self.table()).live)


def _consume_exception(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
