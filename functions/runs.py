"""HTTP: run status for people and dashboards (`GET /api/runs`, `GET /api/runs/{id}`).

JSON by default; HTML (the run page, the table of runs) when the client prefers it (`Accept: text/html`,
as a browser sends). Function-key auth as for the API: a browser passes the key as `?code=`.
FastAPI request and response types, as every HTTP function of this app (the scoring functions use
HTTP streams, which the worker turns on for the whole app: see `functions/chat.py`).
Storage that cannot be reached (an outage, throttling) is a 503 with `Retry-After`, never a bare 500: JSON,
or for a browser a page that says so and reloads itself after that many seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import azure.functions as func
import orjson
from azurefunctions.extensions.http.fastapi import Request, Response
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from shared.bootstrap import app_context
from shared.errors import OUTAGE_RETRY_AFTER_S, NotFound, TransientError
from shared.usecases.run_page import (
    CONTENT_SECURITY_POLICY,
    render_not_found,
    render_run_list,
    render_run_page,
    render_unavailable,
)
from shared.usecases.runs import list_runs, run_status

log = logging.getLogger(__name__)
bp = func.Blueprint()

JSON, HTML = "application/json", "text/html"
PRIVATE = {"Cache-Control": "no-store", "Vary": "Accept"}
UNAVAILABLE = "run storage is unavailable; retry later"


def _json(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON, headers={**PRIVATE, **(headers or {})})


def _html(page: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    headers = {
        **PRIVATE,
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "Referrer-Policy": "no-referrer",  # the address holds ?code=: never send it on to a linked site
        "X-Content-Type-Options": "nosniff",
        **(headers or {}),
    }
    return Response(page.encode(), status_code=status, media_type=f"{HTML}; charset=utf-8", headers=headers)


def wants_html(req: Request) -> bool:
    """Content negotiation on `Accept` (q-values honoured, by Werkzeug's parser); JSON unless HTML is preferred."""
    accept = parse_accept_header(req.headers.get("accept"), MIMEAccept)
    return accept.best_match([JSON, HTML], default=JSON) == HTML


def api_root(req: Request) -> tuple[str, str]:
    """The app's URL up to the route prefix (`https://app.azurewebsites.net/api`) and its path (`/api`),
    from the request's own URL, without its query (which may hold the key)."""
    url = req.url
    path = url.path
    cut = path.rfind("/runs")
    prefix = path[:cut] if cut >= 0 else ""
    return f"{url.scheme}://{url.netloc}{prefix}", prefix


def _unavailable(exc: TransientError, *, html: bool, api_path: str) -> Response:
    """Storage is down: 503 with Retry-After. The cause is logged, never sent (it may name hosts or accounts)."""
    log.warning("run status: storage unavailable: %s", exc)
    retry = {"Retry-After": str(OUTAGE_RETRY_AFTER_S)}
    if html:
        return _html(render_unavailable(UNAVAILABLE, api_path=api_path, retry_after_s=OUTAGE_RETRY_AFTER_S), 503, retry)
    return _json({"error": {"message": UNAVAILABLE, "code": "storage_unavailable"}}, 503, retry)


def _answer(req: Request, build: Callable[[bool, str, str], Response]) -> Response:
    """Answer with `build(html, api_root, api_path)`, or the 503 when storage cannot be reached meanwhile."""
    html = wants_html(req)
    root, path = api_root(req)
    try:
        return build(html, root, path)
    except TransientError as exc:
        return _unavailable(exc, html=html, api_path=path)


@bp.function_name("runs_list")
@bp.route(route="runs", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def runs_list(req: Request) -> Response:
    try:
        limit = max(1, min(int(req.query_params.get("limit", "100")), 1000))
    except ValueError:
        return _json({"error": {"message": "limit must be an integer", "code": "bad_request"}}, 400)

    def build(html: bool, root: str, path: str) -> Response:
        runs = list_runs(app_context().ledger, limit=limit)
        if html:
            return _html(render_run_list(runs, api_path=path))
        return _json({"runs": runs})

    return _answer(req, build)


@bp.function_name("run_status")
@bp.route(route="runs/{run_id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def run_status_route(req: Request) -> Response:
    def build(html: bool, root: str, path: str) -> Response:
        ctx = app_context()
        try:
            doc = run_status(ctx.ledger, ctx.backend, req.path_params["run_id"], blobs=ctx.blobs)
        except NotFound as exc:
            if html:
                return _html(render_not_found(str(exc), api_path=path), 404)
            return _json({"error": {"message": str(exc), "code": "not_found"}}, 404)
        if html:
            return _html(render_run_page(doc, api_root=root, api_path=path))
        return _json(doc)

    return _answer(req, build)
