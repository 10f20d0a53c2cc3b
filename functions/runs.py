"""HTTP: run status for people and dashboards (`GET /api/runs`, `GET /api/runs/{id}`)."""

from __future__ import annotations

import azure.functions as func
import orjson

from shared.bootstrap import app_context
from shared.errors import NotFound
from shared.usecases.runs import list_runs, run_status

bp = func.Blueprint()


def _json(doc: object, status: int = 200) -> func.HttpResponse:
    return func.HttpResponse(orjson.dumps(doc), status_code=status, mimetype="application/json")


@bp.function_name("runs_list")
@bp.route(route="runs", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def runs_list(req: func.HttpRequest) -> func.HttpResponse:
    try:
        limit = max(1, min(int(req.params.get("limit", "100")), 1000))
    except ValueError:
        return _json({"error": {"message": "limit must be an integer", "code": "bad_request"}}, 400)
    return _json({"runs": list_runs(app_context().ledger, limit=limit)})


@bp.function_name("run_status")
@bp.route(route="runs/{run_id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def run_status_route(req: func.HttpRequest) -> func.HttpResponse:
    ctx = app_context()
    try:
        return _json(run_status(ctx.ledger, ctx.backend, req.route_params["run_id"]))
    except NotFound as exc:
        return _json({"error": {"message": str(exc), "code": "not_found"}}, 404)
