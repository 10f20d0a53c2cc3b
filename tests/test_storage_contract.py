"""One contract for the storage ports, run against the in-memory fakes (tests/fakes.py) and the real
adapters on Azurite: what the use-case tests on the fakes assume is what the real adapters do."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared.domain.janitor_rules import Decision, Rule
from shared.domain.runs import RunRecord, RunState, new_record, without_events
from shared.errors import ConflictError, NotFound
from tests.fakes import InMemoryAuditLog, InMemoryBlobs, InMemoryLedger

IMPLEMENTATIONS = ["memory", pytest.param("azurite", marks=pytest.mark.azurite)]
T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


# ---- fixtures: one port, two implementations ----------------------------------------------------


@pytest.fixture(params=IMPLEMENTATIONS)
def ledger(request: pytest.FixtureRequest, unique: str) -> Iterator[Any]:
    """A fresh, empty ledger: in memory, or `TableRunLedger` over its own Azurite table."""
    if request.param == "memory":
        yield InMemoryLedger()
        return
    from shared.adapters.tables import TableRunLedger

    tables = request.getfixturevalue("storage").tables
    table = tables.create_table(f"contract{unique}")
    yield TableRunLedger(table)
    tables.delete_table(table.table_name)


BlobsFactory = Callable[..., Any]


@pytest.fixture(params=IMPLEMENTATIONS)
def make_blobs(request: pytest.FixtureRequest, unique: str) -> Iterator[tuple[BlobsFactory, str]]:
    """(factory, container): `factory(chunk_size=None)` gives a blob store over a fresh container;
    a small `chunk_size` makes a stream take several range reads (the SDK's `max_chunk_get_size`)."""
    container = f"contract-{unique}"
    if request.param == "memory":
        yield (
            lambda chunk_size=None: InMemoryBlobs(containers=[container], chunk_size=chunk_size or 4 * 1024 * 1024),
            container,
        )
        return
    from azure.storage.blob import BlobServiceClient

    from shared.adapters.storage import BlobStore

    conn = request.getfixturevalue("storage_conn")
    service = BlobServiceClient.from_connection_string(conn)
    service.create_container(container)

    def factory(chunk_size: int | None = None) -> BlobStore:
        if chunk_size is None:
            return BlobStore(service)
        small = BlobServiceClient.from_connection_string(
            conn, max_single_get_size=chunk_size, max_chunk_get_size=chunk_size
        )
        return BlobStore(small)

    yield factory, container
    service.delete_container(container)


@pytest.fixture
def blobs(make_blobs: tuple[BlobsFactory, str]) -> tuple[Any, str]:
    factory, container = make_blobs
    return factory(), container


@pytest.fixture(params=IMPLEMENTATIONS)
def audit(request: pytest.FixtureRequest, unique: str) -> Iterator[tuple[Any, Callable[[], list[dict[str, Any]]]]]:
    """(audit log, read its rows in row-key order)."""
    if request.param == "memory":
        log = InMemoryAuditLog()
        yield log, log.rows
        return
    from shared.adapters.tables import TableAuditLog

    tables = request.getfixturevalue("storage").tables
    table = tables.create_table(f"contractaudit{unique}")
    yield TableAuditLog(table), lambda: sorted((dict(e) for e in table.list_entities()), key=lambda e: e["RowKey"])
    tables.delete_table(table.table_name)


def status(error: Exception) -> tuple[int | None, str | None]:
    """The HTTP status and storage error code a translated storage error names in its message."""
    found = re.search(r": (\w+) \(HTTP (\d+)\)", str(error))
    return (int(found.group(2)), found.group(1)) if found else (None, None)


def record(run_id: str = "r1", **fields: Any) -> RunRecord:
    base = new_record(run_id=run_id, container="training-data", blob=f"{run_id}.jsonl", blob_version="v1", backend="x")
    return replace(base, **fields)


# ---- the ledger ---------------------------------------------------------------------------------


def test_create_then_get_round_trips_every_field(ledger: Any) -> None:
    """What was created is what is read back, JSON fields and microseconds included, with the same ETag."""
    rec = record(
        created_at=T0,
        updated_at=T0,
        params={"learning_rate": 0.0002, "nested": [1, {"b": None}]},
        extra={"split": {"train_rows": 9}},
        smoke={"passed": True},
        job_name="job-1",
    )
    created, fresh = ledger.create(rec)
    assert fresh is True and created == rec and created.etag
    got = ledger.get("r1")
    assert got == rec and got.etag == created.etag
    assert got.created_at == T0 and got.created_at.utcoffset() == timedelta(0)
    assert ledger.get("r-missing") is None


def test_create_of_an_existing_run_returns_the_stored_record(ledger: Any) -> None:
    """A second create (a repeated delivery) changes nothing and returns what is stored, with its ETag."""
    first, _ = ledger.create(record(error="first"))
    again, fresh = ledger.create(record(error="second"))
    assert fresh is False
    assert again.error == "first" and again.etag == first.etag
    assert ledger.get("r1").error == "first"


def test_update_is_conditional_on_the_etag(ledger: Any) -> None:
    """Every write gives a new ETag; a write with a stale one is a ConflictError and changes nothing."""
    created, _ = ledger.create(record())
    updated = ledger.update(created, claimed_at="now")
    assert updated.etag and updated.etag != created.etag and updated.claimed_at == "now"
    assert updated.updated_at >= created.updated_at
    assert ledger.get("r1").etag == updated.etag
    with pytest.raises(ConflictError):
        ledger.update(created, claimed_at="stale")
    assert ledger.get("r1").claimed_at == "now"
    again = ledger.update(updated, claimed_at="")
    assert again.etag not in (created.etag, updated.etag)


def test_update_without_an_etag_or_of_a_missing_run(ledger: Any) -> None:
    """A record that was never read has no ETag (refused before any write); a vanished run is NotFound."""
    created, _ = ledger.create(record())
    with pytest.raises(ValueError, match="etag"):
        ledger.update(record(), error="x")
    with pytest.raises(NotFound):
        ledger.update(replace(created, run_id="r-gone"), error="x")


def test_transition_follows_the_domain_rules(ledger: Any) -> None:
    """Legal moves append to the timeline with a new ETag; `expect` and illegal moves are ConflictErrors."""
    created, _ = ledger.create(record())
    moved = ledger.transition("r1", RunState.VALIDATING, expect=[RunState.RECEIVED], claimed_at="c")
    assert moved.state is RunState.VALIDATING and moved.claimed_at == "c" and moved.etag != created.etag
    assert [s for s, _ in moved.timeline] == ["received", "validating"]
    assert ledger.get("r1") == moved
    with pytest.raises(ConflictError, match="expected one of"):
        ledger.transition("r1", RunState.SUBMITTING, expect=[RunState.RECEIVED])
    with pytest.raises(ConflictError, match="illegal move"):
        ledger.transition("r1", RunState.LIVE)
    with pytest.raises(NotFound):
        ledger.transition("r-missing", RunState.VALIDATING)
    assert ledger.get("r1").state is RunState.VALIDATING


def test_each_state_change_writes_its_event_in_the_same_write(ledger: Any) -> None:
    """The run's creation and every move put their event in the stored outbox (ids run-1, run-2, ...); a
    refused move writes none."""
    created, _ = ledger.create(record())
    assert [e["id"] for e in ledger.get("r1").outbox] == ["r1-1"] and created.event_seq == 1
    moved = ledger.transition("r1", RunState.VALIDATING, expect=[RunState.RECEIVED])
    stored = ledger.get("r1")
    assert stored.outbox == moved.outbox and stored.event_seq == 2
    assert [e["type"] for e in stored.outbox] == ["Tunegrid.Run.Received", "Tunegrid.Run.Validating"]
    assert stored.outbox[1]["data"]["previousState"] == "received" and stored.outbox[1]["subject"] == "runs/r1"
    with pytest.raises(ConflictError):
        ledger.transition("r1", RunState.LIVE)
    assert ledger.get("r1").event_seq == 2 and len(ledger.get("r1").outbox) == 2


def test_published_events_leave_the_outbox_only_by_a_conditional_write(ledger: Any) -> None:
    """Taking events out is an ETag-conditional update: a stale copy can neither drop events recorded since
    nor bring published ones back."""
    ledger.create(record())
    moved = ledger.transition("r1", RunState.VALIDATING)
    acked = ledger.update(moved, outbox=without_events(moved, ["r1-1"]).outbox)
    assert [e["id"] for e in ledger.get("r1").outbox] == ["r1-2"] and acked.etag == ledger.get("r1").etag
    ledger.transition("r1", RunState.SUBMITTING)
    with pytest.raises(ConflictError):
        ledger.update(acked, outbox=())
    with pytest.raises(ConflictError):
        ledger.update(moved, outbox=moved.outbox)
    assert [e["id"] for e in ledger.get("r1").outbox] == ["r1-2", "r1-3"]


def test_concurrent_writers_one_wins(ledger: Any) -> None:
    """Eight threads move the same run, and eight update one read of it: exactly one of each wins."""
    ledger.create(record())

    def race(action: Callable[[], Any]) -> list[str]:
        results: list[str] = []
        barrier = threading.Barrier(8)

        def one() -> None:
            barrier.wait()
            try:
                action()
                results.append("won")
            except ConflictError:
                results.append("conflict")

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sorted(results)

    moves = race(lambda: ledger.transition("r1", RunState.VALIDATING, expect=[RunState.RECEIVED]))
    assert moves == ["conflict"] * 7 + ["won"]
    read = ledger.get("r1")
    updates = race(lambda: ledger.update(read, claimed_at=threading.current_thread().name))
    assert updates == ["conflict"] * 7 + ["won"]
    assert [s for s, _ in ledger.get("r1").timeline] == ["received", "validating"]


def test_list_is_newest_first_ties_in_run_id_order(ledger: Any) -> None:
    """`list` sorts by creation time, newest first; runs created at the same instant keep row-key order."""
    assert ledger.list() == []
    for run_id, at in (("rb", T0), ("ra", T0), ("rc", T0 + timedelta(seconds=1)), ("rd", T0 - timedelta(days=1))):
        ledger.create(record(run_id, created_at=at, updated_at=at))
    assert [r.run_id for r in ledger.list()] == ["rc", "ra", "rb", "rd"]
    assert all(r.etag for r in ledger.list())


def test_find_by_job(ledger: Any) -> None:
    """The run that submitted a job is found by the job's name (quotes included); others are None."""
    ledger.create(record("r1", job_name="tg-r1"))
    ledger.create(record("r2", job_name="it's-r2"))
    ledger.create(record("r3"))
    assert ledger.find_by_job("tg-r1").run_id == "r1"
    found = ledger.find_by_job("it's-r2")
    assert found.run_id == "r2" and found.etag == ledger.get("r2").etag
    assert ledger.find_by_job("tg-none") is None


def test_transition_of_a_held_record_is_fenced_by_its_etag(ledger: Any) -> None:
    """Given a record, the move is conditional on that record's ETag: a holder whose copy is stale (someone
    wrote since) gets ConflictError and nothing changes; a fresh copy moves."""
    created, _ = ledger.create(record())
    other = ledger.update(created, claimed_at="taken over")
    with pytest.raises(ConflictError):
        ledger.transition(created, RunState.VALIDATING)
    assert ledger.get("r1").state is RunState.RECEIVED
    moved = ledger.transition(other, RunState.VALIDATING, claimed_at="")
    assert moved.state is RunState.VALIDATING and ledger.get("r1").etag == moved.etag


@pytest.mark.parametrize("key", ["a/b", "a\\b", "a#b", "a?b", "ctl\x01", "x" * 2000, ""])
def test_a_key_tables_refuse_names_no_row(ledger: Any, key: str) -> None:
    """A run id (from an event tag or a URL) that cannot be a table key finds nothing, without an error."""
    assert ledger.get(key) is None
    assert ledger.get_endpoint_lease(key) is None


def test_find_by_dataset(ledger: Any) -> None:
    """The runs of one dataset name (container and blob, quotes included), oldest first."""
    for run_id, blob, at in (("r2", "it's.jsonl", T0), ("r1", "it's.jsonl", T0 - timedelta(seconds=1))):
        ledger.create(record(run_id, blob=blob, created_at=at, updated_at=at))
    ledger.create(record("r3", blob="other.jsonl"))
    assert [r.run_id for r in ledger.find_by_dataset("training-data", "it's.jsonl")] == ["r1", "r2"]
    assert ledger.find_by_dataset("other-container", "it's.jsonl") == []
    assert [r.run_id for r in ledger.list()] == ["r3", "r2", "r1"]


def test_endpoint_lease_rows(ledger: Any) -> None:
    """A lease row is inserted once (a second insert is ConflictError), replaced only with its ETag, and kept
    apart from the runs."""
    from shared.domain.leases import EndpointLease

    assert ledger.get_endpoint_lease("ep-1") is None
    taken = ledger.put_endpoint_lease(EndpointLease("ep-1").taken_by("r1", "tok1", T0, timedelta(minutes=5)))
    assert taken.etag
    got = ledger.get_endpoint_lease("ep-1")
    assert (got.holder, got.token, got.expires_at, got.etag) == ("r1", "tok1", T0 + timedelta(minutes=5), taken.etag)
    with pytest.raises(ConflictError):
        ledger.put_endpoint_lease(EndpointLease("ep-1").taken_by("r2", "tok2", T0, timedelta(minutes=5)))
    released = ledger.put_endpoint_lease(got.released())
    assert released.etag != taken.etag and ledger.get_endpoint_lease("ep-1").holder == ""
    with pytest.raises(ConflictError):
        ledger.put_endpoint_lease(got.taken_by("r2", "tok2", T0, timedelta(minutes=5)))
    assert ledger.get_endpoint_lease("ep-1").expires_at is None
    assert ledger.list() == []


def test_dataset_head_rows(ledger: Any) -> None:
    """A dataset head per dataset name (any characters), advanced only with its ETag."""
    from shared.domain.leases import DatasetHead

    name = "folder/it's #1?.jsonl"
    assert ledger.get_dataset_head("training-data", name) is None
    first = ledger.put_dataset_head(DatasetHead("training-data", name).advanced_to("r1"))
    assert (first.run_id, first.generation) == ("r1", 1)
    read = ledger.get_dataset_head("training-data", name)
    assert read == first
    second = ledger.put_dataset_head(read.advanced_to("r2"))
    with pytest.raises(ConflictError):
        ledger.put_dataset_head(read.advanced_to("r3"))
    assert ledger.get_dataset_head("training-data", name) == second and second.generation == 2
    assert ledger.get_dataset_head("training-data", "other.jsonl") is None


def test_rejections(ledger: Any) -> None:
    """Rejected deliveries are kept with their source, subject and reason, newest first."""
    assert ledger.rejections() == []
    ledger.reject("ingest", "training-data/a/../b.jsonl", "blob name has a '..' segment")
    ledger.reject("job_events", "event-1\x01", "data is null, expected an object")
    got = ledger.rejections()
    assert [(r["source"], r["subject"]) for r in got] == [
        ("job_events", "event-1\x01"),
        ("ingest", "training-data/a/../b.jsonl"),
    ]
    assert got[0]["at"] >= got[1]["at"] and "'..'" in got[1]["reason"]
    assert ledger.list() == []


# ---- blobs --------------------------------------------------------------------------------------


def test_properties_are_none_until_uploaded(blobs: tuple[Any, str]) -> None:
    """properties: None for a missing blob; then its ETag (unquoted), size and a UTC last-modified time."""
    store, container = blobs
    assert store.properties(container, "a.jsonl") is None
    store.upload(container, "a.jsonl", b"12345")
    props = store.properties(container, "a.jsonl")
    assert set(props) == {"etag", "size", "last_modified"}
    assert props["size"] == 5 and props["etag"] and '"' not in props["etag"]
    assert props["last_modified"].utcoffset() == timedelta(0)
    assert abs(props["last_modified"] - datetime.now(UTC)) < timedelta(minutes=1)


def test_every_upload_is_a_new_etag(blobs: tuple[Any, str]) -> None:
    """Overwriting with the same bytes still gives a new ETag (a new version of the dataset)."""
    store, container = blobs
    etags = []
    for _ in range(3):
        store.upload(container, "same.jsonl", b"{}\n")
        etags.append(store.properties(container, "same.jsonl")["etag"])
    assert len(set(etags)) == 3


def test_upload_without_overwrite_keeps_the_existing_blob(blobs: tuple[Any, str]) -> None:
    """overwrite=False on an existing blob: 409 BlobAlreadyExists, content and ETag unchanged."""
    store, container = blobs
    store.upload(container, "once.json", b"first", overwrite=False)
    before = store.properties(container, "once.json")["etag"]
    with pytest.raises(ConflictError) as caught:
        store.upload(container, "once.json", b"second", overwrite=False)
    assert status(caught.value) == (409, "BlobAlreadyExists")
    assert store.read_bytes(container, "once.json") == b"first"
    assert store.properties(container, "once.json")["etag"] == before


def test_upload_accepts_bytes_text_and_iterators_but_not_lists(blobs: tuple[Any, str]) -> None:
    """The ingest streams its split as a generator; a list is refused by the SDK, so by the fake too."""
    store, container = blobs
    store.upload(container, "gen.jsonl", (line for line in [b"a\n", b"b\n"]))
    assert store.read_bytes(container, "gen.jsonl") == b"a\nb\n"
    store.upload(container, "text.md", "héllo")
    assert store.read_bytes(container, "text.md") == "héllo".encode()
    with pytest.raises(TypeError, match="Unsupported data type"):
        store.upload(container, "list.jsonl", [b"a\n"])
    assert store.properties(container, "list.jsonl") is None


def test_chunks_stream_the_blob(make_blobs: tuple[BlobsFactory, str]) -> None:
    """The chunks put together are the blob, pinned to its ETag or not; an empty blob yields nothing."""
    factory, container = make_blobs
    store = factory(chunk_size=1024)
    data = bytes(range(256)) * 20
    store.upload(container, "big.bin", data)
    etag = store.properties(container, "big.bin")["etag"]
    parts = list(store.chunks(container, "big.bin", etag=etag))
    assert b"".join(parts) == data and len(parts) > 1
    assert b"".join(store.chunks(container, "big.bin")) == data
    store.upload(container, "empty.bin", b"")
    assert b"".join(store.chunks(container, "empty.bin")) == b""


def test_chunks_of_a_changed_blob_fail_with_412(blobs: tuple[Any, str]) -> None:
    """Pinned to an old ETag, the stream fails on its first read with ConflictError (412
    ConditionNotMet): the ingest then records the run as failed instead of mixing two versions."""
    store, container = blobs
    store.upload(container, "v.jsonl", b"one\n")
    old = store.properties(container, "v.jsonl")["etag"]
    store.upload(container, "v.jsonl", b"two\n")
    stream = store.chunks(container, "v.jsonl", etag=old)  # lazy: nothing is read yet
    with pytest.raises(ConflictError) as caught:
        next(stream)
    assert status(caught.value) == (412, "ConditionNotMet")


def test_chunks_fail_when_the_blob_changes_mid_stream(make_blobs: tuple[BlobsFactory, str]) -> None:
    """After the first range the SDK pins every later range to the first ETag: a change is a 412."""
    factory, container = make_blobs
    store = factory(chunk_size=1024)
    for pinned in (False, True):
        store.upload(container, "moving.bin", b"a" * 5000)
        etag = store.properties(container, "moving.bin")["etag"] if pinned else None
        stream = store.chunks(container, "moving.bin", etag=etag)
        assert next(stream) == b"a" * 1024
        store.upload(container, "moving.bin", b"b" * 5000)
        with pytest.raises(ConflictError) as caught:
            list(stream)
        assert status(caught.value)[0] == 412


def test_chunks_of_a_missing_blob_or_container(blobs: tuple[Any, str]) -> None:
    """Missing blob: 404 BlobNotFound; with an ETag: 412 (If-Match on nothing); no container: 404."""
    store, container = blobs
    with pytest.raises(NotFound) as missing:
        list(store.chunks(container, "nope.jsonl"))
    assert status(missing.value) == (404, "BlobNotFound")
    with pytest.raises(ConflictError) as pinned:
        list(store.chunks(container, "nope.jsonl", etag="0x8DC0000000000001"))
    assert status(pinned.value)[0] == 412
    with pytest.raises(NotFound) as no_container:
        list(store.chunks("no-such-container", "x.jsonl"))
    assert status(no_container.value) == (404, "ContainerNotFound")
    with pytest.raises(NotFound):
        store.upload("no-such-container", "x.jsonl", b"x")
    assert store.properties("no-such-container", "x.jsonl") is None


def test_read_bytes_limit(blobs: tuple[Any, str]) -> None:
    """read_bytes: None when absent, the bytes up to the limit, a ValueError naming the sizes above it."""
    store, container = blobs
    assert store.read_bytes(container, "side.config.json") is None
    store.upload(container, "side.config.json", b"x" * 10)
    assert store.read_bytes(container, "side.config.json", limit=10) == b"x" * 10
    with pytest.raises(ValueError, match=f"{container}/side.config.json is 10 bytes, over the 9-byte limit"):
        store.read_bytes(container, "side.config.json", limit=9)


def test_url_and_listing(blobs: tuple[Any, str]) -> None:
    """upload returns the blob's URL (name percent-encoded, folders kept); list_names is lexical, by prefix."""
    store, container = blobs
    url = store.upload(container, "a dir/b c.jsonl", b"1")
    assert url == store.url(container, "a dir/b c.jsonl")
    assert url.endswith(f"/{container}/a%20dir/b%20c.jsonl") and url.startswith(("http://", "https://"))
    for name in ("b.jsonl", "a dir/a.jsonl", "ab.jsonl"):
        store.upload(container, name, b"1")
    assert store.list_names(container) == ["a dir/a.jsonl", "a dir/b c.jsonl", "ab.jsonl", "b.jsonl"]
    assert store.list_names(container, prefix="a dir/") == ["a dir/a.jsonl", "a dir/b c.jsonl"]
    assert store.list_names(container, prefix="zzz") == []


# ---- the janitor's audit log --------------------------------------------------------------------


def test_audit_rows(audit: tuple[Any, Callable[[], list[dict[str, Any]]]]) -> None:
    """One row per decision, partitioned by UTC day, row keys in time order, every field kept."""
    log, rows = audit
    decision = Decision(
        action="delete",
        kind="endpoint",
        endpoint="idle-ep",
        rule=Rule.IDLE,
        reason="no request for 3 h",
        last_use=T0 - timedelta(hours=3),
        outcome="deleting",
        retired_runs=("r1", "r2"),
    )
    log.write(decision, at=T0, dry_run=False, sweep_id="s1")
    log.write(replace(decision, outcome="dry-run"), at=T0 + timedelta(seconds=1), dry_run=True, sweep_id="s2")
    first, second = rows()
    assert first["PartitionKey"] == "2026-01-02" and first["RowKey"].startswith("20260102T030405678901Z-")
    assert second["RowKey"] > first["RowKey"]
    assert {k: first[k] for k in ("action", "kind", "target", "endpoint", "deployment", "rule", "outcome")} == {
        "action": "delete",
        "kind": "endpoint",
        "target": "idle-ep",
        "endpoint": "idle-ep",
        "deployment": "",
        "rule": "idle",
        "outcome": "deleting",
    }
    assert (first["retired_runs"], first["dry_run"], first["sweep_id"]) == ("r1,r2", False, "s1")
    assert first["last_use"] == (T0 - timedelta(hours=3)).isoformat() and first["at"] == T0
    assert (second["dry_run"], second["outcome"]) == (True, "dry-run")


# ---- self-healing: a missing table or container is created on first use -------------------------


@pytest.fixture(params=IMPLEMENTATIONS)
def droppable_ledger(request: pytest.FixtureRequest, unique: str) -> Iterator[tuple[Any, Callable[[], None]]]:
    """(ledger, drop): `drop()` deletes the ledger's table, as an emulator restarted empty leaves it."""
    if request.param == "memory":
        memory = InMemoryLedger()
        yield memory, memory.drop_table
        return
    from shared.adapters.tables import TableRunLedger

    tables = request.getfixturevalue("storage").tables
    table = tables.create_table(f"heal{unique}")
    yield TableRunLedger(table), lambda: tables.delete_table(table.table_name)
    tables.delete_table(table.table_name)


def test_a_dropped_table_is_recreated_on_first_use(droppable_ledger: tuple[Any, Callable[[], None]]) -> None:
    """After the table is gone, reads find nothing and the next write recreates it, every time it happens."""
    ledger, drop = droppable_ledger
    ledger.create(record("r1"))
    for attempt in range(2):
        drop()
        assert ledger.get("r1") is None
        assert ledger.list() == []
        assert ledger.find_by_job("tg-r1") is None
        _, fresh = ledger.create(record("r1", error=f"after drop {attempt}"))
        assert fresh is True and ledger.get("r1").error == f"after drop {attempt}"
        moved = ledger.transition("r1", RunState.VALIDATING, expect=[RunState.RECEIVED])
        assert moved.state is RunState.VALIDATING


@pytest.fixture(params=IMPLEMENTATIONS)
def droppable_blobs(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Callable[[str], None]]]:
    """(blob store, drop): `drop(container)` deletes one of the app's containers with its blobs."""
    if request.param == "memory":
        memory = InMemoryBlobs()
        yield memory, memory.drop_container
        return
    from shared.adapters.storage import BlobStore

    storage = request.getfixturevalue("storage")
    yield BlobStore(storage.blobs), storage.blobs.delete_container
    storage.ensure_resources()


