"""Scoring proxy: `POST /api/score` (Azure ML schema), `POST /api/v1/chat/completions` and
`GET /api/v1/models` (OpenAI-compatible).

HTTP streams: these functions take and return FastAPI objects (`azurefunctions-extensions-http-fastapi`),
so a `stream: true` answer goes out event by event as the model generates it. Importing the extension
switches the whole app to HTTP streams (the worker then hands every HTTP function a FastAPI `Request`
and expects a FastAPI response), which is why `functions/runs.py` uses the same types. Azure needs the
app setting `PYTHON_ENABLE_INIT_INDEXING=1` for it; the dev host serves such functions as the worker does.

Auth: these routes are ANONYMOUS at the host level and check the key themselves. The official
`openai` client sends `Authorization: Bearer <key>`, which the Functions host does not take as a
function key, so host-level FUNCTION auth would refuse it. Each function accepts either that header
or `x-functions-key`, compared in constant time against PROXY_API_KEYS; with no keys configured every
request is refused.

A client that hangs up, while queued or while its answer is generated, is noticed here: its call is
cancelled, which drops it from the queue or closes the upstream call (stopping the generation) and
frees the deployment's slot. The service is built once per process (rebuilt only if the app context
is replaced).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import azure.functions as func
import orjson
from azurefunctions.extensions.http.fastapi import Request, Response, StreamingResponse

from shared.bootstrap import AppContext, app_context
from shared.errors import ConfigError, InvalidInput, NotFound, TransientError, TunegridError, UpstreamError
from shared.usecases.scoring import (
    InvalidRequest,
    ModelNotFound,
    NoLiveModel,
    PayloadTooLarge,
    Reply,
    ScoringService,
    StreamReply,
    Unauthorized,
    UpstreamBusy,
    UpstreamRejected,
)

log = logging.getLogger(__name__)

bp = func.Blueprint()

CLIENT_GONE = 499
"""Status recorded for a request whose client hung up (nobody receives it)."""

_lock = threading.Lock()
_built: tuple[AppContext | None, ScoringService] | None = None
_pinned: ScoringService | None = None


def scoring_service() -> ScoringService:
    """This process's ScoringService: built on first use from `app_context()`, then reused."""
    if _pinned is not None:
        return _pinned
    global _built
    ctx = app_context()
    built = _built
    if built is not None and built[0] is ctx:
        return built[1]
    with _lock:
        if _built is None or _built[0] is not ctx:
            from shared.bootstrap import build_scoring_service

            _built = (ctx, build_scoring_service(ctx))
        return _built[1]


def set_scoring_service(service: ScoringService | None) -> None:
    """Pin a service (tests, benchmarks) or clear it so the next call builds one from the app context."""
    global _pinned, _built
    with _lock:
        _pinned = service
        _built = None


_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """Unique per process and across processes (random per-process prefix + counter); not a secret."""
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


def _selector(req: Request) -> str | None:
    return req.query_params.get("model") or req.headers.get("x-tunegrid-model")


def error_response(exc: BaseException, request_id: str) -> Response:
    """An OpenAI-style error object: {"error": {message, type, param, code, request_id}}."""
    param: str | None = None
    code: str | None
    headers = {"x-request-id": request_id}
    if isinstance(exc, PayloadTooLarge):
        status, kind, code = 413, "invalid_request_error", "request_too_large"
    elif isinstance(exc, InvalidRequest):
        status, kind, code, param = 400, "invalid_request_error", exc.code, exc.param
    elif isinstance(exc, InvalidInput):
        status, kind, code = 400, "invalid_request_error", None
    elif isinstance(exc, Unauthorized):
        status, kind, code = 401, "invalid_request_error", "invalid_api_key"
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(exc, ModelNotFound | NotFound):
        status, kind, code, param = 404, "invalid_request_error", "model_not_found", "model"
    elif isinstance(exc, NoLiveModel):
        status, kind, code = 503, "service_unavailable", "no_live_model"
    elif isinstance(exc, UpstreamRejected):
        status, kind, code = 400, "invalid_request_error", "upstream_rejected"
    elif isinstance(exc, UpstreamBusy):
        status, kind, code = 429, "rate_limit_error", exc.code
        if exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif isinstance(exc, UpstreamError):
        if exc.timeout:
            status, kind, code = 504, "upstream_error", "upstream_timeout"
        else:
            status, kind, code = 502, "upstream_error", "upstream_error"
    elif isinstance(exc, TransientError):
        status, kind, code = 503, "service_unavailable", "temporarily_unavailable"
    elif isinstance(exc, ConfigError):
        status, kind, code = 500, "server_error", "configuration_error"
    else:
        status, kind, code = 500, "server_error", "internal_error"
    if isinstance(exc, TunegridError):
        message = str(exc)
        level = logging.WARNING if status >= 500 else logging.INFO
        log.log(
            level,
            "scoring request %s: %d %s: %s",
            request_id,
            status,
            code,
            message,
            extra={"request_id": request_id, "status": status},
        )
    else:
        log.error("scoring request %s failed", request_id, exc_info=exc, extra={"request_id": request_id})
        message = f"internal error (request id {request_id})"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code, "request_id": request_id}}
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type="application/json")


