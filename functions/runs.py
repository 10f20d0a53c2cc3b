"""HTTP: run status for people and dashboards (`GET /api/runs`, `GET /api/runs/{id}`).

Storage that cannot be reached (an outage, throttling) is a JSON 503 with `Retry-After`, never a bare 500.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import azure.functions as func
import orjson

from shared.bootstrap import app_context
from shared.errors import OUTAGE_RETRY_AFTER_S, NotFound, TransientError
from shared.usecases.runs import list_runs, run_status

log = logging.getLogger(__name__)
bp = func.Blueprint()


def _json(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(orjson.dumps(doc), status_code=status, headers=headers, mimetype="application/json")


def _unavailable(exc: TransientError) -> func.HttpResponse:
    log.warning("run status: storage unavailable: %s", exc)
    body = {"error": {"message": "run storage is unavailable; retry later", "code": "storage_unavailable"}}
    return _json(body, 503, {"Retry-After": str(OUTAGE_RETRY_AFTER_S)})


def _answer(build: Callable[[], func.HttpResponse]) -> func.HttpResponse:
    try:
        return build()
    except TransientError as exc:
        return _unavailable(exc)


@bp.function_name("runs_list")
@bp.route(route="runs", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def runs_list(req: func.HttpRequest) -> func.HttpResponse:
    try:
        limit = max(1, min(int(req.params.get("limit", "100")), 1000))
    except ValueError:
        return _json({"error": {"message": "limit must be an integer", "code": "bad_request"}}, 400)
    return _answer(lambda: _json({"runs": list_runs(app_context().ledger, limit=limit)}))


@bp.function_name("run_status")
@bp.route(route="runs/{run_id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def run_status_route(req: func.HttpRequest) -> func.HttpResponse:
    ctx = app_context()
    try:
        return _answer(lambda: _json(run_status(ctx.ledger, ctx.backend, req.route_params["run_id"])))
    except NotFound as exc:
        return _json({"error": {"message": str(exc), "code": "not_found"}}, 404)
