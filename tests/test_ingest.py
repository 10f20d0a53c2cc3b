"""Ingest: upload -> report -> ledger -> exactly one submission. The use case runs on the in-memory
ledger and blob store (tests/fakes.py, held to the real adapters by tests/test_storage_contract.py);
the happy path, the concurrent deliveries and the blob-trigger function also run on a real Azurite."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from shared.domain.naming import job_name_for
from shared.domain.resources import JobState
from shared.domain.runs import RunState, run_id_for
from shared.errors import ComputeError, TransientError
from shared.settings import LEDGER_TABLE, PREPARED_CONTAINER, REPORTS_CONTAINER, TRAINING_CONTAINER, Settings
from shared.usecases.ingest import holdout_indices, ingest_dataset
from tests.fakes import FakeBackend, InMemoryBlobs, InMemoryLedger

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
ON_BOTH = ["memory", pytest.param("azurite", marks=pytest.mark.azurite)]


def _rows(name: str, n: int) -> bytes:
    lines = (SAMPLES / name).read_bytes().splitlines()[:n]
    return b"\n".join(lines) + b"\n"


def _env(ledger: Any, blobs: Any, unique: str, **settings: str) -> dict[str, Any]:
    return {
        "settings": Settings.from_env({"FINETUNE_BACKEND": "local", "TUNEGRID_INSTANCE": "test", **settings}),
        "ledger": ledger,
        "blobs": blobs,
        "backend": FakeBackend(),
        "prefix": f"t{unique}/",
    }


@pytest.fixture
def env(unique: str) -> dict[str, Any]:
    """The use case's ports in memory."""
    return _env(InMemoryLedger(), InMemoryBlobs(), unique)


@pytest.fixture
def azurite_env(storage: Any, storage_conn: str, unique: str) -> dict[str, Any]:
    """The real table ledger and blob store on Azurite."""
    from shared.adapters.storage import BlobStore
    from shared.adapters.tables import TableRunLedger

    ledger = TableRunLedger(storage.tables.get_table_client(LEDGER_TABLE))
    return _env(ledger, BlobStore(storage.blobs), unique, DataStorage=storage_conn)


