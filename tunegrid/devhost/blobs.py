"""Blob triggers: poll the containers named in each trigger's `path`, deliver every new or changed blob
(name + ETag) once.

The Functions host keeps blob receipts in its storage account so a restart does not redeliver; the dev
host keeps them in the `devhostreceipts` table of `AzureWebJobsStorage` (Azurite locally), keyed by
function + blob + ETag. A delivery that fails is retried with backoff `maxDequeueCount` times (host.json,
default 5), then parked in the `webjobsblobtriggerpoison` table with the error, as the host parks it
in the `webjobs-blobtrigger-poison` queue.

A blob whose name holds a character XML cannot carry (a control character) makes Azurite fail every
listing page that contains it (HTTP 500; Azure itself sends such names percent-encoded). The watcher
lists past it (`list_past_unlistable`) and parks the name's listable beginning in the poison table, so one
bad name never stops the ingest of the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import azure.functions as func
from azure.core.exceptions import HttpResponseError, ResourceModifiedError, ResourceNotFoundError

from shared.adapters.storage import StorageClients
from shared.errors import ConfigError
from shared.settings import storage_connection_values
from tunegrid.devhost.catalog import FunctionSpec
from tunegrid.devhost.invoker import Invoker, RetryPolicy

log = logging.getLogger("tunegrid.devhost")

RECEIPTS_TABLE = "devhostreceipts"
POISON_TABLE = "webjobsblobtriggerpoison"
HOST_STORAGE = "AzureWebJobsStorage"
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_-]*)\}")


@dataclass(frozen=True)
class BlobPath:
    """A trigger path `container/pattern`: the container, a listing prefix and a full-match regex."""

    container: str
    pattern: str
    prefix: str
    regex: re.Pattern[str]

    @classmethod
    def parse(cls, path: str) -> BlobPath:
        container, sep, pattern = path.strip("/").partition("/")
        if not sep or not container or "{" in container:
            raise ConfigError(f"blob trigger path {path!r} must look like container/pattern with a literal container")
        parts: list[str] = []
        pos = 0
        for match in _PARAM.finditer(pattern):
            parts.append(re.escape(pattern[pos : match.start()]))
            parts.append(f"(?P<{match.group(1).replace('-', '_')}>.+)")
            pos = match.end()
        parts.append(re.escape(pattern[pos:]))
        prefix = pattern.split("{", 1)[0]
        return cls(container=container, pattern=pattern, prefix=prefix, regex=re.compile("".join(parts), re.DOTALL))

    def matches(self, blob_name: str) -> bool:
        return self.regex.fullmatch(blob_name) is not None


@dataclass(frozen=True)
class BlobItem:
    container: str
    name: str
    etag: str
    size: int
    last_modified: dt.datetime | None
    content_type: str | None


def receipt_key(container: str, name: str, etag: str) -> str:
    return hashlib.sha256(f"{container}/{name}\n{etag}".encode()).hexdigest()


LIST_PAGE = 1000
UNLISTABLE = "unlistable"
_MARKER_CHARS = ((0x20, 0xD7FF), (0xE000, 0xFFFD))
"""What a listing marker may hold: characters XML can carry (Azurite echoes the marker in its answer) and a
URL can send: the BMP from the space on, without surrogates, U+FFFE and U+FFFF."""
_MARKER_SPAN = sum(high - low + 1 for low, high in _MARKER_CHARS)


def _marker_char(index: int) -> str:
    for low, high in _MARKER_CHARS:
        if index <= high - low:
            return chr(low + index)
        index -= high - low + 1
    raise IndexError(index)


def list_past_unlistable(
    container: Any, prefix: str | None, *, skips: dict[str, tuple[str, str]] | None = None, page_size: int = LIST_PAGE
) -> tuple[list[Any], list[str]]:
    """Every blob `container.list_blobs(name_starts_with=prefix)` would list, and the beginnings of the names it
    had to skip because the emulator cannot list them.

    Why: Azurite fails (HTTP 500) every page holding a name with a control character, and echoes markers and
    prefixes into its XML, so such a name can neither be listed nor named in a request. A page that fails is
    halved until the failure is pinned to the next name after the last good one; that name is then found
    character by character from which markers Azurite can list after (its markers are names, compared as
    strings), up to its first control character, and the listing resumes just past it. `skips` (last good
    name -> (skipped beginning, marker)) spares the search on later polls. Requests are not retried here
    (the SDK's default retries a 500 for over a minute); an error that is not a bad name propagates."""
    skips = {} if skips is None else skips
    items: list[Any] = []
    unlistable: list[str] = []
    marker: str | None = None
    size = page_size
    while True:
        pages = container.list_blobs(name_starts_with=prefix, results_per_page=size, retry_total=0).by_page(
            continuation_token=marker
        )
        try:
            page = list(next(pages, []))
        except HttpResponseError as exc:
            if exc.status_code != 500:
                raise
            if size > 1:
                size = max(1, size // 2)
                continue
            after = marker or ""
            if after not in skips:
                skips[after] = _find_unlistable(container, prefix or "", after, exc)
            skipped, marker = skips[after]
            unlistable.append(skipped)
            size = page_size
            continue
        items.extend(page)
        marker = pages.continuation_token
        if not marker:
            return items, unlistable
        size = min(page_size, size * 2)


def _find_unlistable(container: Any, prefix: str, after: str, error: HttpResponseError) -> tuple[str, str]:
    """(the listable beginning of the first name after `after`, a marker just past that name)."""

    def before_it(marker: str) -> bool:
        """True when `marker` sorts before the unlistable name (its page still fails, or lists a name <= after)."""
        pages = container.list_blobs(name_starts_with=prefix or None, results_per_page=1, retry_total=0)
        try:
            page = list(next(pages.by_page(continuation_token=marker), []))
        except HttpResponseError:
            return True
        return bool(page) and str(page[0].name) <= after

    if before_it(prefix + chr(0xFFFD) * 4):
        raise error  # every page fails: the service is down, not one name bad
    known = prefix
    for _ in range(1024):
        if not before_it(known + " "):
            return known, known + " "  # the next character sorts before a space: the control character
        low, high = 0, _MARKER_SPAN - 1  # the largest character c with known + c before the name is its next one
        while low < high:
            middle = (low + high + 1) // 2
            if before_it(known + _marker_char(middle)):
                low = middle
            else:
                high = middle - 1
        known += _marker_char(low)
    raise error


def _parameter_kind(spec: FunctionSpec) -> str:
    name = spec.annotation_name()
    tail = name.rsplit(".", 1)[-1]
    if tail in ("BlobClient", "ContainerClient", "StorageStreamDownloader"):
        return tail
    if name in ("builtins.bytes", "bytes"):
        return "bytes"
    if name in ("builtins.str", "str"):
        return "str"
    return "InputStream"


@dataclass
class _Watch:
    spec: FunctionSpec
    path: BlobPath
    clients: StorageClients
    kind: str


class BlobTriggerWatcher:
    """Polls the watched containers and delivers blobs to their functions."""

    def __init__(
        self,
        specs: Sequence[FunctionSpec],
        invoker: Invoker,
        *,
        env: Mapping[str, str],
        poll_interval_s: float,
        retry: RetryPolicy,
    ) -> None:
        self._invoker = invoker
        self._poll_interval_s = poll_interval_s
        self._retry = retry
        self._watches: list[_Watch] = []
        self._errors: dict[str, str] = {}
        clients_by_connection: dict[str, StorageClients] = {}
        for spec in specs:
            try:
                path = BlobPath.parse(str(spec.trigger.get("path", "")))
                connection = str(spec.trigger.get("connection") or HOST_STORAGE)
                if connection not in clients_by_connection:
                    values = storage_connection_values(env, connection)
                    if not values:
                        raise ConfigError(
                            f"connection {connection!r} has no app setting {connection} or {connection}__*"
                        )
                    clients_by_connection[connection] = StorageClients.from_connection(values)
                self._watches.append(_Watch(spec, path, clients_by_connection[connection], _parameter_kind(spec)))
            except ConfigError as exc:
                self._errors[spec.name] = str(exc)
        host_values = storage_connection_values(env, HOST_STORAGE)
        self._host: StorageClients | None = None
        if self._watches:
            self._host = StorageClients.from_connection(host_values) if host_values else self._watches[0].clients
        self._settled: set[tuple[str, str, str, str]] = set()
        self._pending: set[tuple[str, str, str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._missing_containers: set[str] = set()
        self._skips: dict[str, dict[str, tuple[str, str]]] = {}
        self._parked_unlistable: set[tuple[str, str]] = set()
        self.polls = 0
        """Complete polls so far: every watched container listed, a delivery started for each new match."""

    @property
    def errors(self) -> Mapping[str, str]:
        """Functions that cannot be watched, with the reason."""
        return self._errors

    @property
    def watched(self) -> list[str]:
        return [w.spec.name for w in self._watches]

    @property
    def deliveries_in_progress(self) -> int:
        """Deliveries started and not yet settled (with their retries). With `polls`, this lets a caller
        (a test) see that the watcher has looked again and found nothing new, without sleeping."""
        return len(self._pending)

    async def run(self, stopping: asyncio.Event) -> None:
        if not self._watches:
            return
        tables_ready = False
        while not stopping.is_set():
            if not tables_ready:
                try:
                    await asyncio.to_thread(self._ensure_tables)
                    tables_ready = True
                except Exception as exc:  # storage not up yet: keep trying, say it once
                    if "receipts" not in self._missing_containers:
                        self._missing_containers.add("receipts")
                        log.warning("cannot reach the host storage for blob receipts (will keep trying): %s", exc)
            if tables_ready:
                await self.poll_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self._poll_interval_s)

    def _ensure_tables(self) -> None:
        assert self._host is not None
        for table in (RECEIPTS_TABLE, POISON_TABLE):
            self._host.tables.create_table_if_not_exists(table)

    async def poll_once(self) -> None:
        """List each watched container once and start a delivery for every unsettled match."""
        by_container: dict[tuple[int, str], list[_Watch]] = {}
        for watch in self._watches:
            by_container.setdefault((id(watch.clients), watch.path.container), []).append(watch)
        listed_all = True
        for watches in by_container.values():
            try:
                items, unlistable = await asyncio.to_thread(self._list, watches)
            except Exception as exc:
                listed_all = False
                container = watches[0].path.container
                if container not in self._missing_containers:
                    self._missing_containers.add(container)
                    log.warning("cannot list container %s for blob triggers (will keep polling): %s", container, exc)
                continue
            self._missing_containers.discard(watches[0].path.container)
            for beginning in unlistable:
                await self._park_unlistable(watches, beginning)
            for item in items:
                for watch in watches:
                    key = (watch.spec.name, item.container, item.name, item.etag)
                    if key in self._settled or key in self._pending or not watch.path.matches(item.name):
                        continue
                    self._pending.add(key)
                    task = asyncio.create_task(self._deliver(watch, item, key))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        if listed_all:
            self.polls += 1

    def _list(self, watches: list[_Watch]) -> tuple[list[BlobItem], list[str]]:
        container = watches[0].path.container
        prefixes = {w.path.prefix for w in watches}
        prefix = min(prefixes, key=len) if all(p.startswith(min(prefixes, key=len)) for p in prefixes) else ""
        client = watches[0].clients.blobs.get_container_client(container)
        blobs, unlistable = list_past_unlistable(
            client, prefix or None, skips=self._skips.setdefault(f"{id(watches[0].clients)}/{container}", {})
        )
        items = [
            BlobItem(
                container=container,
                name=b.name,
                etag=str(b.etag).strip('"'),
                size=int(b.size or 0),
                last_modified=b.last_modified,
                content_type=b.content_settings.content_type if b.content_settings else None,
            )
            for b in blobs
        ]
        return items, unlistable

    async def _park_unlistable(self, watches: list[_Watch], beginning: str) -> None:
        """Record a name the emulator cannot list in the poison table, once per process (its full name is
        unknown: only its beginning, up to the character that breaks the listing, can be learnt)."""
        container = watches[0].path.container
        if (container, beginning) in self._parked_unlistable or self._host is None:
            return
        error = (
            f"a blob in {container} whose name starts with {beginning!r} and then holds a control character "
            "cannot be listed by the storage emulator; it is skipped (rename or delete it)"
        )
        log.error("blob trigger: %s", error)
        table = self._host.tables.get_table_client(POISON_TABLE)
        for watch in watches:
            if not (beginning.startswith(watch.path.prefix) or watch.path.prefix.startswith(beginning)):
                continue  # this function's trigger path cannot match the name
            entity = {
                "PartitionKey": watch.spec.name,
                "RowKey": receipt_key(container, beginning, UNLISTABLE),
                "Container": container,
                "BlobName": beginning,
                "ETag": "",
                "Status": "Unlistable",
                "Attempts": 0,
                "InvocationIds": "[]",
                "CompletedAt": dt.datetime.now(dt.UTC).isoformat(),
                "Error": error,
            }
            try:
                await asyncio.to_thread(self._upsert, table, entity)
            except Exception as exc:  # storage trouble: the next poll records it
                log.warning("could not record the unlistable blob in %s: %s", POISON_TABLE, exc)
                return
        self._parked_unlistable.add((container, beginning))

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for the deliveries in progress."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    async def _deliver(self, watch: _Watch, item: BlobItem, key: tuple[str, str, str, str]) -> None:
        spec = watch.spec
        row = receipt_key(item.container, item.name, item.etag)
        blob = f"{item.container}/{item.name}"
        fields = {"function": spec.name, "blob": blob, "etag": item.etag}
        try:
            if await asyncio.to_thread(self._has_receipt, spec.name, row):
                self._settled.add(key)
                return
            ids: list[str] = []
            error: BaseException | None = None
            for attempt in range(1, self._retry.tries + 1):
                invocation_id = str(uuid.uuid4())
                ids.append(invocation_id)
                try:
                    value = await asyncio.to_thread(self._trigger_value, watch, item)
                except (ResourceNotFoundError, ResourceModifiedError):
                    log.info(
                        "blob %s changed or went away before delivery to %s; skipped", blob, spec.name, extra=fields
                    )
                    self._settled.add(key)
                    return
                try:
                    await self._invoker.invoke(
                        spec,
                        value,
                        reason=f"New blob detected: {blob} (try {attempt} of {self._retry.tries})",
                        invocation_id=invocation_id,
                        retry_count=attempt - 1,
                        max_retry_count=self._retry.tries - 1,
                        extra=fields,
                    )
                except Exception as exc:
                    error = exc
                    if attempt < self._retry.tries:
                        await asyncio.sleep(self._retry.delay_after(attempt))
                    continue
                await self._record(spec.name, row, item, status="Delivered", ids=ids, error=None)
                self._settled.add(key)
                return
            await self._record(spec.name, row, item, status="Poisoned", ids=ids, error=error)
            self._settled.add(key)
            log.error(
                "blob %s failed %d times in %s; parked in table %s",
                blob,
                self._retry.tries,
                spec.name,
                POISON_TABLE,
                extra={**fields, "invocation_id": ids[-1]},
            )
        except Exception as exc:  # storage trouble: leave it unsettled, the next poll tries again
            log.warning("blob trigger bookkeeping failed for %s in %s: %s", blob, spec.name, exc, extra=fields)
        finally:
            self._pending.discard(key)

    def _has_receipt(self, function: str, row: str) -> bool:
        assert self._host is not None
        table = self._host.tables.get_table_client(RECEIPTS_TABLE)
        try:
            table.get_entity(partition_key=function, row_key=row)
        except ResourceNotFoundError:
            return False
        return True

    def _trigger_value(self, watch: _Watch, item: BlobItem) -> Any:
        service = watch.clients.blobs
        if watch.kind == "ContainerClient":
            return service.get_container_client(item.container)
        client = service.get_blob_client(item.container, item.name)
        if watch.kind == "BlobClient":
            return client
        if watch.kind == "StorageStreamDownloader":
            return client.download_blob()
        downloader = client.download_blob(etag=f'"{item.etag}"', match_condition=_if_not_modified())
        data = downloader.readall()
        if watch.kind == "bytes":
            return data
        if watch.kind == "str":
            return data.decode("utf-8")
        props = downloader.properties
        return func.blob.InputStream(
            data=data,
            name=f"{item.container}/{item.name}",
            uri=client.url,
            length=len(data),
            blob_properties={
                "ContentLength": props.size,
                "ContentType": props.content_settings.content_type if props.content_settings else None,
                "ETag": item.etag,
                "LastModified": props.last_modified.isoformat() if props.last_modified else None,
            },
            metadata=dict(props.metadata or {}),
        )

    async def _record(
        self,
        function: str,
        row: str,
        item: BlobItem,
        *,
        status: str,
        ids: list[str],
        error: BaseException | None,
    ) -> None:
        assert self._host is not None
        now = dt.datetime.now(dt.UTC).isoformat()
        entity = {
            "PartitionKey": function,
            "RowKey": row,
            "Container": item.container,
            "BlobName": item.name,
            "ETag": item.etag,
            "Status": status,
            "Attempts": len(ids),
            "InvocationIds": json.dumps(ids),
            "CompletedAt": now,
        }
        tables = self._host.tables
        if error is not None:
            poison = {**entity, "Error": f"{type(error).__name__}: {error}"[:30000]}
            await asyncio.to_thread(self._upsert, tables.get_table_client(POISON_TABLE), poison)
        await asyncio.to_thread(self._upsert, tables.get_table_client(RECEIPTS_TABLE), entity)

    def _upsert(self, table: Any, entity: dict[str, Any]) -> None:
        """Write a receipt or poison row; a table gone since start-up (the emulator restarted empty) is
        created again, so the delivery is settled instead of being redelivered at every poll."""
        try:
            table.upsert_entity(entity)
        except ResourceNotFoundError:
            self._ensure_tables()
            table.upsert_entity(entity)


def _if_not_modified() -> Any:
    from azure.core import MatchConditions

    return MatchConditions.IfNotModified
