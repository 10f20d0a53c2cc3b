"""The dev host (`python -m tunegrid devhost`): routing table against the real app, HTTP auth levels and
routes, the Event Grid webhook, timers, settings and a graceful CLI shutdown, on real sockets."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import httpx
import pytest

from shared.errors import ConfigError
from tests.support import wait_for
from tunegrid.devhost import DevHost, HostTimings
from tunegrid.devhost.config import apply_to_environ, load_local_settings, resolve_references
from tunegrid.devhost.routing import RouteTable, compile_route
from tunegrid.devhost.timers import TimerSchedule

ROOT = Path(__file__).resolve().parent.parent
FAST = HostTimings(
    blob_poll_interval_s=0.2,
    blob_retry_first_delay_s=0.02,
    event_retry_first_delay_s=0.02,
    shutdown_timeout_s=5.0,
)


# --------------------------------------------------------------------------- the real function app
def _sample_path(template: str) -> str:
    """A concrete path for a route template: `{x:int}` -> 1, `{x}` -> sample, `{*x}` -> a/b."""

    def one(match: re.Match[str]) -> str:
        inner = match.group(1)
        if inner.startswith("*"):
            return "a/b"
        return "1" if ":int" in inner or ":long" in inner else "sample"

    return re.sub(r"\{([^}]+)\}", one, template)


def test_routing_table_matches_get_functions_of_the_real_app(tmp_path: Path) -> None:
    """Every function of function_app.app is served with its trigger type and binding fields."""
    from function_app import app
    from shared.settings import SETTINGS
    from tunegrid.appindex import functions_of, raw_bindings

    settings = {s.name: s.default for s in SETTINGS if s.default}
    settings.update(AzureWebJobsStorage="UseDevelopmentStorage=true", DataStorage="UseDevelopmentStorage=true")
    host = DevHost(app, settings=settings, port=0, state_dir=tmp_path)
    try:
        table = {entry["function"]: entry for entry in host.routes()}
        functions = functions_of(app)
        assert set(table) == {fn.get_function_name() for fn in functions}
        for fn in functions:
            name = fn.get_function_name()
            [trigger] = [b for b in raw_bindings(fn) if b["type"].endswith("Trigger")]
            entry = table[name]
            assert entry["status"] == "ok", (name, entry.get("error"))
            assert entry["trigger"] == trigger["type"]
            for field, value in trigger.items():  # every binding field, %SETTING% resolved
                expected = resolve_references(value, settings) if isinstance(value, str) else value
                assert entry["binding"][field] == expected, (name, field)
            if trigger["type"] == "httpTrigger":
                route = trigger.get("route") or name
                assert entry["path"] == "/api/" + route.strip("/")
                assert entry["auth_level"] == trigger["authLevel"].lower()
                methods = [m.upper() for m in trigger.get("methods") or ["GET", "POST", "PUT", "DELETE"]]
                assert set(methods) <= set(entry["methods"])
                for method in methods:
                    found = host.route_table.match(_sample_path(entry["path"]), method)
                    assert found is not None and found[0].function == name, (name, method)
            elif trigger["type"] == "blobTrigger":
                assert entry["blob_path"] == trigger["path"]
                assert entry["connection"] == trigger.get("connection", "AzureWebJobsStorage")
            elif trigger["type"] == "timerTrigger":
                assert len(entry["schedule"].split()) == 6
                TimerSchedule(entry["schedule"])
            elif trigger["type"] == "eventGridTrigger":
                assert entry["path"] == f"/runtime/webhooks/eventgrid?functionName={name}"
    finally:
        host.stop()


# ---------------------------------------------------------------------------------- HTTP triggers
def http_app(calls: list[dict[str, Any]]) -> func.FunctionApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

    @app.route(route="open", auth_level=func.AuthLevel.ANONYMOUS, methods=["GET"])
    async def open_fn(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("open")

    @app.route(route="guarded", methods=["GET"])
    def guarded(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("guarded")

    @app.route(route="other", methods=["GET"])
    def other(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("other")

    @app.route(route="root", auth_level=func.AuthLevel.ADMIN, methods=["GET"])
    def root(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("admin")

    @app.route(route="items/{id:int}/{part?}", auth_level=func.AuthLevel.ANONYMOUS, methods=["GET", "PUT"])
    def items(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse(json.dumps(dict(req.route_params)), mimetype="application/json")

    @app.route(route="echo", auth_level=func.AuthLevel.ANONYMOUS, methods=["POST"])
    async def echo(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
        calls.append(
            {
                "method": req.method,
                "url": req.url,
                "params": dict(req.params),
                "headers": dict(req.headers),
                "json": req.get_json(),
                "invocation_id": context.invocation_id,
                "function": context.function_name,
                "thread": threading.current_thread().name,
            }
        )
        return func.HttpResponse(
            json.dumps({"ok": True}), status_code=201, headers={"X-Trace": "t1"}, mimetype="application/json"
        )

    @app.route(route="sync", auth_level=func.AuthLevel.ANONYMOUS, methods=["POST"])
    def sync_fn(req: func.HttpRequest) -> func.HttpResponse:
        calls.append({"thread": threading.current_thread().name, "body": req.get_body()})
        return func.HttpResponse(req.get_body(), mimetype="application/octet-stream")

    @app.route(route="boom", auth_level=func.AuthLevel.ANONYMOUS)
    def boom(req: func.HttpRequest) -> func.HttpResponse:
        raise RuntimeError("kaput")

    @app.route(route="stream", auth_level=func.AuthLevel.ANONYMOUS, methods=["GET"])
    async def stream(req: func.HttpRequest) -> Any:
        from starlette.responses import StreamingResponse

        async def chunks() -> Any:
            for i in range(3):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(0)

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


@pytest.fixture
def http_host(tmp_path: Path) -> Iterator[tuple[DevHost, list[dict[str, Any]]]]:
    calls: list[dict[str, Any]] = []
    with DevHost(http_app(calls), settings={}, port=0, state_dir=tmp_path, timings=FAST) as host:
        yield host, calls


@pytest.mark.parametrize(
    ("path", "key", "where", "status"),
    [
        ("/api/open", None, None, 200),
        ("/api/guarded", None, None, 401),
        ("/api/guarded", "guarded", "header", 200),
        ("/api/guarded", "guarded", "query", 200),
        ("/api/guarded", "other", "header", 401),
        ("/api/guarded", "wrong", "header", 401),
        ("/api/guarded", "host", "query", 200),
        ("/api/guarded", "master", "header", 200),
        ("/api/root", None, None, 401),
        ("/api/root", "root", "header", 401),
        ("/api/root", "host", "query", 401),
        ("/api/root", "master", "header", 200),
        ("/api/root", "master", "query", 200),
    ],
)
def test_http_auth_levels(
    http_host: tuple[DevHost, list[dict[str, Any]]], path: str, key: str | None, where: str | None, status: int
) -> None:
    """anonymous needs nothing; function takes its own key, a host key or the master key; admin only the master key."""
    host, _ = http_host
    keys = host.function_keys()
    value = {
        None: None,
        "master": host.master_key,
        "host": host.keys.host_keys()["default"],
        "wrong": "not-a-key",
    }.get(key, keys.get(key or ""))
    headers = {"x-functions-key": value} if where == "header" and value else {}
    params = {"code": value} if where == "query" and value else {}
    response = httpx.get(host.base_url + path, headers=headers, params=params)
    assert response.status_code == status
    if status == 401:
        assert response.content == b""


@pytest.mark.parametrize(
    ("method", "path", "status", "params"),
    [
        ("GET", "/api/items/42", 200, {"id": "42"}),
        ("GET", "/api/items/42/", 200, {"id": "42"}),
        ("PUT", "/API/Items/7/extra", 200, {"id": "7", "part": "extra"}),
        ("GET", "/api/items/abc", 404, None),
        ("POST", "/api/items/42", 404, None),
        ("GET", "/api/nowhere", 404, None),
        ("GET", "/items/42", 404, None),
    ],
)
def test_http_routes_and_route_params(
    http_host: tuple[DevHost, list[dict[str, Any]]], method: str, path: str, status: int, params: dict[str, str] | None
) -> None:
    """Route templates (int constraint, optional segment, case-insensitive literals) and methods."""
    host, _ = http_host
    response = httpx.request(method, host.base_url + path)
    assert response.status_code == status
    if params is not None:
        assert response.json() == params


def test_async_function_gets_a_real_request_and_context(http_host: tuple[DevHost, list[dict[str, Any]]]) -> None:
    """`async def` runs on the loop with a real HttpRequest and Context; the HttpResponse maps back."""
    host, calls = http_host
    response = httpx.post(host.base_url + "/api/echo?a=1&b=x", json={"q": "hi"}, headers={"X-Custom": "v"})
    assert response.status_code == 201
    assert response.json() == {"ok": True}
    assert response.headers["x-trace"] == "t1"
    assert response.headers["content-type"] == "application/json"
    [call] = calls
    assert call["method"] == "POST"
    assert call["url"] == f"http://127.0.0.1:{host.port}/api/echo?a=1&b=x"
    assert call["params"] == {"a": "1", "b": "x"}
    assert call["headers"]["x-custom"] == "v"
    assert call["json"] == {"q": "hi"}
    assert call["function"] == "echo"
    assert re.fullmatch(r"[0-9a-f-]{36}", call["invocation_id"])
    assert call["thread"] == "devhost"


def test_sync_function_runs_in_the_thread_pool(http_host: tuple[DevHost, list[dict[str, Any]]]) -> None:
    """A plain function runs in a worker thread; its bytes body comes back unchanged."""
    host, calls = http_host
    payload = bytes(range(256)) * 10
    response = httpx.post(host.base_url + "/api/sync", content=payload)
    assert response.status_code == 200
    assert response.content == payload
    assert response.headers["content-type"] == "application/octet-stream"
    assert calls[0]["thread"].startswith("devhost-fn")


def test_failing_function_gives_500_and_logs_an_invocation_id(
    http_host: tuple[DevHost, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    """An exception is a bare 500 to the caller and an error log carrying the invocation id."""
    host, _ = http_host
    with caplog.at_level(logging.ERROR, logger="tunegrid.devhost"):
        response = httpx.get(host.base_url + "/api/boom")
    assert response.status_code == 500
    assert b"kaput" not in response.content
    [record] = [r for r in caplog.records if getattr(r, "function", None) == "boom"]
    assert re.fullmatch(r"[0-9a-f-]{36}", record.invocation_id)  # type: ignore[attr-defined]
    assert record.invocation_id in record.getMessage()  # type: ignore[attr-defined]


def test_streaming_response_is_sent_as_it_is_produced(http_host: tuple[DevHost, list[dict[str, Any]]]) -> None:
    """A function may return an ASGI response (e.g. Starlette's StreamingResponse) for server-sent events."""
    host, _ = http_host
    with httpx.stream("GET", host.base_url + "/api/stream") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = b"".join(response.iter_bytes())
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_admin_api_needs_the_master_key(http_host: tuple[DevHost, list[dict[str, Any]]]) -> None:
    """ping is anonymous; status and the function list need the master key and list every function."""
    host, _ = http_host
    assert httpx.get(host.base_url + "/admin/host/ping").status_code == 200
    assert httpx.get(host.base_url + "/admin/host/status").status_code == 401
    listing = httpx.get(host.base_url + "/admin/functions", headers={"x-functions-key": host.master_key})
    assert listing.status_code == 200
    assert {e["function"] for e in listing.json()} == {e["function"] for e in host.routes()}
    assert host.master_key not in listing.text


def test_route_prefix_comes_from_host_json(tmp_path: Path) -> None:
    """extensions.http.routePrefix in host.json moves every HTTP route (empty prefix allowed)."""
    (tmp_path / "host.json").write_text(json.dumps({"version": "2.0", "extensions": {"http": {"routePrefix": ""}}}))
    with DevHost(http_app([]), settings={}, port=0, state_dir=tmp_path, host_json=tmp_path / "host.json") as host:
        assert httpx.get(host.base_url + "/open").text == "open"
        assert httpx.get(host.base_url + "/api/open").status_code == 404


def test_keys_persist_and_master_key_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys are generated once (file mode 0600) and reused; DEVHOST_MASTER_KEY replaces the master key."""
    first = DevHost(http_app([]), settings={}, port=0, state_dir=tmp_path)
    keys = first.function_keys()
    master = first.master_key
    first.stop()
    assert (tmp_path / "keys.json").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("DEVHOST_MASTER_KEY", "env-master-key")
    with DevHost(http_app([]), settings={}, port=0, state_dir=tmp_path) as second:
        assert second.function_keys() == keys
        assert second.master_key == "env-master-key" != master
        url = second.base_url + "/api/root"
        assert httpx.get(url, headers={"x-functions-key": "env-master-key"}).status_code == 200
        assert httpx.get(url, headers={"x-functions-key": master}).status_code == 401


def test_route_table_prefers_literal_and_specific_routes() -> None:
    """A literal route beats a template, a template beats a catch-all."""
    table = RouteTable(
        [
            compile_route("all", "{*rest}", prefix="api", methods=None, auth_level="anonymous"),
            compile_route("one", "runs/{id}", prefix="api", methods=["GET"], auth_level="anonymous"),
            compile_route("lit", "runs/latest", prefix="api", methods=["GET"], auth_level="anonymous"),
        ]
    )
    assert table.match("/api/runs/latest", "GET")[0].function == "lit"  # type: ignore[index]
    assert table.match("/api/runs/r1", "GET") == (table.routes[1], {"id": "r1"})
    assert table.match("/api/x/y/z", "DELETE") == (table.routes[0], {"rest": "x/y/z"})
    assert table.match("/api", "GET")[0].function == "all"  # type: ignore[index]


# ---------------------------------------------------------------------------- Event Grid triggers
def grid_app(events: list[Any], failures: dict[str, int]) -> func.FunctionApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

    @app.event_grid_trigger(arg_name="event")
    def on_event(event: func.EventGridEvent) -> None:
        events.append(event)
        left = failures.get(event.id, 0)
        if left:
            failures[event.id] = left - 1
            raise RuntimeError(f"handler failed for {event.id}")

    @app.event_grid_trigger(arg_name="event")
    async def on_cloud_event(event: func.CloudEvent) -> None:
        events.append(event)

    return app


@pytest.fixture
def grid_host(tmp_path: Path) -> Iterator[tuple[DevHost, list[Any], dict[str, int]]]:
    events: list[Any] = []
    failures: dict[str, int] = {}
    settings = {"LOCAL_EVENT_KEY": "sas-key-for-tests"}
    with DevHost(grid_app(events, failures), settings=settings, port=0, state_dir=tmp_path, timings=FAST) as host:
        yield host, events, failures


def _event(event_id: str, event_type: str = "Microsoft.MachineLearningServices.RunCompleted") -> dict[str, Any]:
    return {
        "id": event_id,
        "topic": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws",
        "subject": "experiments/e1/runs/run-1",
        "eventType": event_type,
        "eventTime": "2026-01-02T03:04:05.123Z",
        "data": {"runId": "run-1", "runStatus": "Completed"},
        "dataVersion": "2",
    }


def _webhook(
    host: DevHost, body: Any, *, kind: str = "Notification", fn: str = "on_event", **auth: str
) -> httpx.Response:
    params = {"functionName": fn}
    headers = {"aeg-event-type": kind}
    if "code" in auth:
        params["code"] = auth["code"]
    if "sas" in auth:
        headers["aeg-sas-key"] = auth["sas"]
    if "header_key" in auth:
        headers["x-functions-key"] = auth["header_key"]
    return httpx.post(host.base_url + "/runtime/webhooks/eventgrid", params=params, headers=headers, json=body)


def test_subscription_validation_handshake(grid_host: tuple[DevHost, list[Any], dict[str, int]]) -> None:
    """SubscriptionValidation answers {"validationResponse": code} without invoking the function."""
    host, events, _ = grid_host
    validation = _event("v1", "Microsoft.EventGrid.SubscriptionValidationEvent")
    validation["data"] = {"validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6", "validationUrl": "https://x"}
    response = _webhook(host, [validation], kind="SubscriptionValidation", code=host.event_grid_system_key)
    assert response.status_code == 200
    assert response.json() == {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}
    assert events == []


@pytest.mark.parametrize(
    ("auth", "status"),
    [
        ({"sas": "sas-key-for-tests"}, 200),
        ({"code": "SYSTEM"}, 202),
        ({"header_key": "SYSTEM"}, 202),
        ({"code": "MASTER"}, 202),
        ({}, 401),
        ({"sas": "wrong"}, 401),
        ({"code": "FUNCTION"}, 401),
    ],
)
def test_webhook_auth(grid_host: tuple[DevHost, list[Any], dict[str, int]], auth: dict[str, str], status: int) -> None:
    """The system key (or master key): 202 as the host's webhook; aeg-sas-key equal to LOCAL_EVENT_KEY: 200
    as the Event Grid topic the dev host stands in for; anything else is 401."""
    host, events, _ = grid_host
    replace = {
        "SYSTEM": host.event_grid_system_key,
        "MASTER": host.master_key,
        "FUNCTION": host.function_keys()["on_event"],
    }
    auth = {k: replace.get(v, v) for k, v in auth.items()}
    response = _webhook(host, [_event("e-auth")], **auth)
    assert response.status_code == status
    assert len(events) == (0 if status == 401 else 1)


def test_notification_invokes_once_per_event_with_real_objects(
    grid_host: tuple[DevHost, list[Any], dict[str, int]],
) -> None:
    """Each event of the array becomes one invocation with a func.EventGridEvent."""
    host, events, _ = grid_host
    response = _webhook(host, [_event("e1"), _event("e2")], code=host.event_grid_system_key)
    assert response.status_code == 202
    assert [e.id for e in events] == ["e1", "e2"]
    first = events[0]
    assert isinstance(first, func.EventGridEvent)
    assert first.event_type == "Microsoft.MachineLearningServices.RunCompleted"
    assert first.subject == "experiments/e1/runs/run-1"
    assert first.get_json() == {"runId": "run-1", "runStatus": "Completed"}
    assert first.event_time == dt.datetime(2026, 1, 2, 3, 4, 5, 123000, tzinfo=dt.UTC)
    assert first.data_version == "2"


def test_cloud_events_are_accepted(grid_host: tuple[DevHost, list[Any], dict[str, int]]) -> None:
    """A CloudEvents array reaches an EventGridEvent function mapped, and a CloudEvent function as is."""
    host, events, _ = grid_host
    cloud = {
        "specversion": "1.0",
        "id": "c1",
        "source": "/tunegrid/local",
        "type": "Tunegrid.Test",
        "time": "2026-01-02T03:04:05Z",
        "subject": "runs/r1",
        "data": {"k": 1},
    }
    assert _webhook(host, [cloud], sas="sas-key-for-tests").status_code == 200
    assert _webhook(host, [cloud], fn="on_cloud_event", sas="sas-key-for-tests").status_code == 200
    mapped, native = events
    assert isinstance(mapped, func.EventGridEvent)
    assert (mapped.event_type, mapped.topic, mapped.get_json()) == ("Tunegrid.Test", "/tunegrid/local", {"k": 1})
    assert isinstance(native, func.CloudEvent)
    assert (native.type, native.source, native.get_json()) == ("Tunegrid.Test", "/tunegrid/local", {"k": 1})


@pytest.mark.parametrize(
    ("kind", "body", "fn", "status"),
    [
        ("Notification", [_event("x")], "nope", 404),
        ("Notification", {"not": "events"}, "on_event", 400),
        ("Notification", "garbage", "on_event", 400),
        ("Bogus", [_event("x")], "on_event", 400),
        ("Unsubscribe", [], "on_event", 202),
        ("Notification", [{"id": "no-type"}], "on_event", 400),
    ],
)
def test_webhook_rejects_bad_requests(
    grid_host: tuple[DevHost, list[Any], dict[str, int]], kind: str, body: Any, fn: str, status: int
) -> None:
    """Unknown function 404, a body that is not an event array or an unknown aeg-event-type 400."""
    host, events, _ = grid_host
    assert _webhook(host, body, kind=kind, fn=fn, code=host.event_grid_system_key).status_code == status
    assert events == []


def test_failing_event_is_retried_then_succeeds(grid_host: tuple[DevHost, list[Any], dict[str, int]]) -> None:
    """Two failures then success: three invocations, 202, nothing dead-lettered."""
    host, events, failures = grid_host
    failures["flaky"] = 2
    assert _webhook(host, [_event("flaky")], code=host.event_grid_system_key).status_code == 202
    assert [e.id for e in events] == ["flaky"] * 3
    assert not (host.state_dir / "deadletter" / "on_event" / "flaky.json").exists()


def test_failing_event_is_dead_lettered_and_answered_500(grid_host: tuple[DevHost, list[Any], dict[str, int]]) -> None:
    """After three failed tries the event is parked with its error and the sender gets 500 (its own retry)."""
    host, events, failures = grid_host
    failures["bad"] = 99
    response = _webhook(host, [_event("ok-1"), _event("bad")], sas="sas-key-for-tests")
    assert response.status_code == 500
    assert [e.id for e in events] == ["ok-1", "bad", "bad", "bad"]
    parked = json.loads((host.state_dir / "deadletter" / "on_event" / "bad.json").read_text())
    assert parked["id"] == "bad"
    assert parked["deadLetterReason"] == "MaxDeliveryAttemptsExceeded"
    assert parked["deliveryAttempts"] == 3
    assert "handler failed for bad" in parked["lastDeliveryOutcome"]
    assert len(parked["invocationIds"]) == 3


def test_event_grid_publisher_client_delivers_with_its_sas_key(
    grid_host: tuple[DevHost, list[Any], dict[str, int]],
) -> None:
    """The SDK's EventGridPublisherClient + AzureKeyCredential (what the local backend uses) is accepted,
    with or without the aeg-event-type header (the SDK raises on anything but 200)."""
    from azure.core.credentials import AzureKeyCredential
    from azure.eventgrid import EventGridEvent, EventGridPublisherClient

    host, events, _ = grid_host
    client = EventGridPublisherClient(
        host.base_url + "/runtime/webhooks/eventgrid?functionName=on_event", AzureKeyCredential("sas-key-for-tests")
    )
    client.send(
        EventGridEvent(subject="jobs/j1", event_type="Tunegrid.JobCompleted", data={"job": "j1"}, data_version="1")
    )
    client.send(
        [EventGridEvent(subject="jobs/j2", event_type="Tunegrid.JobCompleted", data={}, data_version="1")],
        headers={"aeg-event-type": "Notification"},
    )
    assert [(e.subject, e.event_type) for e in events] == [
        ("jobs/j1", "Tunegrid.JobCompleted"),
        ("jobs/j2", "Tunegrid.JobCompleted"),
    ]
    assert events[0].get_json() == {"job": "j1"}


# -------------------------------------------------------------------------------- timer triggers
def timer_app(
    fired: list[func.TimerRequest],
    *,
    schedule: str,
    run_on_startup: bool = False,
    sleep_s: float = 0.0,
    overlaps: list[func.TimerRequest] | None = None,
) -> func.FunctionApp:
    """A timer function that records each invocation; `sleep_s` makes each run that long (a slow job), and
    an invocation that starts while another runs is recorded in `overlaps` (the host swallows errors)."""
    app = func.FunctionApp()
    running = threading.Semaphore(1)

    @app.timer_trigger(arg_name="timer", schedule=schedule, run_on_startup=run_on_startup)
    def tick(timer: func.TimerRequest) -> None:
        if not running.acquire(blocking=False):
            if overlaps is not None:
                overlaps.append(timer)
            raise AssertionError("two invocations of one timer at once")
        try:
            fired.append(timer)
            time.sleep(sleep_s)
        finally:
            running.release()

    return app


def test_timer_fires_on_a_setting_schedule(tmp_path: Path) -> None:
    """`%TEST_TICK_SCHEDULE%` resolves from settings; a 1-second NCRONTAB timer fires repeatedly."""
    fired: list[func.TimerRequest] = []
    app = timer_app(fired, schedule="%TEST_TICK_SCHEDULE%")
    with DevHost(app, settings={"TEST_TICK_SCHEDULE": "*/1 * * * * *"}, port=0, state_dir=tmp_path) as host:
        assert host.routes()[0]["schedule"] == "*/1 * * * * *"
        wait_for(lambda: len(fired) >= 2, timeout_s=6, what="two ticks")
    first = fired[0]
    assert isinstance(first, func.TimerRequest)
    assert first.schedule == {"AdjustForDST": True}
    assert set(first.schedule_status) == {"Last", "Next", "LastUpdated"}
    assert "TEST_TICK_SCHEDULE" not in os.environ  # settings the host added are removed on stop


def test_run_on_startup_fires_at_once(tmp_path: Path) -> None:
    """run_on_startup invokes immediately (not past due) even when the schedule is a year away."""
    fired: list[func.TimerRequest] = []
    with DevHost(
        timer_app(fired, schedule="0 0 0 1 1 *", run_on_startup=True), settings={}, port=0, state_dir=tmp_path
    ):
        wait_for(lambda: fired, timeout_s=5, what="the startup run")
        # the schedule status is stored once the startup run is over and the next occurrence is set
        status = wait_for(lambda: _timer_status(tmp_path, "tick"), timeout_s=5, what="the stored schedule status")
        assert len(fired) == 1
    assert len(fired) == 1
    assert fired[0].past_due is False
    assert status["last"] is None and dt.datetime.fromisoformat(status["next"]).strftime("%m-%d %H:%M") == "01-01 00:00"


def _timer_status(state_dir: Path, function: str) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / "timers.json").read_text()).get(function)
    except (OSError, ValueError):
        return None


def test_past_due_after_downtime_and_no_overlap(tmp_path: Path) -> None:
    """A restart after a missed occurrence runs past_due=True first; a slow timer never overlaps itself."""
    fired: list[func.TimerRequest] = []
    with DevHost(timer_app(fired, schedule="*/1 * * * * *"), settings={}, port=0, state_dir=tmp_path):
        wait_for(lambda: fired, timeout_s=5, what="a first tick")
    status = json.loads((tmp_path / "timers.json").read_text())["tick"]
    assert status["schedule"] == "*/1 * * * * *"
    missed = dt.datetime.fromisoformat(status["next"])
    # the host stays down until the clock has passed the occurrence it had scheduled
    wait_for(lambda: dt.datetime.now(dt.UTC) > missed, timeout_s=5, what=f"the clock to pass {status['next']}")
    after: list[func.TimerRequest] = []
    overlaps: list[func.TimerRequest] = []
    timings = HostTimings(timer_late_tolerance_s=0.2, shutdown_timeout_s=5.0)
    # each run takes 1.5 s (a slow job), longer than the 1 s schedule: what the no-overlap rule is about
    slow_app = timer_app(after, schedule="*/1 * * * * *", sleep_s=1.5, overlaps=overlaps)
    with DevHost(slow_app, settings={}, port=0, state_dir=tmp_path, timings=timings):
        wait_for(lambda: len(after) >= 3, timeout_s=8, what="three ticks after the restart")
    assert after[0].past_due is True
    assert dt.datetime.fromisoformat(after[0].schedule_status["Last"]) == missed
    assert any(t.past_due for t in after[1:])  # a 1.5 s run overruns the 1 s schedule: the next one is late
    assert overlaps == []


def test_admin_api_runs_a_timer_now(tmp_path: Path) -> None:
    """POST /admin/functions/NAME with the master key runs a timer at once (202), as on the host."""
    fired: list[func.TimerRequest] = []
    with DevHost(timer_app(fired, schedule="0 0 0 1 1 *"), settings={}, port=0, state_dir=tmp_path) as host:
        url = host.base_url + "/admin/functions/tick"
        assert httpx.post(url, json={"input": ""}).status_code == 401
        assert (
            httpx.post(
                host.base_url + "/admin/functions/nope", headers={"x-functions-key": host.master_key}
            ).status_code
            == 404
        )
        assert httpx.post(url, json={"input": ""}, headers={"x-functions-key": host.master_key}).status_code == 202
        wait_for(lambda: fired, timeout_s=5, what="the requested run")
    assert len(fired) == 1 and fired[0].past_due is False


@pytest.mark.parametrize(
    ("schedule", "settings", "error"),
    [
        ("* * * * *", {}, "6-field"),
        ("61 * * * * *", {}, "not a valid"),
        ("%MISSING_SCHEDULE%", {}, "MISSING_SCHEDULE"),
    ],
)
def test_bad_timer_schedules_disable_the_function(
    tmp_path: Path, schedule: str, settings: dict[str, str], error: str
) -> None:
    """A 5-field, invalid or unresolved schedule disables that function with the reason, as the host does."""
    with DevHost(timer_app([], schedule=schedule), settings=settings, port=0, state_dir=tmp_path) as host:
        [entry] = host.routes()
    assert entry["status"] == "error"
    assert error in entry["error"]


def test_timer_interval_schedule() -> None:
    """A TimeSpan schedule (hh:mm:ss) is an interval; NCRONTAB honours the seconds field."""
    start = dt.datetime(2026, 1, 1, 0, 0, 0, tzinfo=dt.UTC)
    assert TimerSchedule("00:00:30").next_after(start) == start + dt.timedelta(seconds=30)
    assert TimerSchedule("0 */15 * * * *").next_after(start) == start + dt.timedelta(minutes=15)
    assert TimerSchedule("*/5 * * * * *").next_after(start) == start + dt.timedelta(seconds=5)


# ------------------------------------------------------------------------------------- settings
def test_local_settings_values_and_sample_fallback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Values are read from local.settings.json; without it the sample is used and the user is told."""
    sample = {"IsEncrypted": False, "Values": {"A": "sample", "FLAG": True, "N": 3, "NONE": None}}
    (tmp_path / "local.settings.sample.json").write_text(json.dumps(sample))
    with caplog.at_level(logging.WARNING):
        loaded = load_local_settings(root=tmp_path)
    assert loaded.from_sample and "local.settings.sample.json" in caplog.text
    assert dict(loaded.values) == {"A": "sample", "FLAG": "true", "N": "3"}
    (tmp_path / "local.settings.json").write_text(
        json.dumps({"Values": {"A": "real"}, "Host": {"LocalHttpPort": 7123}})
    )
    loaded = load_local_settings(root=tmp_path)
    assert (dict(loaded.values), loaded.from_sample, loaded.local_http_port) == ({"A": "real"}, False, 7123)
    with pytest.raises(ConfigError):
        load_local_settings(tmp_path / "missing.json")


def test_environment_wins_over_file_values() -> None:
    """Core Tools semantics: a variable already in the environment is not overwritten."""
    env = {"KEEP": "env"}
    assert apply_to_environ({"KEEP": "file", "NEW": "file"}, env) == ["NEW"]
    assert env == {"KEEP": "env", "NEW": "file"}


def _refuses_connections(url: str) -> bool:
    """True once the listening socket is closed; a connection caught mid-shutdown just means "not yet"."""
    try:
        httpx.get(url + "/api/seen", timeout=2)
    except httpx.ConnectError:
        return True
    except httpx.TransportError:
        return False
    return False


def test_cli_loads_settings_before_import_and_stops_gracefully(tmp_path: Path) -> None:
    """`python -m tunegrid devhost`: settings are in os.environ at import, an in-flight request finishes on
    SIGTERM, and the process exits 0; --show-keys prints the stored keys."""
    (tmp_path / "cli_app.py").write_text(
        textwrap.dedent(
            """
            import os, time
            import azure.functions as func

            SEEN = {name: os.environ.get(name) for name in ("FROM_FILE", "OVERRIDDEN")}
            app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

            @app.route(route="seen")
            def seen(req: func.HttpRequest) -> func.HttpResponse:
                return func.HttpResponse(repr(sorted(SEEN.items())))

            @app.route(route="slow")
            def slow(req: func.HttpRequest) -> func.HttpResponse:
                # in flight until the test has seen the host stop accepting connections
                open("started", "w").close()
                deadline = time.monotonic() + 20
                while not os.path.exists("release") and time.monotonic() < deadline:
                    time.sleep(0.02)
                return func.HttpResponse("finished")
            """
        )
    )
    (tmp_path / "local.settings.json").write_text(json.dumps({"Values": {"FROM_FILE": "file", "OVERRIDDEN": "file"}}))
    env = {**os.environ, "OVERRIDDEN": "env", "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "tunegrid", "devhost", "--app", "cli_app:app", "--state-dir", str(tmp_path / "state")]
    proc = subprocess.Popen(
        [*base, "--port", "0"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        url = None
        assert proc.stdout is not None
        for line in proc.stdout:
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                url = found.group(1)
                break
        assert url, proc.stderr.read() if proc.stderr else ""
        assert httpx.get(url + "/api/seen").text == repr([("FROM_FILE", "file"), ("OVERRIDDEN", "env")])
        result: dict[str, httpx.Response] = {}
        slow = threading.Thread(target=lambda: result.setdefault("r", httpx.get(url + "/api/slow", timeout=30)))
        slow.start()
        wait_for(lambda: (tmp_path / "started").exists(), what="the slow request to be in flight")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _refuses_connections(url), what="the host to stop accepting connections")
        assert "r" not in result  # still in flight while the host shuts down
        (tmp_path / "release").touch()
        slow.join(10)
        assert proc.wait(15) == 0
        assert result["r"].text == "finished"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shown = subprocess.run([*base, "--show-keys"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    stored = json.loads((tmp_path / "state" / "keys.json").read_text())
    assert stored["masterKey"] in shown.stdout
    assert stored["functionKeys"]["slow"]["default"] in shown.stdout
