"""Blob triggers of the dev host against a real Azurite: delivered once per blob version, receipts survive
a restart, SDK-typed and stream parameters, retries then the poison table."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import azure.functions as func
import azurefunctions.extensions.bindings.blob as blob_ext
import pytest
from azure.storage.blob import BlobClient, BlobServiceClient

from shared.adapters.storage import StorageClients
from tests.support import wait_for
from tunegrid.devhost import DevHost, HostTimings
from tunegrid.devhost.blobs import POISON_TABLE, RECEIPTS_TABLE, BlobPath, receipt_key

pytestmark = pytest.mark.azurite

FAST = HostTimings(blob_poll_interval_s=0.2, blob_retry_first_delay_s=0.02, shutdown_timeout_s=5.0)


def settled_polls(host: DevHost, count: int = 2) -> None:
    """Wait until the watcher has completed `count` more polls and settled every delivery they started:
    a blob it would deliver again has been delivered again by then, so "nothing more" can be asserted."""
    watcher = host.blobs
    start = watcher.polls
    wait_for(
        lambda: watcher.polls >= start + count and watcher.deliveries_in_progress == 0,
        what=f"{count} more complete blob polls with no delivery in progress",
    )


class Recorder:
    """What the blob functions saw, and how many times each should still fail."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, Any]] = []
        self.fail: dict[str, int] = {}

    def record(self, name: str, value: Any) -> None:
        with self.lock:
            self.seen.append((name, value))
            left = self.fail.get(name, 0)
            if left:
                self.fail[name] = left - 1
                raise RuntimeError(f"cannot process {name}")

    def names(self) -> list[str]:
        with self.lock:
            return [n for n, _ in self.seen]


def blob_app(container: str, rec: Recorder) -> func.FunctionApp:
    app = func.FunctionApp()

    @app.blob_trigger(
        arg_name="client",
        path=f"{container}/{{name}}.jsonl",
        connection="DevhostTestData",
        source=func.BlobSource.EVENT_GRID,
    )
    def on_client(client: blob_ext.BlobClient) -> None:
        rec.record(client.blob_name, client)

    @app.blob_trigger(arg_name="stream", path=f"{container}/streams/{{name}}", connection="DevhostTestData")
    async def on_stream(stream: func.InputStream) -> None:
        rec.record(str(stream.name), {"data": stream.read(), "length": stream.length, "uri": stream.uri})

    return app


@pytest.fixture
def setup(storage_conn: str, unique: str, tmp_path: Path) -> dict[str, Any]:
    container = f"devhost-{unique}"
    service = BlobServiceClient.from_connection_string(storage_conn)
    service.create_container(container)
    return {
        "container": container,
        "service": service,
        "settings": {"AzureWebJobsStorage": storage_conn, "DevhostTestData": storage_conn},
        "state": tmp_path,
        "tables": StorageClients.from_connection({"": storage_conn}).tables,
    }


def _host(setup: dict[str, Any], rec: Recorder) -> DevHost:
    return DevHost(
        blob_app(setup["container"], rec), settings=setup["settings"], port=0, state_dir=setup["state"], timings=FAST
    )


def test_blob_delivered_once_survives_restart_and_redelivers_on_change(setup: dict[str, Any]) -> None:
    """A new blob is delivered once as an SDK BlobClient; a restart does not redeliver; a change does."""
    container, service = setup["container"], setup["service"]
    rec = Recorder()
    with _host(setup, rec) as host:
        assert {e["function"]: e["blob_path"] for e in host.routes()}["on_client"] == f"{container}/{{name}}.jsonl"
        service.get_blob_client(container, "data.jsonl").upload_blob(b'{"v": 1}\n')
        service.get_blob_client(container, "ignored.txt").upload_blob(b"not matched")
        wait_for(lambda: rec.names(), what="the first delivery")
        settled_polls(host)
        assert rec.names() == ["data.jsonl"]
        client = rec.seen[0][1]
        assert type(client) is BlobClient
        assert client.container_name == container
        assert client.download_blob().readall() == b'{"v": 1}\n'
    rec2 = Recorder()
    with _host(setup, rec2) as host2:
        settled_polls(host2)
        assert rec2.names() == []  # the receipt in Azurite says it was delivered
        service.get_blob_client(container, "data.jsonl").upload_blob(b'{"v": 2}\n', overwrite=True)
        wait_for(lambda: rec2.names(), what="the changed blob")
        settled_polls(host2)
        assert rec2.names() == ["data.jsonl"]
        assert rec2.seen[0][1].download_blob().readall() == b'{"v": 2}\n'
    etag = service.get_blob_client(container, "data.jsonl").get_blob_properties().etag.strip('"')
    receipt = (
        setup["tables"]
        .get_table_client(RECEIPTS_TABLE)
        .get_entity("on_client", receipt_key(container, "data.jsonl", etag))
    )
    assert (receipt["Status"], receipt["BlobName"], receipt["Attempts"]) == ("Delivered", "data.jsonl", 1)


