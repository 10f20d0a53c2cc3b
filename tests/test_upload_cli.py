"""`tunegrid upload FILE [--config F] [--test F] [--follow]` against Azurite: what goes where and in which
order, usage errors, the progress bar, and --follow over a real ledger driven by the use cases
(the fake backend stands in for training). The whole command against the dev host and the local backend
runs in tests/test_run_page_browser.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.adapters.storage import BlobStore
from shared.adapters.tables import TableRunLedger
from shared.bootstrap import AppContext
from shared.domain.resources import JobState
from shared.domain.runs import RunState, run_id_for
from shared.settings import LEDGER_TABLE, TRAINING_CONTAINER, Settings
from shared.usecases.rollout import Rollout, advance_run
from tests.fakes import FakeBackend, FakeUpstream
from tests.support import upload_and_ingest
from tunegrid.cli import main
from tunegrid.commands.upload import Follower, follow, plan_uploads, run_page_url

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
SIDECAR = {"finetune": {"max_steps": 2, "learning_rate": 0.001}}


def _rows(count: int = 30) -> bytes:
    return b"\n".join((SAMPLES / "azureml_chat_train.jsonl").read_bytes().splitlines()[:count]) + b"\n"


@pytest.fixture
def files(tmp_path: Path, unique: str) -> dict[str, Path]:
    data = tmp_path / f"up-{unique}.jsonl"
    data.write_bytes(_rows())
    config = tmp_path / f"up-{unique}.config.json"
    config.write_text(json.dumps(SIDECAR))
    test = tmp_path / f"up-{unique}.test.jsonl"
    test.write_bytes(_rows(12))
    return {"data": data, "config": config, "test": test}


@pytest.fixture
def env(storage: Any, storage_conn: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("DataStorage", storage_conn)
    monkeypatch.setenv("AzureWebJobsStorage", storage_conn)
    return storage


def test_plan_puts_the_companions_first_and_finds_them_beside_the_file(files: dict[str, Path], tmp_path: Path) -> None:
    """Sidecar, then test split, then the dataset (its arrival starts the run); companions named after the blob."""
    plan = plan_uploads(files["data"], name="renamed.jsonl", config=None, test=None)
    assert [(u.role, u.blob, u.path) for u in plan] == [
        ("sidecar", "renamed.config.json", files["config"]),
        ("test", "renamed.test.jsonl", files["test"]),
        ("dataset", "renamed.jsonl", files["data"]),
    ]
    other = tmp_path / "other.json"
    other.write_text("{}")
    plan = plan_uploads(files["data"], name=None, config=other, test=None)
    assert plan[0].path == other and plan[0].blob == files["data"].name.removesuffix(".jsonl") + ".config.json"
    alone = tmp_path / "alone.jsonl"
    alone.write_bytes(_rows())
    assert [u.role for u in plan_uploads(alone, name=None, config=None, test=None)] == ["dataset"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.jsonl"], "is not a file"),
        (["{data}", "--name", "data.csv"], "must end in .jsonl"),
        (["{data}", "--name", "x.test.jsonl"], "companion file name"),
        (["{data}", "--config", "nope.json"], "--config nope.json is not a file"),
        (["{data}", "--config", "{bad}"], "sidecar"),
        (["{data}", "--interval", "0"], "must be positive"),
        (["{data}", "--bogus"], "unrecognized arguments"),
    ],
)
def test_usage_errors_exit_2_and_upload_nothing(
    env: Any, files: dict[str, Path], tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad invocation says what is wrong, exits 2 and leaves the container untouched."""
    bad = tmp_path / "bad.config.json"
    bad.write_text(json.dumps({"finetune": {"learning_rate": "fast"}}))
    argv = ["upload", *(a.format(data=files["data"], bad=bad) for a in args)]
    assert _exit_code(argv) == 2
    assert message in capsys.readouterr().err
    container = env.blobs.get_container_client(TRAINING_CONTAINER)
    assert not list(container.list_blobs(name_starts_with=files["data"].name.removesuffix(".jsonl")))


