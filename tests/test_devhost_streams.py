"""The dev host serving an app that uses HTTP streams (azurefunctions-extensions-http-fastapi), as the
Python worker does: FastAPI requests over the live connection, route parameters in `path_params`, the
host's key check, responses sent as they are produced, plain return values as JSON, and an HTTP
function written for `func.HttpRequest` disabled at start-up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import httpx
import pytest
from azurefunctions.extensions.http.fastapi import Request, Response, StreamingResponse

from tunegrid.devhost import DevHost
from tunegrid.devhost.host import HostTimings

FAST = HostTimings(shutdown_timeout_s=2.0)


def streams_app(*, with_classic: bool = False) -> func.FunctionApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

    @app.route(route="items/{item_id}", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
    async def item(req: Request) -> Response:
        body = await req.body()
        text = f"{req.path_params['item_id']}:{req.query_params.get('q')}:{body.decode()}"
        return Response(text, media_type="text/plain")

    @app.route(route="ticks", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
    async def ticks(req: Request) -> StreamingResponse:
        async def produce() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(0.3)

        return StreamingResponse(produce(), media_type="text/event-stream")

    @app.route(route="guarded", methods=["GET"])
    def guarded(req: Request) -> Any:
        return {"ok": True, "method": req.method}

    if with_classic:

        @app.route(route="classic", auth_level=func.AuthLevel.ANONYMOUS)
        def classic(req: func.HttpRequest) -> func.HttpResponse:
            return func.HttpResponse("never served")

    return app


@pytest.fixture
def host(tmp_path: Path) -> Iterator[DevHost]:
    with DevHost(streams_app(), settings={}, port=0, state_dir=tmp_path, timings=FAST) as started:
        yield started


def test_fastapi_requests_with_route_parameters_and_query(host: DevHost) -> None:
    """The function reads the body itself; route parameters arrive in path_params as the worker puts them."""
    reply = httpx.post(host.base_url + "/api/items/42?q=x", content=b"payload")
    assert reply.status_code == 200 and reply.text == "42:x:payload"


def test_a_streamed_response_goes_out_as_it_is_produced(host: DevHost) -> None:
    """Each event arrives when the function yields it, not all at the end."""
    arrivals = []
    started = time.monotonic()
    with httpx.stream("GET", host.base_url + "/api/ticks") as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line:
                arrivals.append((line, time.monotonic() - started))
    assert [line for line, _ in arrivals] == ["data: 0", "data: 1", "data: 2"]
    assert arrivals[0][1] < 0.25 and arrivals[-1][1] >= 0.55


def test_function_keys_still_apply_and_plain_values_become_json(host: DevHost) -> None:
    """FUNCTION auth is the host's, before the function runs; a returned dict is sent as JSON, as FastAPI does."""
    assert httpx.get(host.base_url + "/api/guarded").status_code == 401
    key = host.function_keys()["guarded"]
    reply = httpx.get(host.base_url + "/api/guarded", headers={"x-functions-key": key})
    assert reply.status_code == 200 and reply.json() == {"ok": True, "method": "GET"}


def test_a_classic_http_function_in_a_streams_app_is_disabled(tmp_path: Path) -> None:
    """Once an app uses HTTP streams the worker hands every HTTP function a FastAPI Request: one written
    for func.HttpRequest would fail there, so the dev host says so at start-up and does not route it."""
    host = DevHost(streams_app(with_classic=True), settings={}, port=0, state_dir=tmp_path, timings=FAST)
    try:
        entries = {e["function"]: e for e in host.routes()}
        assert entries["classic"]["status"] == "error" and "HTTP streams" in entries["classic"]["error"]
        assert entries["item"]["status"] == "ok"
        assert "DISABLED" in host.describe()
    finally:
        host.stop()