def test_a_dropped_app_container_is_recreated_on_first_use(
    droppable_blobs: tuple[Any, Callable[[str], None]],
) -> None:
    """After an app container is gone, reads find nothing and an upload recreates it; a container the app does
    not own is never created."""
    from shared.settings import RUN_REPORTS_CONTAINER

    store, drop = droppable_blobs
    for attempt in range(2):
        drop(RUN_REPORTS_CONTAINER)
        assert store.properties(RUN_REPORTS_CONTAINER, "r1/report.json") is None
        assert store.read_bytes(RUN_REPORTS_CONTAINER, "r1/report.json") is None
        store.upload(RUN_REPORTS_CONTAINER, "r1/report.json", f"{attempt}".encode())
        assert store.read_bytes(RUN_REPORTS_CONTAINER, "r1/report.json") == f"{attempt}".encode()
    with pytest.raises(NotFound):
        store.upload("not-an-app-container", "x.json", b"x")


def test_an_upload_to_a_dropped_container_replays_a_file_not_a_stream(
    droppable_blobs: tuple[Any, Callable[[str], None]], tmp_path: Any
) -> None:
    """A seekable file is sent again once the container is back; a one-shot stream cannot be: the container is
    created and the upload fails with TransientError, so the caller's retry sends it."""
    from shared.errors import TransientError
    from shared.settings import PREPARED_CONTAINER

    store, drop = droppable_blobs
    drop(PREPARED_CONTAINER)
    with (tmp_path / "train.jsonl").open("w+b") as file:
        file.write(b"one\ntwo\n")
        file.seek(0)
        store.upload(PREPARED_CONTAINER, "r1/train.jsonl", file)
    assert store.read_bytes(PREPARED_CONTAINER, "r1/train.jsonl") == b"one\ntwo\n"
    drop(PREPARED_CONTAINER)
    with pytest.raises(TransientError, match="retried"):
        store.upload(PREPARED_CONTAINER, "r1/test.jsonl", (line for line in [b"a\n", b"b\n"]))
    store.upload(PREPARED_CONTAINER, "r1/test.jsonl", (line for line in [b"a\n", b"b\n"]))
    assert store.read_bytes(PREPARED_CONTAINER, "r1/test.jsonl") == b"a\nb\n"