def _exit_code(argv: list[str]) -> int | str | None:
    """What the shell would see: argparse's own usage errors exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_upload_sends_everything_and_names_the_run_and_its_page(
    env: Any, files: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file lands under its blob name; the run id printed is the one ingest derives from the dataset's ETag."""
    assert main(["upload", str(files["data"]), "--base-url", "http://127.0.0.1:9999/"]) == 0
    out = capsys.readouterr().out
    blobs = BlobStore(env.blobs)
    stem = files["data"].name.removesuffix(".jsonl")
    assert blobs.read_bytes(TRAINING_CONTAINER, f"{stem}.config.json") == files["config"].read_bytes()
    assert blobs.read_bytes(TRAINING_CONTAINER, f"{stem}.test.jsonl") == files["test"].read_bytes()
    assert blobs.read_bytes(TRAINING_CONTAINER, files["data"].name) == files["data"].read_bytes()
    etag = blobs.properties(TRAINING_CONTAINER, files["data"].name)["etag"]
    run_id = run_id_for(TRAINING_CONTAINER, files["data"].name, etag)
    assert f"run {run_id}\n" in out
    assert f"run page: http://127.0.0.1:9999/api/runs/{run_id}?code=<host key>" in out
    assert "tunegrid devhost --show-keys" in out
    assert (
        out.index(f"{stem}.config.json") < out.index(f"{stem}.test.jsonl") < out.index(f"{files['data'].name} (dataset")
    )


