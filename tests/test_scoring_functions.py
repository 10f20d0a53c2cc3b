"""The chat blueprint itself: bindings as the host sees them, error mapping to OpenAI-style objects,
and the once-per-process service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import azure.functions as func
import orjson
import pytest

from functions import chat
from shared.bootstrap import AppContext, set_app_context
from shared.errors import ConfigError, InvalidInput, NotFound, TransientError, UpstreamError
from shared.usecases.scoring import (
    InvalidRequest,
    ModelNotFound,
    NoLiveModel,
    PayloadTooLarge,
    QueueRejected,
    Reply,
    Unauthorized,
    UpstreamBusy,
    UpstreamRejected,
)
from tests.scoring_support import PROXY_KEY, MemoryLedger, proxy_settings


def test_bindings() -> None:
    """Three anonymous HTTP triggers on the documented routes (the functions check keys themselves)."""
    app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
    app.register_functions(chat.bp)
    found = {}
    for fn in app.get_functions():
        [trigger] = [json.loads(b) for b in fn.get_raw_bindings() if json.loads(b)["type"] == "httpTrigger"]
        found[fn.get_function_name()] = (trigger["route"], trigger["methods"], trigger["authLevel"])
    assert found == {
        "chat_completions": ("v1/chat/completions", ["POST"], "ANONYMOUS"),
        "score": ("score", ["POST"], "ANONYMOUS"),
        "list_models": ("v1/models", ["GET"], "ANONYMOUS"),
    }


@pytest.mark.parametrize(
    ("error", "status", "kind", "code"),
    [
        (PayloadTooLarge("big"), 413, "invalid_request_error", "request_too_large"),
        (InvalidRequest("bad", param="n", code="invalid_value"), 400, "invalid_request_error", "invalid_value"),
        (InvalidInput("bad"), 400, "invalid_request_error", None),
        (Unauthorized("who"), 401, "invalid_request_error", "invalid_api_key"),
        (ModelNotFound("none"), 404, "invalid_request_error", "model_not_found"),
        (NotFound("none"), 404, "invalid_request_error", "model_not_found"),
        (NoLiveModel("none live"), 503, "service_unavailable", "no_live_model"),
        (UpstreamRejected("rejected", status=422), 400, "invalid_request_error", "upstream_rejected"),
        (UpstreamBusy("busy", retry_after=2.5), 429, "rate_limit_error", "upstream_busy"),
        (QueueRejected("queue full", retry_after=2.5, code="queue_full"), 429, "rate_limit_error", "queue_full"),
        (UpstreamError("slow", timeout=True), 504, "upstream_error", "upstream_timeout"),
        (UpstreamError("down", status=500), 502, "upstream_error", "upstream_error"),
        (TransientError("later"), 503, "service_unavailable", "temporarily_unavailable"),
        (ConfigError("PROXY_MAX_BODY_BYTES must be an integer"), 500, "server_error", "configuration_error"),
    ],
)
def test_errors_map_to_openai_error_objects(error: Exception, status: int, kind: str, code: str | None) -> None:
    """Each domain error has its status, type and code; the request id is in the header and the body."""
    response = chat.error_response(error, "rid123")
    body = orjson.loads(response.body)["error"]
    assert response.status_code == status
    assert (body["type"], body["code"], body["request_id"]) == (kind, code, "rid123")
    assert body["message"] == str(error)
    assert response.headers["x-request-id"] == "rid123"
    if status == 429:
        assert response.headers["Retry-After"] == "3"
    if isinstance(error, InvalidRequest):
        assert body["param"] == "n"


class ExplodingService:
    """A ScoringService stand-in whose use case fails unexpectedly."""

    def authorize(self, authorization: str | None, functions_key: str | None) -> None:
        if authorization != f"Bearer {PROXY_KEY}":
            raise Unauthorized("invalid API key")

    max_body_bytes = 1024

    async def chat(self, body: bytes, *, selector: str | None, request_id: str) -> Reply:
        raise RuntimeError("internal detail: /secret/path")


@pytest.fixture
def pinned() -> Iterator[None]:
    chat.set_scoring_service(ExplodingService())  # type: ignore[arg-type]
    yield
    chat.set_scoring_service(None)


def request(headers: dict[str, str], body: Any = None) -> Any:
    """The FastAPI request the worker hands the function, over a client that sends the body and stays."""
    from starlette.requests import Request

    messages = [{"type": "http.request", "body": orjson.dumps(body or {}), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/v1/chat/completions",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive)


def test_unexpected_errors_are_500_without_details(pinned: None, caplog: pytest.LogCaptureFixture) -> None:
    """A bug becomes a 500 that names only the request id; the details go to the log."""
    response = asyncio.run(chat.chat_completions(request({"authorization": f"Bearer {PROXY_KEY}"})))
    body = orjson.loads(response.body)["error"]
    assert response.status_code == 500 and body["code"] == "internal_error"
    assert "secret" not in body["message"] and body["request_id"] in body["message"]
    assert "internal detail" in caplog.text


def test_auth_runs_before_the_use_case(pinned: None) -> None:
    """Without the right key the use case is never called (401, not 500)."""
    response = asyncio.run(chat.chat_completions(request({"authorization": "Bearer nope"})))
    assert response.status_code == 401


def test_a_client_that_hangs_up_while_waiting_cancels_its_call() -> None:
    """The function notices the disconnect while the use case still waits (queued or generating) and
    cancels it, so it leaves the queue and its upstream call is closed."""
    cancelled = asyncio.Event()

    class Waiting(ExplodingService):
        async def chat(self, body: bytes, *, selector: str | None, request_id: str) -> Reply:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            raise AssertionError("unreachable")

    async def scenario() -> int:
        messages: list[dict[str, Any]] = [{"type": "http.request", "body": b"{}", "more_body": False}]
        hang_up = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await hang_up.wait()
            return {"type": "http.disconnect"}

        from starlette.requests import Request

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/api/v1/chat/completions",
            "query_string": b"",
            "headers": [(b"authorization", f"Bearer {PROXY_KEY}".encode())],
        }
        call = asyncio.ensure_future(chat.chat_completions(Request(scope, receive)))
        await asyncio.sleep(0.05)
        assert not call.done()
        hang_up.set()
        response = await asyncio.wait_for(call, 5)
        assert cancelled.is_set()
        return response.status_code

    chat.set_scoring_service(Waiting())  # type: ignore[arg-type]
    try:
        assert asyncio.run(scenario()) == chat.CLIENT_GONE
    finally:
        chat.set_scoring_service(None)


def test_service_is_built_once_per_app_context() -> None:
    """The service is built on first use, reused, and rebuilt only when the app context is replaced."""
    chat.set_scoring_service(None)
    ctx = AppContext(
        proxy_settings(), overrides={"ledger": MemoryLedger([]), "backend": object(), "usage_table": object()}
    )
    set_app_context(ctx)
    try:
        first = chat.scoring_service()
        assert chat.scoring_service() is first
        set_app_context(AppContext(proxy_settings(), overrides=dict(ctx.overrides)))
        assert chat.scoring_service() is not first
    finally:
        set_app_context(None)
        chat.set_scoring_service(None)


def test_request_ids_are_unique() -> None:
    """Request ids never repeat within a process."""
    ids = {chat.new_request_id() for _ in range(10000)}
    assert len(ids) == 10000
