"""HTTP: run status for people and dashboards (`GET /api/runs`, `GET /api/runs/{id}`).

JSON by default; HTML (the run page, the table of runs) when the client prefers it (`Accept: text/html`,
as a browser sends). Function-key auth as for the API: a browser passes the key as `?code=`.
FastAPI request and response types, as every HTTP function of this app (the scoring functions use
HTTP streams, which the worker turns on for the whole app: see `functions/chat.py`).
"""

from __future__ import annotations

import azure.functions as func
import orjson
from azurefunctions.extensions.http.fastapi import Request, Response
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from shared.bootstrap import app_context
from shared.errors import NotFound
from shared.usecases.run_page import CONTENT_SECURITY_POLICY, render_not_found, render_run_list, render_run_page
from shared.usecases.runs import list_runs, run_status

bp = func.Blueprint()

JSON, HTML = "application/json", "text/html"
PRIVATE = {"Cache-Control": "no-store", "Vary": "Accept"}


def _json(doc: object, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON, headers=dict(PRIVATE))


def _html(page: str, status: int = 200) -> Response:
    headers = {
        **PRIVATE,
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "Referrer-Policy": "no-referrer",  # the address holds ?code=: never send it on to a linked site
        "X-Content-Type-Options": "nosniff",
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


@bp.function_name("runs_list")
@bp.route(route="runs", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def runs_list(req: Request) -> Response:
    try:
        limit = max(1, min(int(req.query_params.get("limit", "100")), 1000))
    except ValueError:
        return _json({"error": {"message": "limit must be an integer", "code": "bad_request"}}, 400)
    runs = list_runs(app_context().ledger, limit=limit)
    if wants_html(req):
        return _html(render_run_list(runs, api_path=api_root(req)[1]))
    return _json({"runs": runs})


@bp.function_name("run_status")
@bp.route(route="runs/{run_id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def run_status_route(req: Request) -> Response:
    ctx = app_context()
    html = wants_html(req)
    root, path = api_root(req)
    try:
        doc = run_status(ctx.ledger, ctx.backend, req.path_params["run_id"], blobs=ctx.blobs)
    except NotFound as exc:
        if html:
            return _html(render_not_found(str(exc), api_path=path), 404)
        return _json({"error": {"message": str(exc), "code": "not_found"}}, 404)
    if html:
        return _html(render_run_page(doc, api_root=root, api_path=path))
    return _json(doc)
