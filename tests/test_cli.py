"""`python -m tunegrid`: settings read as the dev host reads them, quiet output, aligned status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.adapters.tables import TableRunLedger
from shared.domain.clock import utcnow
from shared.domain.runs import RunRecord, RunState
from shared.settings import LEDGER_TABLE, SETTINGS, STORAGE_CONNECTION, TRAINING_CONTAINER
from tunegrid.cli import main
from tunegrid.commands.runs import render_status
from tunegrid.devhost.config import local_settings_environ
from tunegrid.render import table

ROOT = Path(__file__).resolve().parent.parent


def cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI in `cwd`, with no app setting or connection inherited from this process."""
    app_names = {s.name for s in SETTINGS} | {STORAGE_CONNECTION, "AzureWebJobsStorage"}
    clean = {k: v for k, v in os.environ.items() if k.split("__")[0] not in app_names}
    return subprocess.run(
        [sys.executable, "-m", "tunegrid", *args],
        cwd=cwd,
        env={**clean, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def write_settings(folder: Path, name: str, values: dict[str, str]) -> None:
    (folder / name).write_text(json.dumps({"IsEncrypted": False, "Values": values}))


@pytest.fixture
def checkout(tmp_path: Path, storage_conn: str) -> Path:
    """A folder laid out like a fresh checkout: only the sample settings file, naming the test's Azurite."""
    values = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    values |= {
        STORAGE_CONNECTION: storage_conn,
        "AzureWebJobsStorage": storage_conn,
        "LOCAL_WORKSPACE_DIR": str(tmp_path / "workspace"),
        "LOCAL_EVENT_WEBHOOK_URL": "",
    }
    write_settings(tmp_path, "local.settings.sample.json", values)
    return tmp_path


@pytest.fixture
def live_run(storage: Any, unique: str) -> RunRecord:
    """A live run in the ledger, with every field `status` shows and no job for the backend to ask about."""
    now = utcnow()
    record = RunRecord(
        run_id=f"r-{unique}",
        state=RunState.LIVE,
        container=TRAINING_CONTAINER,
        blob=f"{unique}.jsonl",
        blob_version="v1",
        created_at=now,
        updated_at=now,
        timeline=(
            ("received", "2026-01-02T03:04:05.123456+00:00"),
            ("shifting-traffic", "2026-01-02T03:14:05.654321+00:00"),
            ("live", "2026-01-02T03:15:00.000001+00:00"),
        ),
        model_id=f"azureml://locations/local/workspaces/w/models/ft-{unique}/versions/1",
        endpoint=f"tg-{unique}",
        deployment=f"d-20260102-{unique}",
        report_url=f"http://127.0.0.1:10000/devstoreaccount1/validation-reports/{unique}.report.md",
        run_report_url=f"http://127.0.0.1:10000/devstoreaccount1/run-reports/r-{unique}/report.md",
        metrics={"train_loss": {"last": 1.23456}, "eval_loss": {"last": 1.5}},
        smoke={"passed": True, "p50_ms": 41},
    )
    TableRunLedger(storage.tables.get_table_client(LEDGER_TABLE)).create(record)  # type: ignore[attr-defined]
    return record


@pytest.mark.azurite
def test_status_from_a_fresh_checkout_is_aligned_and_quiet(checkout: Path, live_run: RunRecord, unique: str) -> None:
    """`status RUN_ID` with only the sample settings: labels in one column, values in the next, nothing else."""
    result = cli(checkout, "status", live_run.run_id)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"run r-{unique}: live\n"
        f"  dataset     training-data/{unique}.jsonl\n"
        f"  model       azureml://locations/local/workspaces/w/models/ft-{unique}/versions/1\n"
        f"  endpoint    tg-{unique}\n"
        f"  deployment  d-20260102-{unique}\n"
        f"  report      http://127.0.0.1:10000/devstoreaccount1/validation-reports/{unique}.report.md\n"
        f"  run report  http://127.0.0.1:10000/devstoreaccount1/run-reports/r-{unique}/report.md\n"
        "  metrics     eval_loss=1.5, train_loss=1.235\n"
        "  smoke       passed=True p50=41 ms\n"
        "  timeline\n"
        "    2026-01-02T03:04:05.123  received\n"
        "    2026-01-02T03:14:05.654  shifting-traffic\n"
        "    2026-01-02T03:15:00.000  live\n"
    )


@pytest.mark.azurite
def test_runs_from_a_fresh_checkout_is_aligned_and_quiet(checkout: Path, live_run: RunRecord, unique: str) -> None:
    """`runs` with only the sample settings lists the run under aligned headers; `-v` adds debug logs."""
    result = cli(checkout, "runs")
    assert (result.returncode, result.stderr) == (0, "")
    header, *rows = result.stdout.splitlines()
    row = next(line for line in rows if line.startswith(live_run.run_id + " "))
    expected = {
        "state": "live",
        "dataset": f"training-data/{unique}.jsonl",
        "created_at": live_run.created_at.isoformat()[:19],
        "model": "",
        "endpoint": f"tg-{unique}",
    }
    for column, value in expected.items():
        start = header.index(column)
        assert header[start - 2 : start] == "  " and row[start - 2 : start] == "  ", column
        assert row[start:].startswith(value), (column, row)
    verbose = cli(checkout, "-v", "runs")
    assert verbose.returncode == 0
    assert "DEBUG tunegrid.devhost.config: local.settings.json not found" in verbose.stderr


def test_settings_file_wins_over_the_sample_and_the_environment_wins_over_both(tmp_path: Path) -> None:
    """local.settings.json is read before the sample; a variable set in the environment beats the file."""
    write_settings(tmp_path, "local.settings.sample.json", {"IDLE_MINUTES": "soon"})
    result = cli(tmp_path, "runs")
    assert result.returncode == 2
    assert result.stderr == "tunegrid: error: setting IDLE_MINUTES must be an integer, got 'soon'\n"
    write_settings(tmp_path, "local.settings.json", {"IDLE_MINUTES": "ten"})
    result = cli(tmp_path, "runs")
    assert result.stderr == "tunegrid: error: setting IDLE_MINUTES must be an integer, got 'ten'\n"
    result = cli(tmp_path, "validate", "blob://training-data/x.jsonl", env={"IDLE_MINUTES": "10"})
    assert result.returncode == 2
    assert result.stderr == (
        "tunegrid: error: no storage connection: set DataStorage (or AzureWebJobsStorage) to read blob:// paths\n"
    )


def test_a_broken_settings_file_is_a_usage_error(tmp_path: Path) -> None:
    """An unreadable local.settings.json: exit 2 and one line naming the file."""
    (tmp_path / "local.settings.json").write_text("{not json")
    result = cli(tmp_path, "runs")
    assert result.returncode == 2
    assert result.stderr.startswith(f"tunegrid: error: cannot read settings file {tmp_path / 'local.settings.json'}")
    assert "Traceback" not in result.stderr


def test_local_settings_environ_adds_and_removes_only_missing_values(tmp_path: Path) -> None:
    """File values fill what the environment lacks for the block only; set variables (even empty) stay."""
    write_settings(tmp_path, "local.settings.json", {"KEEP": "file", "EMPTY": "file", "NEW": "file"})
    environ = {"KEEP": "env", "EMPTY": ""}
    with local_settings_environ(root=tmp_path, environ=environ) as loaded:
        assert environ == {"KEEP": "env", "EMPTY": "", "NEW": "file"}
        assert loaded.source == tmp_path / "local.settings.json"
    assert environ == {"KEEP": "env", "EMPTY": ""}


def test_main_leaves_the_environment_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process callers (tests) get their os.environ back after a command."""
    write_settings(tmp_path, "local.settings.json", {"TUNEGRID_TEST_ONLY_VALUE": "x"})
    monkeypatch.chdir(tmp_path)
    before = dict(os.environ)
    assert main(["settings", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "FINETUNE_BACKEND"
    assert dict(os.environ) == before


def test_table_sizes_columns_to_their_longest_cell() -> None:
    """A label as long as the old fixed width still gets two spaces before its value."""
    assert table([("deployment", "d-1"), ("run report", "http://x"), ("job", "j")], indent="  ") == [
        "  deployment  d-1",
        "  run report  http://x",
        "  job         j",
    ]
    assert table([("a", ""), ("bb", "c")]) == ["a", "bb  c"]
    assert table([]) == []


def test_render_status_without_optional_fields() -> None:
    """A fresh run shows its dataset and timeline only, still aligned."""
    doc = {
        "run_id": "r-1",
        "state": "received",
        "container": "training-data",
        "blob": "x.jsonl",
        "timeline": [{"state": "received", "at": "2026-01-02T03:04:05.123456+00:00"}],
    }
    assert render_status(doc) == (
        "run r-1: received\n  dataset  training-data/x.jsonl\n  timeline\n    2026-01-02T03:04:05.123  received"
    )


def test_a_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    """`tunegrid settings | head` ends quietly: the reader going away is not a traceback."""
    app_names = {s.name for s in SETTINGS} | {STORAGE_CONNECTION, "AzureWebJobsStorage"}
    clean = {k: v for k, v in os.environ.items() if k.split("__")[0] not in app_names}
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes a byte
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tunegrid", "settings"],
            cwd=tmp_path,
            env={**clean, "PYTHONPATH": str(ROOT)},
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