def test_input_stream_parameter_gets_the_content(setup: dict[str, Any]) -> None:
    """A func.InputStream parameter gets the blob's bytes, its `container/name` and its URI."""
    container, service = setup["container"], setup["service"]
    rec = Recorder()
    with _host(setup, rec):
        service.get_blob_client(container, "streams/a/b.bin").upload_blob(b"\x00\x01payload")
        wait_for(lambda: rec.names(), what="the stream delivery")
    [(name, value)] = rec.seen
    assert name == f"{container}/streams/a/b.bin"
    assert value["data"] == b"\x00\x01payload"
    assert value["length"] == 9
    assert value["uri"].endswith(f"/{container}/streams/a/b.bin")


def test_failing_blob_is_retried_then_delivered(setup: dict[str, Any]) -> None:
    """Two failures then success: three invocations and a Delivered receipt with 3 attempts."""
    container, service = setup["container"], setup["service"]
    rec = Recorder()
    rec.fail["flaky.jsonl"] = 2
    with _host(setup, rec) as host:
        service.get_blob_client(container, "flaky.jsonl").upload_blob(b"{}\n")
        wait_for(lambda: len(rec.names()) == 3, what="three tries")
        etag = service.get_blob_client(container, "flaky.jsonl").get_blob_properties().etag.strip('"')
        table = setup["tables"].get_table_client(RECEIPTS_TABLE)
        row = receipt_key(container, "flaky.jsonl", etag)
        receipt = wait_for(lambda: _entity(table, "on_client", row), timeout_s=5, what="the receipt")
        settled_polls(host)
    assert rec.names() == ["flaky.jsonl"] * 3
    assert (receipt["Status"], receipt["Attempts"]) == ("Delivered", 3)


def test_failing_blob_is_parked_in_the_poison_table_after_five_tries(setup: dict[str, Any]) -> None:
    """maxDequeueCount (5) failed tries park the blob with its error; it is not tried again."""
    container, service = setup["container"], setup["service"]
    rec = Recorder()
    rec.fail["bad.jsonl"] = 99
    with _host(setup, rec) as host:
        service.get_blob_client(container, "bad.jsonl").upload_blob(b"{}\n")
        etag = service.get_blob_client(container, "bad.jsonl").get_blob_properties().etag.strip('"')
        poison = setup["tables"].get_table_client(POISON_TABLE)
        row = receipt_key(container, "bad.jsonl", etag)
        parked = wait_for(lambda: _entity(poison, "on_client", row), what="the poison record")
        settled_polls(host)
    assert rec.names() == ["bad.jsonl"] * 5
    assert parked["Container"] == container and parked["BlobName"] == "bad.jsonl"
    assert parked["Attempts"] == 5 and "cannot process bad.jsonl" in parked["Error"]
    assert len(json.loads(parked["InvocationIds"])) == 5
    rec2 = Recorder()
    with _host(setup, rec2) as host2:
        settled_polls(host2)
    assert rec2.names() == []


