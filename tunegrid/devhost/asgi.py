"""The dev host's HTTP front: one raw ASGI callable (no framework routing per request).

- `/{routePrefix}/...`: HTTP functions, with the host's auth levels (`x-functions-key` header or `code`
  query; anonymous / function / admin) and real `func.HttpRequest` / `func.HttpResponse` objects, or,
  for an app that uses HTTP streams (azurefunctions-extensions-http-fastapi), a FastAPI `Request` over
  the live connection and any FastAPI response, sent as the function produces it (as the worker's
  own uvicorn app does);
- `/runtime/webhooks/eventgrid`: Event Grid triggers (system key, or `aeg-sas-key` equal to
  `LOCAL_EVENT_KEY`);
- `/runtime/topics/run-events`: the stand-in for the app's run-events topic (`tunegrid.devhost.topic`);
- `/admin/host/ping` (anonymous), `/admin/host/status`, `/admin/functions` and
  `POST /admin/functions/{name}` (master key) as on the host.

The per-request path does one dict lookup (or a regex for templated routes), builds the request
object, awaits `async def` functions on the loop and runs plain ones in the thread pool.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import azure.functions as func

from tunegrid.devhost.catalog import FunctionSpec
from tunegrid.devhost.eventgrid import EventGridDispatcher
from tunegrid.devhost.invoker import Invoker
from tunegrid.devhost.keys import key_matches
from tunegrid.devhost.routing import RouteTable
from tunegrid.devhost.topic import TOPIC_PATH, RunEventsTopic

log = logging.getLogger("tunegrid.devhost")

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[Mapping[str, Any]], Awaitable[None]]

_JSON = b"application/json; charset=utf-8"
_TEXT = b"text/plain; charset=utf-8"
_EMPTY_HEADERS: list[tuple[bytes, bytes]] = []


async def _reply(send: Send, status: int, body: bytes = b"", content_type: bytes = _TEXT) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if body:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _query(raw: bytes) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        params[name] = f"{params[name]},{value}" if name in params else value
    return params


def _headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


class _BodyTooLarge(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise _BodyTooLarge
        return body
    parts = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        parts.append(chunk)
    return b"".join(parts)


def _content_length(raw: list[tuple[bytes, bytes]]) -> int:
    for name, value in raw:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def response_parts(result: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body the host would send for a function's return value."""
    if isinstance(result, func.HttpResponse):
        headers: list[tuple[bytes, bytes]] = []
        has_type = False
        for name, value in result.headers.items() if len(result.headers) else ():
            lowered = name.lower()
            if lowered == "content-length":
                continue
            has_type |= lowered == "content-type"
            headers.append((lowered.encode("latin-1"), str(value).encode("latin-1")))
        body = result.get_body() or b""
        if not has_type:
            mimetype = result.mimetype or "text/plain"
            content_type = f"{mimetype}; charset={result.charset}" if mimetype.startswith("text/") else mimetype
            headers.append((b"content-type", content_type.encode("latin-1")))
        headers.append((b"content-length", str(len(body)).encode()))
        return int(result.status_code), headers, body
    if result is None:
        return 204, [], b""
    if isinstance(result, str):
        body = result.encode("utf-8")
        return 200, [(b"content-type", _TEXT), (b"content-length", str(len(body)).encode())], body
    if isinstance(result, (bytes, bytearray, memoryview)):
        body = bytes(result)
        return 200, [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(body)).encode())], body
    raise TypeError(f"an HTTP function returned {type(result).__name__}; return func.HttpResponse")


def _log_failure(spec: FunctionSpec, invocation_id: str, exc: Exception) -> None:
    """The host's line for a failed HTTP invocation (an id is made here when the call had none: uuid4 costs ~5 us)."""
    invocation_id = invocation_id or str(uuid.uuid4())
    log.error(
        "Executed 'Functions.%s' (Failed, Id=%s): %s: %s",
        spec.name,
        invocation_id,
        type(exc).__name__,
        exc,
        exc_info=exc,
        extra={"invocation_id": invocation_id, "function": spec.name},
    )


