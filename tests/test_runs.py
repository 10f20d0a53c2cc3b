"""Run status for people: `runs`, `status` (with the loss-curve PNG), `cancel`, and the HTTP routes, on the
in-memory ledger and blob store; the HTTP routes also on Azurite."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.bootstrap import AppContext, set_app_context
from shared.domain.resources import JobState
from shared.domain.runs import RunState
from shared.errors import InvalidInput, NotFound
from shared.settings import LEDGER_TABLE, RUN_REPORTS_CONTAINER, Settings
from shared.usecases.runs import cancel_run, list_runs, run_status
from tests.fakes import FakeBackend, InMemoryBlobs, InMemoryLedger
from tests.support import upload_and_ingest
from tunegrid.cli import main

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _install(settings: Settings, **overrides: Any) -> Iterator[AppContext]:
    context = AppContext(settings, overrides={"backend": FakeBackend(), **overrides})
    set_app_context(context)
    yield context
    set_app_context(None)


@pytest.fixture
def ctx(unique: str) -> Iterator[AppContext]:
    """The app context with the in-memory ledger and blob store, installed for the CLI and the functions."""
    settings = Settings.from_env({"TUNEGRID_INSTANCE": f"runs{unique}"})
    yield from _install(settings, ledger=InMemoryLedger(), blobs=InMemoryBlobs())


@pytest.fixture
def azurite_ctx(storage: Any, storage_conn: str, unique: str) -> Iterator[AppContext]:
    """The app context on Azurite with the real table ledger and blob store."""
    from shared.adapters.storage import BlobStore
    from shared.adapters.tables import TableRunLedger

    settings = Settings.from_env({"DataStorage": storage_conn, "TUNEGRID_INSTANCE": f"runs{unique}"})
    ledger = TableRunLedger(storage.tables.get_table_client(LEDGER_TABLE))
    yield from _install(settings, ledger=ledger, blobs=BlobStore(storage.blobs), storage=storage)


def _run(ctx: Any, unique: str) -> Any:
    rows = (SAMPLES / "azureml_chat_train.jsonl").read_bytes().splitlines()[:30]
    name = f"runs-{unique}.jsonl"
    return ctx.ledger.get(upload_and_ingest(ctx, name, b"\n".join(rows) + b"\n").run_id)


def test_list_status_and_cancel(ctx: Any, unique: str) -> None:
    """A submitted run is listed, its status has the timeline and metrics, and it can be canceled once."""
    record = _run(ctx, unique)
    assert any(r["run_id"] == record.run_id and r["state"] == "submitted" for r in list_runs(ctx.ledger))
    status = run_status(ctx.ledger, ctx.backend, record.run_id)
    assert [t["state"] for t in status["timeline"]] == ["received", "validating", "submitting", "submitted"]
    assert status["metrics_series"]["loss"] == [[1, 2.5], [2, 1.5]]
    assert status["split"]["train_rows"] + status["split"]["test_rows"] == 30
    assert cancel_run(ctx.ledger, ctx.backend, record.run_id, blobs=ctx.blobs, settings=ctx.settings) == "canceled"
    assert ctx.backend.jobs[record.job_name].state == JobState.CANCELED
    assert ctx.ledger.get(record.run_id).state == RunState.CANCELED
    with pytest.raises(InvalidInput, match="already canceled"):
        cancel_run(ctx.ledger, ctx.backend, record.run_id, blobs=ctx.blobs, settings=ctx.settings)
    with pytest.raises(NotFound):
        run_status(ctx.ledger, ctx.backend, "r-nope")


def test_status_command_writes_the_loss_curve(
    ctx: Any, unique: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status RUN_ID` prints the timeline and writes a PNG next to the run report."""
    record = _run(ctx, unique)
    assert main(["status", record.run_id, "--plot-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"run {record.run_id}: submitted" in out and "timeline" in out
    png = tmp_path / f"{record.run_id}-loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ctx.blobs.read_bytes(RUN_REPORTS_CONTAINER, f"{record.run_id}/loss.png") == png.read_bytes()
    assert main(["runs", "--json"]) == 0
    assert record.run_id in {r["run_id"] for r in json.loads(capsys.readouterr().out)}
    assert main(["status", "r-missing"]) == 1


def _get(path: str, *, query: str = "", route: dict[str, str] | None = None, accept: str = "") -> Any:
    """The FastAPI request the worker hands an HTTP-streams function (route parameters synced in)."""
    from starlette.requests import Request

    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "query_string": query.encode(),
        "headers": [(b"accept", accept.encode())] if accept else [],
        "path_params": dict(route or {}),
    }
    return Request(scope)


@pytest.mark.parametrize("where", ["memory", pytest.param("azurite", marks=pytest.mark.azurite)])
def test_http_routes_return_the_same_data(request: pytest.FixtureRequest, where: str, unique: str) -> None:
    """GET /api/runs and /api/runs/{id}, called as the host calls them."""
    from function_app import app
    from tunegrid.appindex import functions_of

    ctx = request.getfixturevalue("ctx" if where == "memory" else "azurite_ctx")
    record = _run(ctx, unique)
    fns = {f.get_function_name(): f.get_user_function() for f in functions_of(app)}
    listed = fns["runs_list"](_get("/api/runs", query="limit=5"))
    assert listed.status_code == 200 and record.run_id in {r["run_id"] for r in json.loads(listed.body)["runs"]}
    one = fns["run_status"](_get(f"/api/runs/{record.run_id}", route={"run_id": record.run_id}))
    assert one.status_code == 200 and json.loads(one.body)["state"] == "submitted"
    missing = fns["run_status"](_get("/api/runs/x", route={"run_id": "x"}))
    assert missing.status_code == 404
    bad = fns["runs_list"](_get("/api/runs", query="limit=lots"))
    assert bad.status_code == 400


class _UnreachableLedger:
    """The ledger while storage is down: every call fails as the table adapter reports a refused connection."""

    def __getattr__(self, name: str) -> Any:
        def down(*args: Any, **kwargs: Any) -> Any:
            from shared.errors import TransientError

            raise TransientError("run ledger list: ServiceRequestError: connection refused")

        return down


def test_storage_outage_is_a_json_503_with_retry_after(unique: str) -> None:
    """While storage is unreachable, /api/runs and /api/runs/{id} answer a JSON 503 with Retry-After; a browser
    gets the same 503 and Retry-After as a page that reloads itself, and neither names the cause."""
    from function_app import app
    from tunegrid.appindex import functions_of

    settings = Settings.from_env({"TUNEGRID_INSTANCE": f"runs{unique}"})
    for _context in _install(settings, ledger=_UnreachableLedger(), blobs=InMemoryBlobs()):
        fns = {f.get_function_name(): f.get_user_function() for f in functions_of(app)}
        run = {"run_id": "r0123456789abcde"}
        for accept in ("", "application/json", "text/html,application/xhtml+xml,*/*;q=0.8"):
            listed = fns["runs_list"](_get("/api/runs", accept=accept))
            one = fns["run_status"](_get("/api/runs/r0123456789abcde", route=run, accept=accept))
            for response in (listed, one):
                assert response.status_code == 503
                assert int(response.headers["Retry-After"]) > 0
                assert b"connection refused" not in response.body
                if accept.startswith("text/html"):
                    assert response.headers["content-type"].startswith("text/html")
                    page = response.body.decode()
                    assert "run storage is unavailable" in page
                    assert f'http-equiv="refresh" content="{response.headers["Retry-After"]}"' in page
                else:
                    body = json.loads(response.body)
                    assert body["error"]["code"] == "storage_unavailable"
