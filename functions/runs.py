"""HTTP: run status for people and dashboards (`GET /api/runs`, `GET /api/runs/{id}`).

FastAPI request and response types, as every HTTP function of this app (the scoring functions use
HTTP streams, which the worker turns on for the whole app: see `functions/chat.py`)."""

from __future__ import annotations

import azure.functions as func
import orjson
from azurefunctions.extensions.http.fastapi import Request, Response

from shared.bootstrap import app_context
from shared.errors import NotFound
from shared.usecases.runs import list_runs, run_status

bp = func.Blueprint()


def _json(doc: object, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


@bp.function_name("runs_list")
@bp.route(route="runs", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def runs_list(req: Request) -> Response:
    try:
        limit = max(1, min(int(req.query_params.get("limit", "100")), 1000))
    except ValueError:
        return _json({"error": {"message": "limit must be an integer", "code": "bad_request"}}, 400)
    return _json({"runs": list_runs(app_context().ledger, limit=limit)})


@bp.function_name("run_status")
@bp.route(route="runs/{run_id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def run_status_route(req: Request) -> Response:
    ctx = app_context()
    try:
        return _json(run_status(ctx.ledger, ctx.backend, req.path_params["run_id"]))
    except NotFound as exc:
        return _json({"error": {"message": str(exc), "code": "not_found"}}, 404)