class HostAsgiApp:
    """Routes requests to HTTP functions, the Event Grid webhook and the admin API."""

    def __init__(
        self,
        *,
        routes: RouteTable,
        invoker: Invoker,
        event_grid: EventGridDispatcher | None,
        event_grid_keys: Callable[[], tuple[bytes, ...]],
        event_sas_key: Callable[[], bytes],
        admin_keys: Callable[[], tuple[bytes, ...]],
        admin_functions: Callable[[], list[dict[str, Any]]],
        invoke_by_name: Callable[[str, bytes], Awaitable[int]],
        run_events_topic: RunEventsTopic | None = None,
        max_body_bytes: int = 100 * 1024 * 1024,
    ) -> None:
        self.routes = routes
        self._invoker = invoker
        self._event_grid = event_grid
        self._event_grid_keys = event_grid_keys
        self._event_sas_key = event_sas_key
        self._admin_keys = admin_keys
        self._admin_functions = admin_functions
        self._invoke_by_name = invoke_by_name
        self._run_events_topic = run_events_topic
        self._max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        found = self.routes.match(path, method)
        if found is not None and not path.startswith(("/runtime/", "/admin/")):
            route, route_params = found
            await self._function(scope, receive, send, route.payload, route_params)
            return
        lowered = path.lower()
        if lowered.startswith("/runtime/webhooks/eventgrid"):
            await self._webhook(scope, receive, send)
        elif lowered.rstrip("/") == TOPIC_PATH and self._run_events_topic is not None:
            await self._topic(scope, receive, send, self._run_events_topic)
        elif lowered.startswith("/admin/"):
            await self._admin(scope, receive, send, lowered)
        elif path == "/":
            await _reply(send, 200, b"Your Functions app is up and running (Tunegrid dev host).")
        else:
            await _reply(send, 404)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _function(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        payload: tuple[FunctionSpec, tuple[bytes, ...] | None],
        route_params: Mapping[str, str],
    ) -> None:
        spec, accepted = payload
        raw_headers = scope["headers"]
        headers = _headers(raw_headers)
        raw_query: bytes = scope["query_string"]
        params = _query(raw_query) if raw_query else {}
        if accepted is not None:
            candidate = headers.get("x-functions-key") or params.get("code")
            if not key_matches(candidate.encode("latin-1") if candidate else None, accepted):
                await _reply(send, 401)
                return
        if _content_length(raw_headers) > self._max_body:
            await _reply(send, 413)
            return
        if spec.http_streams:
            await self._streams_function(scope, receive, send, spec, route_params)
            return
        try:
            body = await _read_body(receive, self._max_body)
        except _BodyTooLarge:
            await _reply(send, 413)
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        host = headers.get("host") or "127.0.0.1"
        url = f"http://{host}{raw_path.decode('latin-1')}"
        if raw_query:
            url = f"{url}?{raw_query.decode('latin-1')}"
        request = func.HttpRequest(
            method=scope["method"],
            url=url,
            headers=headers,
            params=params,
            route_params=route_params,
            body=body,
        )
        invocation_id = ""  # made only when the function takes a context, or fails: uuid4 costs ~5 us
        if spec.wants_context:
            invocation_id = str(uuid.uuid4())
            kwargs = self._invoker.arguments(spec, request, invocation_id)
        else:
            kwargs = {spec.trigger_param: request}
        try:
            result = await self._invoker.call(spec, kwargs)
            if callable(result) and not isinstance(result, func.HttpResponse):
                await result(scope, receive, send)  # an ASGI response object (e.g. a streaming response)
                return
            status, out_headers, out_body = response_parts(result)
        except Exception as exc:
            _log_failure(spec, invocation_id, exc)
            await _reply(send, 500)
            return
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        await send({"type": "http.response.body", "body": out_body})

    async def _streams_function(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        spec: FunctionSpec,
        route_params: Mapping[str, str],
    ) -> None:
        """An HTTP-streams function (keys and size already checked): it reads the body itself from the
        FastAPI Request, and its response is an ASGI app run on this connection (streamed bodies go out
        as they are produced)."""
        from fastapi.encoders import jsonable_encoder
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response

        # the route parameters, as the worker's RequestSynchronizer puts them in the request's path_params
        request = Request({**scope, "path_params": dict(route_params)}, receive)  # type: ignore[arg-type]
        invocation_id = str(uuid.uuid4()) if spec.wants_context else ""
        if spec.wants_context:
            kwargs = self._invoker.arguments(spec, request, invocation_id)
        else:
            kwargs = {spec.trigger_param: request}
        try:
            result = await self._invoker.call(spec, kwargs)
            if isinstance(result, func.HttpResponse):
                raise TypeError("an HTTP-streams function returned func.HttpResponse; return a FastAPI response")
            if not isinstance(result, Response):
                result = JSONResponse(jsonable_encoder(result))  # what FastAPI does with a plain return value
            await result(scope, receive, send)
        except Exception as exc:
            _log_failure(spec, invocation_id, exc)
            with contextlib.suppress(Exception):  # the response may have started: then only the log says it
                await _reply(send, 500)

    async def _webhook(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = _headers(scope["headers"])
        query = _query(scope["query_string"])
        sas = headers.get("aeg-sas-key")
        key = headers.get("x-functions-key") or query.get("code")
        by_key = key_matches(key.encode("latin-1") if key else None, self._event_grid_keys())
        sas_key = self._event_sas_key()
        by_sas = bool(sas_key) and key_matches(sas.encode("latin-1") if sas else None, (sas_key,))
        if not (by_key or by_sas):
            await _reply(send, 401)
            return
        if self._event_grid is None:
            await _reply(send, 404, b'{"error": "the app has no Event Grid functions"}', _JSON)
            return
        try:
            body = await _read_body(receive, self._max_body)
        except _BodyTooLarge:
            await _reply(send, 413)
            return
        # With aeg-sas-key the sender is a publisher (EventGridPublisherClient) and the dev host stands in
        # for the Event Grid topic as well: it answers 200 as a topic does, not the webhook's 202.
        reply = await self._event_grid.handle(scope["method"], query, headers, body, as_topic=by_sas and not by_key)
        out = [(b"content-length", str(len(reply.body)).encode())]
        if reply.body:
            out.append((b"content-type", reply.content_type.encode()))
        out.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers)
        await send({"type": "http.response.start", "status": reply.status, "headers": out})
        await send({"type": "http.response.body", "body": reply.body})

    async def _topic(self, scope: Scope, receive: Receive, send: Send, topic: RunEventsTopic) -> None:
        try:
            body = await _read_body(receive, self._max_body)
        except _BodyTooLarge:
            await _reply(send, 413)
            return
        reply = await topic.handle(scope["method"], _headers(scope["headers"]), body)
        await _reply(send, reply.status, reply.body, reply.content_type.encode() if reply.body else _TEXT)

    async def _admin(self, scope: Scope, receive: Receive, send: Send, lowered: str) -> None:
        if lowered == "/admin/host/ping":
            await _reply(send, 200)
            return
        headers = _headers(scope["headers"])
        key = headers.get("x-functions-key") or _query(scope["query_string"]).get("code")
        if not key_matches(key.encode("latin-1") if key else None, self._admin_keys()):
            await _reply(send, 401)
            return
        method = scope["method"]
        if lowered == "/admin/host/status" and method == "GET":
            body = json.dumps({"state": "Running", "host": "tunegrid-devhost"}).encode()
            await _reply(send, 200, body, _JSON)
        elif lowered == "/admin/functions" and method == "GET":
            await _reply(send, 200, json.dumps(self._admin_functions()).encode(), _JSON)
        elif lowered.startswith("/admin/functions/") and method == "POST":
            name = scope["path"][len("/admin/functions/") :].strip("/")
            try:
                body = await _read_body(receive, self._max_body)
            except _BodyTooLarge:
                await _reply(send, 413)
                return
            status = await self._invoke_by_name(name, body)
            await _reply(send, status)
        else:
            await _reply(send, 404)
