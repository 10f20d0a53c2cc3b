"""Every binding of `function_app.app`, read as the worker sends it to the host: wiring mistakes
that a host would only find at start-up fail here."""

from __future__ import annotations

from typing import Any

import pytest

from shared.settings import SETTINGS, STORAGE_CONNECTION
from tunegrid.appindex import functions_of, raw_bindings


@pytest.fixture(scope="module")
def bindings() -> dict[str, list[dict[str, Any]]]:
    from function_app import app

    return {fn.get_function_name(): raw_bindings(fn) for fn in functions_of(app)}


def _trigger(bindings: dict[str, list[dict[str, Any]]], name: str) -> dict[str, Any]:
    [trigger] = [b for b in bindings[name] if b["type"].endswith("Trigger")]
    return trigger


EXPECTED = {
    "ingest_dataset": "blobTrigger",
    "job_events": "eventGridTrigger",
    "rollout_tick": "timerTrigger",
    "janitor": "timerTrigger",
    "chat_completions": "httpTrigger",
    "list_models": "httpTrigger",
    "score": "httpTrigger",
    "runs_list": "httpTrigger",
    "run_status": "httpTrigger",
}


def test_every_expected_function_is_registered(bindings: dict[str, list[dict[str, Any]]]) -> None:
    """The app exposes exactly the functions the README documents, each with its trigger type."""
    assert {name: _trigger(bindings, name)["type"] for name in bindings} == EXPECTED


def test_ingest_blob_trigger(bindings: dict[str, list[dict[str, Any]]]) -> None:
    """Event Grid source (Flex Consumption), the data connection, an SDK-typed client."""
    t = _trigger(bindings, "ingest_dataset")
    assert t["path"] == "training-data/{name}"
    assert t["connection"] == STORAGE_CONNECTION
    assert t["source"] == "EventGrid"
    assert t["direction"].lower() == "in"


def test_ingest_declares_the_sdk_typed_blob_client() -> None:
    """The worker passes an SDK `BlobClient` (deferred binding) only when the parameter is typed so:
    then the host never loads the blob into memory."""
    import inspect

    import azurefunctions.extensions.bindings.blob as blob

    from function_app import app

    [fn] = [f for f in functions_of(app) if f.get_function_name() == "ingest_dataset"]
    annotation = inspect.signature(fn.get_user_function()).parameters["client"].annotation
    assert annotation in (blob.BlobClient, "blob.BlobClient")


def test_timer_schedules_come_from_settings(bindings: dict[str, list[dict[str, Any]]]) -> None:
    """Schedules are app-setting references, and those settings exist with 6-field defaults."""
    names = {s.name: s.default for s in SETTINGS}
    for fn, setting in (("rollout_tick", "ROLLOUT_SCHEDULE"), ("janitor", "JANITOR_SCHEDULE")):
        t = _trigger(bindings, fn)
        assert t["schedule"] == f"%{setting}%"
        assert len(names[setting].split()) == 6


@pytest.mark.parametrize(
    ("fn", "route", "methods", "auth"),
    [
        ("chat_completions", "v1/chat/completions", ["post"], "anonymous"),
        ("list_models", "v1/models", ["get"], "anonymous"),
        ("score", "score", ["post"], "anonymous"),
        ("runs_list", "runs", ["get"], "function"),
        ("run_status", "runs/{run_id}", ["get"], "function"),
    ],
)
def test_http_routes(
    bindings: dict[str, list[dict[str, Any]]], fn: str, route: str, methods: list[str], auth: str
) -> None:
    """Routes, methods and auth levels. The chat routes are anonymous at the host because the
    openai client sends `Authorization: Bearer`; the function checks the key itself."""
    t = _trigger(bindings, fn)
    assert t["route"] == route
    assert sorted(m.lower() for m in t["methods"]) == methods
    assert t["authLevel"].lower() == auth
    [out] = [b for b in bindings[fn] if b["type"] == "http" and b["direction"].lower() == "out"]
    assert out["name"] == "$return"


def test_event_grid_trigger(bindings: dict[str, list[dict[str, Any]]]) -> None:
    """The rollout listens on an Event Grid trigger named as the subscription expects."""
    t = _trigger(bindings, "job_events")
    assert t["name"] == "event"
