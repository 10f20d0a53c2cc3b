"""Scoring proxy: `POST /api/score` (Azure ML schema), `POST /api/v1/chat/completions` and
`GET /api/v1/models` (OpenAI-compatible).

Auth: these routes are ANONYMOUS at the host level and check the key themselves. The official
`openai` client sends `Authorization: Bearer <key>`, which the Functions host does not take as a
function key, so host-level FUNCTION auth would refuse it. Each function accepts either that header
or `x-functions-key`, compared in constant time against PROXY_API_KEYS (see shared.scoring.ApiKeys);
with no keys configured every request is refused.

Each function turns the request into bytes and header values, calls one `ScoringService` method and
maps domain errors to OpenAI-style error objects. The service is built once per process (and rebuilt
only if the app context is replaced).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
from collections.abc import Awaitable, Callable, Mapping

import azure.functions as func
import orjson

from shared.bootstrap import AppContext, app_context
from shared.errors import ConfigError, InvalidInput, NotFound, TransientError, TunegridError, UpstreamError
from shared.usecases.scoring import (
    InvalidRequest,
    ModelNotFound,
    NoLiveModel,
    PayloadTooLarge,
    Reply,
    ScoringService,
    Unauthorized,
    UpstreamBusy,
    UpstreamRejected,
)

log = logging.getLogger(__name__)

bp = func.Blueprint()

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


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A request header or None. `HttpRequestHeaders.get` goes through Mapping.get, which raises and
    catches a KeyError for every absent header; its `__contains__` is a plain dict lookup."""
    return headers[name] if name in headers else None  # noqa: SIM401 (see above)


def _selector(req: func.HttpRequest) -> str | None:
    return req.params.get("model") or _header(req.headers, "x-tunegrid-model")


def error_response(exc: Exception, request_id: str) -> func.HttpResponse:
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
        status, kind, code = 429, "rate_limit_error", "upstream_busy"
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
        log.exception("scoring request %s failed", request_id, extra={"request_id": request_id})
        message = f"internal error (request id {request_id})"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code, "request_id": request_id}}
    return func.HttpResponse(orjson.dumps(body), status_code=status, headers=headers, mimetype="application/json")


async def _serve(
    req: func.HttpRequest, action: Callable[[ScoringService, func.HttpRequest, str], Awaitable[Reply]]
) -> func.HttpResponse:
    request_id = new_request_id()
    try:
        service = scoring_service()
        headers = req.headers
        service.authorize(_header(headers, "authorization"), _header(headers, "x-functions-key"))
        reply = await action(service, req, request_id)
    except Exception as exc:
        return error_response(exc, request_id)
    response = func.HttpResponse(reply.body, status_code=200, mimetype=reply.content_type)
    response.headers["x-request-id"] = request_id
    if reply.content_type == "text/event-stream":
        response.headers["Cache-Control"] = "no-cache"
    return response


async def _chat(service: ScoringService, req: func.HttpRequest, request_id: str) -> Reply:
    body = req.get_body()
    service.check_size(_header(req.headers, "content-length"), body)
    return await service.chat(body, selector=_selector(req), request_id=request_id)


async def _score(service: ScoringService, req: func.HttpRequest, request_id: str) -> Reply:
    body = req.get_body()
    service.check_size(_header(req.headers, "content-length"), body)
    return await service.score(body, selector=_selector(req), request_id=request_id)


async def _models(service: ScoringService, req: func.HttpRequest, request_id: str) -> Reply:
    return await service.list_models()


@bp.route(route="v1/chat/completions", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
async def chat_completions(req: func.HttpRequest) -> func.HttpResponse:
    """OpenAI chat completions (plain or `stream: true` as server-sent events)."""
    return await _serve(req, _chat)


@bp.route(route="score", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
async def score(req: func.HttpRequest) -> func.HttpResponse:
    """Azure ML scoring schema pass-through to the selected live model; answers normalised."""
    return await _serve(req, _score)


@bp.route(route="v1/models", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def list_models(req: func.HttpRequest) -> func.HttpResponse:
    """The live models, OpenAI `GET /v1/models` format."""
    return await _serve(req, _models)