@pytest.fixture(params=ON_BOTH)
def any_env(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The same test in memory and on Azurite."""
    return request.getfixturevalue("env" if request.param == "memory" else "azurite_env")


def _upload(env: dict[str, Any], name: str, data: bytes) -> str:
    env["blobs"].upload(TRAINING_CONTAINER, env["prefix"] + name, data)
    return env["prefix"] + name


def _ingest(env: dict[str, Any], name: str, **overrides: Any) -> Any:
    kwargs = {k: env[k] for k in ("blobs", "ledger", "backend", "settings")}
    kwargs.update(overrides)
    return ingest_dataset(container=TRAINING_CONTAINER, name=name, **kwargs)


def test_valid_dataset_is_reported_prepared_and_submitted_once(any_env: dict[str, Any]) -> None:
    """A real ultrachat slice yields a stored report, a 95/5 split and exactly one submission."""
    env = any_env
    name = _upload(env, "chat.jsonl", _rows("ultrachat_small.jsonl", 200))
    outcome = _ingest(env, name)
    assert outcome.action == "submitted", outcome
    record = env["ledger"].get(outcome.run_id)
    assert record.state == RunState.SUBMITTED
    assert [s for s, _ in record.timeline] == ["received", "validating", "submitting", "submitted"]
    assert record.job_name == job_name_for(record.run_id)
    report = json.loads(env["blobs"].read_bytes(REPORTS_CONTAINER, f"{name}/{record.run_id}.report.json"))
    assert report["valid"] is True and report["rows"] == 200
    assert env["blobs"].read_bytes(REPORTS_CONTAINER, f"{name}/{record.run_id}.report.md").startswith(b"#")
    train = env["blobs"].read_bytes(PREPARED_CONTAINER, f"{record.run_id}/train.jsonl", limit=10**8).splitlines()
    test = env["blobs"].read_bytes(PREPARED_CONTAINER, f"{record.run_id}/test.jsonl", limit=10**8).splitlines()
    assert (len(train), len(test)) == (190, 10)
    assert set(train).isdisjoint(test)
    [request] = env["backend"].submissions
    assert request.run_id == record.run_id and request.train.blob == f"{record.run_id}/train.jsonl"
    assert request.tags["tunegridrunid"] == record.run_id and "." not in "".join(request.tags)


def test_ten_concurrent_deliveries_submit_exactly_once(any_env: dict[str, Any]) -> None:
    """The same blob version delivered 10 times at once gives one run and one submission."""
    env = any_env
    name = _upload(env, "dup.jsonl", _rows("azureml_chat_train.jsonl", 40))
    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(lambda _: _ingest(env, name), range(10)))
    actions = sorted(o.action for o in outcomes)
    assert actions.count("submitted") == 1 and actions.count("duplicate") == 9, actions
    assert len(env["backend"].submissions) == 1
    assert _ingest(env, name).action == "duplicate"
    assert len(env["backend"].submissions) == 1


def test_new_blob_version_is_a_new_run(env: dict[str, Any]) -> None:
    """Overwriting the blob (new ETag) starts a new run; the old one is untouched."""
    name = _upload(env, "v.jsonl", _rows("azureml_chat_train.jsonl", 30))
    first = _ingest(env, name)
    _upload(env, "v.jsonl", _rows("azureml_chat_train.jsonl", 31))
    second = _ingest(env, name)
    assert first.run_id != second.run_id
    assert len(env["backend"].submissions) == 2


def test_invalid_dataset_is_terminal_with_line_numbers(env: dict[str, Any]) -> None:
    """An invalid file is reported with line numbers, recorded as invalid, never submitted."""
    good = _rows("azureml_chat_train.jsonl", 12).splitlines()
    bad = [*good[:3], b'{"messages": [{"role": "user", "content": "hi"}]}', b"{not json", *good[3:]]
    name = _upload(env, "bad.jsonl", b"\n".join(bad) + b"\n")
    outcome = _ingest(env, name)
    assert outcome.action == "invalid"
    record = env["ledger"].get(outcome.run_id)
    assert record.state == RunState.INVALID and "invalid_json" in record.error
    report = json.loads(env["blobs"].read_bytes(REPORTS_CONTAINER, f"{name}/{record.run_id}.report.json"))
    lines = {(e["line"], e["code"]) for e in report["errors"]}
    assert (4, "too_few_messages") in lines and (5, "invalid_json") in lines
    assert env["backend"].submissions == []
    assert _ingest(env, name).action == "duplicate"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("notes.txt", "not a .jsonl file"),
        ("x.test.jsonl", "companion test/validation file"),
        ("missing.jsonl", "blob not found"),
    ],
)
def test_ignored_blobs(env: dict[str, Any], name: str, reason: str) -> None:
    """Non-datasets and companion files are ignored with a reason; nothing is recorded."""
    if name != "missing.jsonl":
        _upload(env, name, b"{}")
    outcome = _ingest(env, env["prefix"] + name)
    assert (outcome.action, outcome.reason) == ("ignored", reason)
    assert env["backend"].submissions == []


def test_user_test_file_and_sidecar_are_used(env: dict[str, Any]) -> None:
    """NAME.test.jsonl replaces the split; NAME.config.json reaches the backend as params."""
    _upload(env, "s.test.jsonl", _rows("azureml_conversation_system.jsonl", 5))
    _upload(
        env,
        "s.config.json",
        json.dumps(
            {
                "finetune": {"learning_rate": 0.0002, "num_train_epochs": 1, "apply_lora": True},
                "deployment": {"instance_count": 2},
            }
        ).encode(),
    )
    name = _upload(env, "s.jsonl", _rows("azureml_conversation_system.jsonl", 20))
    outcome = _ingest(env, name)
    assert outcome.action == "submitted", outcome
    [request] = env["backend"].submissions
    assert dict(request.params) == {"learning_rate": 0.0002, "num_train_epochs": 1, "apply_lora": "true"}
    record = env["ledger"].get(outcome.run_id)
    assert record.extra["split"]["test_rows"] == 5 and record.extra["split"]["train_rows"] == 20
    assert record.extra["sidecar"]["deployment"] == {"instance_count": 2}


@pytest.mark.parametrize(
    ("sidecar", "needle"),
    [
        ('{"finetune": {"learning_rat": 0.1}}', "unknown fine-tune parameter"),
        ('{"finetune": {"num_train_epochs": "three"}}', "expected an integer"),
        ("{nope", "not valid JSON"),
        ('{"deployment": {"request_timeout_ms": 999999}}', "outside [1, 180000]"),
        ('{"deployment": {"instance_count": 0}}', "deployment.instance_count: 0 is outside [1, "),
        ('{"deployment": {"max_concurrent_requests_per_instance": 0}}', "is outside [1, "),
    ],
)
def test_bad_sidecar_makes_the_run_invalid(env: dict[str, Any], sidecar: str, needle: str) -> None:
    """A malformed sidecar is a clear, recorded error in the report; nothing is submitted."""
    _upload(env, "c.config.json", sidecar.encode())
    name = _upload(env, "c.jsonl", _rows("azureml_chat_train.jsonl", 20))
    outcome = _ingest(env, name)
    assert outcome.action == "invalid"
    report = json.loads(env["blobs"].read_bytes(REPORTS_CONTAINER, f"{name}/{outcome.run_id}.report.json"))
    [problem] = [e for e in report["errors"] if e["code"] == "invalid_config"]
    assert needle in problem["message"]
    assert env["backend"].submissions == []


def test_too_few_training_rows_after_split(env: dict[str, Any]) -> None:
    """10 valid rows minus the held-out test row leave 9: refused before any GPU time."""
    name = _upload(env, "ten.jsonl", _rows("azureml_chat_train.jsonl", 10))
    outcome = _ingest(env, name)
    assert outcome.action == "invalid"
    assert "too_few_rows" in env["ledger"].get(outcome.run_id).error


class _FlakyBlobs:
    """Wraps a blob store and fails the first prepared-data upload with a network error, as the adapter
    reports one (`TransientError`, see tests/test_storage_errors.py)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.failed = inner, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def upload(self, container: str, name: str, data: Any, **kw: Any) -> str:
        if container == PREPARED_CONTAINER and not self.failed:
            self.failed = True
            raise TransientError("blob upload: ServiceRequestError: connection reset by peer")
        return self.inner.upload(container, name, data, **kw)


def test_transient_storage_error_reraises_and_retry_completes(env: dict[str, Any]) -> None:
    """A transient failure re-raises (platform retry) and releases the claim so the retry finishes."""
    name = _upload(env, "flaky.jsonl", _rows("azureml_chat_train.jsonl", 30))
    flaky = _FlakyBlobs(env["blobs"])
    with pytest.raises(TransientError):
        _ingest(env, name, blobs=flaky)
    run_id = run_id_for(TRAINING_CONTAINER, name, env["blobs"].properties(TRAINING_CONTAINER, name)["etag"])
    assert env["ledger"].get(run_id).state == RunState.VALIDATING
    assert _ingest(env, name, blobs=flaky).action == "submitted"
    assert len(env["backend"].submissions) == 1


class _RefusingBackend(FakeBackend):
    def submit_finetune(self, request: Any) -> Any:
        raise ComputeError("compute gpu-cluster is in state Failed")


def test_backend_refusal_is_recorded_not_retried(env: dict[str, Any]) -> None:
    """A submission refused by the backend ends in `error` with the backend's reason."""
    name = _upload(env, "refused.jsonl", _rows("azureml_chat_train.jsonl", 30))
    outcome = _ingest(env, name, backend=_RefusingBackend())
    assert outcome.action == "error"
    record = env["ledger"].get(outcome.run_id)
    assert record.state == RunState.ERROR and "state Failed" in record.error


@pytest.mark.parametrize(("rows", "pct", "expected"), [(200, 5, 10), (20, 5, 1), (1000, 10, 100), (11, 5, 1)])
def test_split_is_exact_and_deterministic(rows: int, pct: int, expected: int) -> None:
    """The held-out count is exact and the chosen rows are the same every time."""
    count, is_test = holdout_indices(rows, pct)
    chosen = [i for i in range(rows) if is_test(i)]
    assert count == expected == len(chosen)
    assert chosen == [i for i in range(rows) if holdout_indices(rows, pct)[1](i)]


def test_trigger_function_streams_the_blob(azurite_env: dict[str, Any], storage_conn: str) -> None:
    """The real blob-trigger function, called with an SDK BlobClient, runs the use case."""
    from azure.storage.blob import BlobServiceClient

    from function_app import app
    from shared.bootstrap import AppContext, set_app_context
    from tunegrid.appindex import functions_of

    env = azurite_env
    name = _upload(env, "trig.jsonl", _rows("ultrachat_small.jsonl", 30))
    ctx = AppContext(
        env["settings"], overrides={"ledger": env["ledger"], "blobs": env["blobs"], "backend": env["backend"]}
    )
    set_app_context(ctx)
    try:
        [fn] = [f for f in functions_of(app) if f.get_function_name() == "ingest_dataset"]
        client = BlobServiceClient.from_connection_string(storage_conn).get_blob_client(TRAINING_CONTAINER, name)
        fn.get_user_function()(client)
    finally:
        set_app_context(None)
    assert len(env["backend"].submissions) == 1


class _OverwrittenBlobs:
    """Wraps a blob store; the dataset is overwritten just after the delivery read its ETag."""

    def __init__(self, inner: Any, name: str, data: bytes) -> None:
        self.inner, self.name, self.data, self.done = inner, name, data, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def chunks(self, container: str, name: str, **kw: Any) -> Any:
        if name == self.name and not self.done:
            self.done = True
            self.inner.upload(container, name, self.data)
        return self.inner.chunks(container, name, **kw)


def test_blob_overwritten_during_ingest_supersedes_that_run(any_env: dict[str, Any]) -> None:
    """A version replaced while it is read is never mixed with the new one: its run ends `superseded` with a
    clear reason (not a raw storage error), nothing is submitted, and the new version's delivery is a new run
    that is submitted."""
    env = any_env
    name = _upload(env, "moving.jsonl", _rows("azureml_chat_train.jsonl", 30))
    moving = _OverwrittenBlobs(env["blobs"], name, _rows("azureml_chat_train.jsonl", 31))
    outcome = _ingest(env, name, blobs=moving)
    assert outcome.action == "superseded", outcome
    record = env["ledger"].get(outcome.run_id)
    assert record.state == RunState.SUPERSEDED
    assert "newer version" in record.error and "ResourceModifiedError" not in record.error
    assert env["backend"].submissions == []
    again = _ingest(env, name)
    assert again.action == "submitted" and again.run_id != outcome.run_id


class _CopiedAndTakenOver(FakeBackend):
    """A backend that, at its first `check_finetune` (the run has passed validation and is `submitting`),
    lets the same bytes be uploaded again and delivered, and then lets the timer take the run over, as if the
    delivery calling it had stalled past its claim (the torture test's sequence, seed 1, under load)."""

    def __init__(self, env: dict[str, Any], name: str, data: bytes) -> None:
        super().__init__()
        self.env, self.name, self.data = env, name, data
        self.copy: Any = None
        self.takeover: Any = None

    def check_finetune(self, request: Any) -> Any:
        if self.copy is None:
            from datetime import timedelta

            from shared.usecases.ingest import resume_stale_ingest
            from shared.usecases.rollout import Rollout

            self.copy = _ingest(self.env, _upload(self.env, self.name.removeprefix(self.env["prefix"]), self.data))
            ports = {k: self.env[k] for k in ("ledger", "blobs", "settings")}
            stalled = self.env["ledger"].get(request.run_id)
            self.takeover = resume_stale_ingest(stalled, Rollout(backend=self, **ports), claim_ttl=timedelta(0))
        return super().check_finetune(request)


def test_a_copy_that_reuses_a_run_never_supersedes_it(any_env: dict[str, Any]) -> None:
    """A version past validation holds its dataset's head. The same bytes uploaded again end `duplicate` and
    reuse it; when its first delivery, stalled, finds that the timer took the run over, that delivery steps
    aside. It must not end the run `superseded` because the blob has a newer version: that version is the
    copy that reuses this run, so nothing would ever train the data."""
    env = any_env
    data = _rows("azureml_chat_train.jsonl", 30)
    name = _upload(env, "copied.jsonl", data)
    backend = _CopiedAndTakenOver(env, name, data)
    stalled = _ingest(env, name, backend=backend)
    assert backend.copy.action == "duplicate" and backend.copy.duplicate_of == stalled.run_id, backend.copy
    assert backend.takeover.action == "submitted", backend.takeover
    assert stalled.action == "duplicate" and "another delivery" in stalled.reason, stalled
    run = env["ledger"].get(stalled.run_id)
    assert run.state == RunState.SUBMITTED, (run.state, run.error)
    assert [r.job_name for r in backend.submissions] == [run.job_name]
    assert backend.jobs[run.job_name].state == JobState.PENDING  # not canceled by the stalled delivery


def test_a_deeply_nested_sidecar_is_reported_not_crashed(env: dict[str, Any]) -> None:
    """A sidecar nested 100,000 levels deep makes the run invalid with a report, not an error without one."""
    _upload(env, "deep.config.json", b'{"finetune": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    name = _upload(env, "deep.jsonl", _rows("azureml_chat_train.jsonl", 20))
    outcome = _ingest(env, name)
    assert outcome.action == "invalid", outcome
    report = json.loads(env["blobs"].read_bytes(REPORTS_CONTAINER, f"{name}/{outcome.run_id}.report.json"))
    [problem] = [e for e in report["errors"] if e["code"] == "invalid_config"]
    assert "nested too deeply" in problem["message"]


def test_every_blob_name_of_a_long_dataset_fits_azure_limit(env: dict[str, Any]) -> None:
    """A dataset name close to Azure's 1,024-character limit still gets its reports and split, every name
    within the limit; the cost estimate lands in the same (shortened) report, which the status reads."""
    from shared.usecases.runs import run_status

    long = "d" * (1000 - len(env["prefix"]) - len(".jsonl")) + ".jsonl"
    name = _upload(env, long, _rows("azureml_chat_train.jsonl", 20))
    assert len(name) == 1000
    outcome = _ingest(env, name)
    assert outcome.action == "submitted", outcome
    written = env["blobs"].list_names(REPORTS_CONTAINER) + env["blobs"].list_names(PREPARED_CONTAINER)
    assert written and max(len(n) for n in written) <= 1024
    reports = [n for n in env["blobs"].list_names(REPORTS_CONTAINER) if outcome.run_id in n]
    assert len(reports) == 2  # the JSON and the Markdown, the estimate written into both
    report = json.loads(env["blobs"].read_bytes(REPORTS_CONTAINER, next(n for n in reports if n.endswith(".json"))))
    assert report["valid"] and report["cost_estimate"] == env["ledger"].get(outcome.run_id).estimate
    status = run_status(env["ledger"], None, outcome.run_id, blobs=env["blobs"])
    assert status["validation"]["valid"] and status["validation"]["rows"] == 20


@pytest.mark.azurite
def test_a_blob_name_with_dot_segments_is_recorded_and_acknowledged(azurite_env: dict[str, Any]) -> None:
    """`a/../b.jsonl` cannot be addressed through the storage API (the URL is normalised): the delivery is
    acknowledged with a recorded rejection instead of failing until the blob is parked in poison."""
    env = azurite_env
    name = env["prefix"] + "sub/../evil.jsonl"
    outcome = _ingest(env, name)
    assert outcome.action == "rejected" and "'..'" in outcome.reason
    [rejection] = [r for r in env["ledger"].rejections() if r["subject"] == f"{TRAINING_CONTAINER}/{name}"]
    assert rejection["source"] == "ingest" and "'..'" in rejection["reason"]
    assert env["backend"].submissions == []


@pytest.mark.parametrize("local_model", ["/etc", "../../..", "/tmp", "smollm2/../../etc"])
def test_local_model_outside_the_allowed_roots_is_invalid(env: dict[str, Any], local_model: str) -> None:
    """`local_model` names a built-in model or a folder under LOCAL_MODEL_ROOTS; anything else makes the run
    invalid at ingest, with the reason in the report, and no trainer starts."""
    _upload(env, "lm.config.json", json.dumps({"local_model": local_model}).encode())
    name = _upload(env, "lm.jsonl", _rows("azureml_chat_train.jsonl", 20))
    outcome = _ingest(env, name)
    assert outcome.action == "invalid", outcome
    report = json.loads(env["blobs"].read_bytes(REPORTS_CONTAINER, f"{name}/{outcome.run_id}.report.json"))
    assert report["valid"] is False
    [problem] = [e for e in report["errors"] if e["code"] == "invalid_config"]
    assert "local_model" in problem["message"] and "LOCAL_MODEL_ROOTS" in problem["message"]
    assert env["backend"].submissions == []


def test_local_model_builtin_or_under_a_root_is_accepted(env: dict[str, Any], tmp_path: Path) -> None:
    """A built-in name, or a folder under one of the LOCAL_MODEL_ROOTS, is accepted and reaches the backend."""
    (tmp_path / "models" / "mine").mkdir(parents=True)
    settings = Settings.from_env(
        {"FINETUNE_BACKEND": "local", "TUNEGRID_INSTANCE": "test", "LOCAL_MODEL_ROOTS": str(tmp_path / "models")}
    )
    for i, local_model in enumerate(["tiny-phi3", str(tmp_path / "models" / "mine")]):
        _upload(env, f"ok{i}.config.json", json.dumps({"local_model": local_model}).encode())
        name = _upload(env, f"ok{i}.jsonl", _rows("azureml_chat_train.jsonl", 20))
        outcome = _ingest(env, name, settings=settings)
        assert outcome.action == "submitted", outcome
        assert env["backend"].submissions[-1].local_model == local_model


@pytest.mark.azurite
def test_ingest_heals_after_the_storage_was_emptied(azurite_env: dict[str, Any], storage: Any) -> None:
    """The emulator restarted empty (tables and output containers gone): the next delivery recreates what it
    needs on first use and completes, without a host restart."""
    from shared.settings import TABLES

    env = azurite_env
    name = _upload(env, "healed.jsonl", _rows("azureml_chat_train.jsonl", 30))
    for table in TABLES:
        storage.tables.delete_table(table)
    for container in (REPORTS_CONTAINER, PREPARED_CONTAINER):
        storage.blobs.delete_container(container)
    outcome = _ingest(env, name)
    assert outcome.action == "submitted", outcome
    assert env["ledger"].get(outcome.run_id).state == RunState.SUBMITTED


class _Killed(BaseException):
    """The host process dying mid-delivery: nothing in the use case catches it, so its claim stays."""


class _DyingBlobs:
    """Wraps a blob store; the first read of the dataset kills the delivery."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.died = inner, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def chunks(self, container: str, name: str, **kw: Any) -> Any:
        if not self.died:
            self.died = True
            raise _Killed
        return self.inner.chunks(container, name, **kw)


def test_a_run_left_by_a_dead_delivery_is_finished_by_the_timer(env: dict[str, Any]) -> None:
    """A delivery that died mid-validation leaves its claim: once the claim is stale the timer takes the run
    over and submits it; a run whose blob was replaced meanwhile ends superseded instead."""
    from datetime import timedelta

    from shared.usecases.rollout import Rollout, tick

    names = [_upload(env, f"dead{i}.jsonl", _rows("azureml_chat_train.jsonl", 30 + i)) for i in range(2)]
    run_ids = []
    for name in names:
        with pytest.raises(_Killed):
            _ingest(env, name, blobs=_DyingBlobs(env["blobs"]))
        etag = env["blobs"].properties(TRAINING_CONTAINER, name)["etag"]
        run_ids.append(run_id_for(TRAINING_CONTAINER, name, etag))
    _upload(env, "dead1.jsonl", _rows("azureml_chat_train.jsonl", 40))
    fresh = Rollout(ledger=env["ledger"], backend=env["backend"], blobs=env["blobs"], settings=env["settings"])
    tick(fresh)
    assert [env["ledger"].get(r).state for r in run_ids] == [RunState.VALIDATING] * 2  # claims still bind
    stale = Rollout(
        ledger=env["ledger"],
        backend=env["backend"],
        blobs=env["blobs"],
        settings=env["settings"],
        claim_ttl=timedelta(0),
    )
    tick(stale)
    done, replaced = (env["ledger"].get(r) for r in run_ids)
    assert done.state == RunState.SUBMITTED and len(env["backend"].submissions) == 1
    assert replaced.state == RunState.SUPERSEDED and "newer version" in replaced.error