class EventStream(StreamingResponse):
    """Server-sent events from a `StreamReply`. The client's disconnect is watched while the events
    go out (not only noticed at the next write), and the reply is always closed at the end: that
    closes the upstream call, which stops the generation, and frees the deployment's slot."""

    def __init__(self, reply: StreamReply, headers: Mapping[str, str]) -> None:
        super().__init__(reply, media_type="text/event-stream", headers=headers)
        self._reply = reply

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        sending = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({sending, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sending, gone):
                task.cancel()
            results = await asyncio.gather(sending, gone, return_exceptions=True)
            await self._reply.aclose()
        failure = results[0]
        if isinstance(failure, Exception) and not isinstance(failure, OSError):
            raise failure  # a bug, not a client that went away


async def _body(req: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is larger than `limit`, before it is all read."""
    declared = req.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    parts: list[bytes] = []
    size = 0
    async for chunk in req.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over {limit} bytes, the limit")
        parts.append(chunk)
    return b"".join(parts)


async def _until_gone(req: Request) -> None:
    """Returns when the client disconnects. Started once the body has been read, so it never takes a
    piece of the body (a GET's empty body message is skipped)."""
    while (await req.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(req: Request, call: Awaitable[Reply | StreamReply]) -> Reply | StreamReply | None:
    """`call`'s result, or None when the client disconnected first: then `call` is cancelled (one
    watcher task that cancels this one, cheaper than racing two tasks on every request)."""
    current = asyncio.current_task()
    assert current is not None
    hung_up = False

    def on_gone(watcher: asyncio.Task[None]) -> None:
        nonlocal hung_up
        if not watcher.cancelled() and watcher.exception() is None:
            hung_up = True
            current.cancel()

    gone = asyncio.ensure_future(_until_gone(req))
    gone.add_done_callback(on_gone)
    try:
        return await call
    except asyncio.CancelledError:
        if hung_up and current.uncancel() == 0:
            return None
        raise
    finally:
        gone.remove_done_callback(on_gone)
        gone.cancel()


Action = Callable[[ScoringService, Request, bytes, str], Awaitable[Reply | StreamReply]]


async def _serve(req: Request, action: Action, *, with_body: bool = True) -> Response:
    request_id = ""
    try:
        service = scoring_service()
        service.authorize(req.headers.get("authorization"), req.headers.get("x-functions-key"))
        body = await _body(req, service.max_body_bytes) if with_body else b""
        # The id is taken once the whole request is in: from here to the deployment's queue nothing
        # waits, so ids count up in the order requests join the queue.
        request_id = new_request_id()
        reply = await _unless_gone(req, action(service, req, body, request_id))
        if reply is None:  # the client hung up first: its call left the queue or stopped the generation
            log.info("scoring request %s: the client went away", request_id, extra={"request_id": request_id})
            return Response(status_code=CLIENT_GONE, headers={"x-request-id": request_id})
    except Exception as exc:
        return error_response(exc, request_id or new_request_id())
    headers = {"x-request-id": request_id}
    if isinstance(reply, StreamReply):
        return EventStream(reply, {**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return Response(reply.body, status_code=200, headers=headers, media_type=reply.content_type)


async def _chat(service: ScoringService, req: Request, body: bytes, request_id: str) -> Reply | StreamReply:
    return await service.chat(body, selector=_selector(req), request_id=request_id)


async def _score(service: ScoringService, req: Request, body: bytes, request_id: str) -> Reply:
    return await service.score(body, selector=_selector(req), request_id=request_id)


async def _models(service: ScoringService, req: Request, body: bytes, request_id: str) -> Reply:
    return await service.list_models()


@bp.route(route="v1/chat/completions", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
async def chat_completions(req: Request) -> Response:
    """OpenAI chat completions (plain, or `stream: true` as server-sent events while the model generates)."""
    return await _serve(req, _chat)


@bp.route(route="score", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
async def score(req: Request) -> Response:
    """Azure ML scoring schema pass-through to the selected live model; answers normalised."""
    return await _serve(req, _score)


@bp.route(route="v1/models", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def list_models(req: Request) -> Response:
    """The live models, OpenAI `GET /v1/models` format."""
    return await _serve(req, _models, with_body=False)