def test_a_name_the_listing_cannot_return_does_not_stop_the_others(setup: dict[str, Any]) -> None:
    """A blob whose name holds a control character makes Azurite's listing page fail (HTTP 500): the watcher
    lists past it, delivers the blobs before and after it, and parks the unlistable name in the poison table."""
    container, service = setup["container"], setup["service"]
    for name in ("a-first.jsonl", "b\x01bad.jsonl", "c-last.jsonl"):
        service.get_blob_client(container, name).upload_blob(b"{}\n")
    rec = Recorder()
    with _host(setup, rec) as host:
        wait_for(lambda: sorted(rec.names()) == ["a-first.jsonl", "c-last.jsonl"], what="both listable blobs")
        poison = setup["tables"].get_table_client(POISON_TABLE)
        parked = wait_for(
            lambda: [e for e in poison.list_entities() if e.get("Container") == container],
            what="the unlistable name in the poison table",
        )
        settled_polls(host)
        service.get_blob_client(container, "d-later.jsonl").upload_blob(b"{}\n")
        wait_for(lambda: "d-later.jsonl" in rec.names(), what="a blob uploaded later")
    assert [p["BlobName"] for p in parked] == ["b"] and parked[0]["Status"] == "Unlistable"
    assert "control character" in parked[0]["Error"]
    assert sorted(rec.names()) == ["a-first.jsonl", "c-last.jsonl", "d-later.jsonl"]


def test_receipts_table_lost_while_running_is_recreated(setup: dict[str, Any]) -> None:
    """The emulator lost the receipts and poison tables while the host runs: the next delivery recreates them
    and records its receipt, so the blob is delivered once, not at every poll."""
    container, service = setup["container"], setup["service"]
    rec = Recorder()
    with _host(setup, rec) as host:
        settled_polls(host)
        for table in (RECEIPTS_TABLE, POISON_TABLE):
            setup["tables"].delete_table(table)
        service.get_blob_client(container, "after.jsonl").upload_blob(b"{}\n")
        wait_for(lambda: rec.names(), what="the delivery")
        settled_polls(host, 3)
    assert rec.names() == ["after.jsonl"]
    etag = service.get_blob_client(container, "after.jsonl").get_blob_properties().etag.strip('"')
    table = setup["tables"].get_table_client(RECEIPTS_TABLE)
    assert _entity(table, "on_client", receipt_key(container, "after.jsonl", etag))["Status"] == "Delivered"


def test_missing_connection_disables_only_that_function(storage_conn: str, tmp_path: Path) -> None:
    """A blob trigger whose connection setting is absent is reported disabled; the host still starts."""
    app = func.FunctionApp()

    @app.blob_trigger(arg_name="stream", path="somewhere/{name}", connection="NoSuchConnection")
    def orphan(stream: func.InputStream) -> None:
        pass

    @app.route(route="alive", auth_level=func.AuthLevel.ANONYMOUS)
    def alive(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("yes")

    import httpx

    # AzureWebJobsStorage is the host's fallback connection, so leave it out too
    with DevHost(app, settings={}, port=0, state_dir=tmp_path, timings=FAST) as host:
        entry = {e["function"]: e for e in host.routes()}["orphan"]
        assert entry["status"] == "error" and "NoSuchConnection" in entry["error"]
        assert httpx.get(host.base_url + "/api/alive").text == "yes"


@pytest.mark.parametrize(
    ("path", "blob", "matches"),
    [
        ("c/{name}", "a.jsonl", True),
        ("c/{name}", "dir/a.jsonl", True),
        ("c/{name}.jsonl", "a.jsonl", True),
        ("c/{name}.jsonl", "a.jsonl.config.json", False),
        ("c/in/{name}", "out/x", False),
        ("c/{folder}/{name}.csv", "x/y.csv", True),
    ],
)
def test_blob_path_patterns(path: str, blob: str, matches: bool) -> None:
    """Trigger paths match blob names as the host's binding expressions do ({name} may span folders)."""
    assert BlobPath.parse(path).matches(blob) is matches


def _entity(table: Any, partition: str, row: str) -> dict[str, Any] | None:
    from azure.core.exceptions import ResourceNotFoundError

    try:
        return dict(table.get_entity(partition, row))
    except ResourceNotFoundError:
        return None