def test_a_big_file_shows_a_progress_bar_on_a_terminal_only(
    env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    """Block by block to stderr when stderr is a terminal; nothing when it is a pipe (CI logs stay clean)."""
    big = tmp_path / f"big-{unique}.jsonl"
    big.write_bytes(_rows() * 200)  # about 9 MiB: three 4-MiB blocks
    assert main(["upload", str(big)]) == 0
    assert "%|" not in capsys.readouterr().err
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert main(["upload", str(big)]) == 0
    err = capsys.readouterr().err
    assert "100%|" in err and big.name in err
    assert BlobStore(env.blobs).properties(TRAINING_CONTAINER, big.name)["size"] == big.stat().st_size


# ---------------------------------------------------------------------------------------------- follow
@pytest.fixture
def ctx(env: Any, storage_conn: str, unique: str) -> AppContext:
    settings = Settings.from_env({"DataStorage": storage_conn, "TUNEGRID_INSTANCE": f"up{unique}", "SMOKE_ROWS": "2"})
    return AppContext(
        settings,
        overrides={
            "ledger": TableRunLedger(env.tables.get_table_client(LEDGER_TABLE)),
            "blobs": BlobStore(env.blobs),
            "backend": FakeBackend(),
            "storage": env,
        },
    )


def _ingest(ctx: AppContext, name: str, data: bytes) -> str:
    outcome = upload_and_ingest(ctx, name, data)
    assert outcome.run_id
    return outcome.run_id


def test_follow_prints_each_stage_once_and_exits_0_when_live(
    ctx: AppContext, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Verdict, job, training loss, model, smoke, live; then endpoint, model name and the run page URL."""
    run_id = _ingest(ctx, f"follow-{unique}.jsonl", _rows())
    record = ctx.ledger.get(run_id)
    ctx.backend.set_job(record.job_name, JobState.COMPLETED)
    rollout = Rollout(
        ledger=ctx.ledger,
        backend=ctx.backend,
        blobs=ctx.blobs,
        settings=ctx.settings,
        upstream=FakeUpstream(ctx.backend),
    )
    for _ in range(20):
        if advance_run(run_id, rollout).state == RunState.LIVE:
            break
    live = ctx.ledger.get(run_id)
    page = run_page_url(run_id, base_url="http://127.0.0.1:7071", route_prefix="api")
    assert follow(ctx, run_id, page=page, interval_s=0.05, timeout_s=30, dataset=live.blob) == 0
    out = capsys.readouterr().out
    for state in (
        "received",
        "validating",
        "submitting",
        "submitted",
        "succeeded",
        "registering",
        "deploying",
        "smoke-testing",
        "evaluating",
        "shifting-traffic",
        "live",
    ):
        assert [line.split("] ", 1)[-1].split()[0] for line in out.splitlines() if "] " in line].count(state) == 1, (
            state
        )
    assert "validation: valid, 30 rows (30 valid), 0 errors" in out
    assert "training step 1  loss 2.5000" in out and "training step 2  loss 1.5000  eval loss 1.7000" in out
    assert out.index("submitting") < out.index("validation: valid") < out.index("submitted")
    assert out.index("training step 2") < out.index("succeeded")
    assert f"job {live.job_name}" in out and "smoke test passed (2 rows" in out
    assert f"run {run_id} is live" in out
    for label, value in (("endpoint", live.endpoint), ("model name", live.model_name), ("run page", page)):
        assert any(
            line.split()[: len(label.split())] == label.split() and value in line for line in out.splitlines()
        ), label


def test_follow_exits_1_for_an_invalid_dataset_with_the_first_errors(
    ctx: AppContext, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The verdict, the counts by code and each first error with its line number; exit 1."""
    rows = _rows(12).splitlines()
    rows[2] = b'{"messages": [{"role": "user", "content": "hi"}]}'
    run_id = _ingest(ctx, f"bad-{unique}.jsonl", b"\n".join(rows) + b"\n")
    assert follow(ctx, run_id, page="PAGE", interval_s=0.05, timeout_s=30, dataset="x") == 1
    captured = capsys.readouterr()
    assert "validation: INVALID, 12 rows (11 valid), 1 errors" in captured.out
    assert "line 3: too_few_messages:" in captured.out
    assert (
        f"run {run_id} ended invalid: invalid dataset: too_few_messages×1" in captured.err
        and "run page: PAGE" in captured.err
    )


def test_follow_takes_up_the_reused_run_of_a_duplicate_and_exits_1_when_superseded(
    ctx: AppContext, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same bytes uploaded again end `duplicate`: --follow follows the run that is reused, to live (exit 0).
    A version replaced by a newer one before it went live ends `superseded`: exit 1, with the reason."""
    name = f"dup-{unique}.jsonl"
    first = _ingest(ctx, name, _rows())
    again = _ingest(ctx, name, _rows())
    assert again != first and ctx.ledger.get(again).state == RunState.DUPLICATE
    ctx.backend.set_job(ctx.ledger.get(first).job_name, JobState.COMPLETED)
    rollout = Rollout(
        ledger=ctx.ledger,
        backend=ctx.backend,
        blobs=ctx.blobs,
        settings=ctx.settings,
        upstream=FakeUpstream(ctx.backend),
    )
    for _ in range(20):
        if advance_run(first, rollout).state == RunState.LIVE:
            break
    assert follow(ctx, again, page=f"PAGE/{again}", interval_s=0.05, timeout_s=30, dataset=name) == 0
    out = capsys.readouterr().out
    assert f"same content and settings as run {first}, which is reused: following it" in out
    assert f"run {first} is live" in out and f"PAGE/{first}" in out

    other = f"sup-{unique}.jsonl"
    older = _ingest(ctx, other, _rows())
    newer = _ingest(ctx, other, _rows(31))
    assert follow(ctx, older, page="PAGE", interval_s=0.05, timeout_s=30, dataset=other) == 1
    assert f"run {older} ended superseded: superseded by run {newer}" in capsys.readouterr().err


def test_follow_gives_up_after_the_timeout_with_1(
    ctx: AppContext, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run that stays in training past --timeout ends the command (not the run) with exit 1."""
    run_id = _ingest(ctx, f"slow-{unique}.jsonl", _rows())
    assert follow(ctx, run_id, page="PAGE", interval_s=0.05, timeout_s=0.5, dataset="x") == 1
    assert "not live after 0.5 s (last state: submitted)" in capsys.readouterr().err


def test_follower_shows_new_training_points_once() -> None:
    """Steps already printed are not printed again; a long gap shows its last points; eval points appear once."""
    ticks = iter(range(100))
    follower = Follower(started=0, clock=lambda: float(next(ticks)))
    doc: dict[str, Any] = {"timeline": [], "params": {"max_steps": 40}, "metrics_series": {"loss": [[1, 3.0]]}}
    assert [line.split("] ")[1] for line in follower.lines(doc)] == ["  training step 1/40  loss 3.0000"]
    assert follower.lines(doc) == []
    doc["metrics_series"] = {"loss": [[s, 3.0 - s / 20] for s in range(1, 21)], "eval_loss": [[10, 2.6]]}
    shown = [line.split("] ")[1] for line in follower.lines(doc)]
    assert shown == [f"  training step {s}/40  loss {3.0 - s / 20:.4f}" for s in range(16, 21)] + [
        "  eval at step 10  loss 2.6000"
    ]
    assert follower.lines(doc) == []
