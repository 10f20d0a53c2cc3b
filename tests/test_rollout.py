"""Rollout state machine over the in-memory ledger and blob store and a hand-written fake backend; the
concurrent duplicate events also on Azurite, and the restart from the ledger only there."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from shared.domain.events import parse_run_event
from shared.domain.resources import JobState
from shared.domain.runs import RunState
from shared.settings import LEDGER_TABLE, RUN_REPORTS_CONTAINER, Settings
from shared.usecases.rollout import Rollout, advance_run, handle_run_event, tick
from tests.fakes import FakeBackend, FakeUpstream, InMemoryBlobs, InMemoryLedger
from tests.support import upload_and_ingest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
EVENTS = Path(__file__).resolve().parent / "data" / "events"


def _world(ledger: Any, blobs: Any, unique: str, **settings: str) -> dict[str, Any]:
    return {
        "settings": Settings.from_env({"TUNEGRID_INSTANCE": f"t{unique}", "SMOKE_ROWS": "2", **settings}),
        "ledger": ledger,
        "blobs": blobs,
        "backend": FakeBackend(),
        "prefix": f"r{unique}/",
    }


@pytest.fixture
def world(unique: str) -> dict[str, Any]:
    """The use case's ports in memory."""
    return _world(InMemoryLedger(), InMemoryBlobs(), unique)


@pytest.fixture
def azurite_world(storage: Any, storage_conn: str, unique: str) -> dict[str, Any]:
    """The real table ledger and blob store on Azurite."""
    from shared.adapters.storage import BlobStore
    from shared.adapters.tables import TableRunLedger

    ledger = TableRunLedger(storage.tables.get_table_client(LEDGER_TABLE))
    return {**_world(ledger, BlobStore(storage.blobs), unique, DataStorage=storage_conn), "conn": storage_conn}


@pytest.fixture(params=["memory", pytest.param("azurite", marks=pytest.mark.azurite)])
def any_world(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The same test in memory and on Azurite."""
    return request.getfixturevalue("world" if request.param == "memory" else "azurite_world")


def _rollout(world: dict[str, Any], **kw: Any) -> Rollout:
    backend = kw.get("backend", world["backend"])
    return Rollout(
        ledger=kw.get("ledger", world["ledger"]),
        backend=backend,
        blobs=world["blobs"],
        settings=world["settings"],
        upstream=FakeUpstream(backend),
    )


def _submit(world: dict[str, Any], name: str = "family.jsonl", rows: int = 40, backend: Any = None) -> Any:
    lines = (SAMPLES / "ultrachat_small.jsonl").read_bytes().splitlines()
    offset = random.Random(name + world["prefix"]).randrange(0, 900)
    blob = world["prefix"] + name
    data = b"\n".join(lines[offset : offset + rows]) + b"\n"
    outcome = upload_and_ingest(world, blob, data, backend=backend or world["backend"])
    assert outcome.action == "submitted", outcome
    return world["ledger"].get(outcome.run_id)


def _event(file: str, record: Any) -> list[Any]:
    raw = (EVENTS / file).read_text().replace("{JOB}", record.job_name).replace("{RUN}", record.run_id)
    out = []
    for e in json.loads(raw):
        parsed = parse_run_event(event_id=e["id"], event_type=e["eventType"], subject=e["subject"], data=e["data"])
        if parsed is not None:
            out.append(parsed)
    return out


def _drive(world: dict[str, Any], run_id: str, *, rollout: Rollout | None = None, ticks: int = 20) -> Any:
    rollout = rollout or _rollout(world)
    for _ in range(ticks):
        record = advance_run(run_id, rollout)
        if record.state.terminal or record.state == RunState.LIVE:
            return record
    return world["ledger"].get(run_id)


def test_completed_job_goes_live_with_report(world: dict[str, Any]) -> None:
    """Completion event -> registered -> endpoint + deployment at 0 % -> smoke -> 100 % -> live."""
    record = _submit(world)
    backend = world["backend"]
    backend.set_job(record.job_name, JobState.COMPLETED)
    [event] = _event("parent_completed.json", record)
    outcome = handle_run_event(event, _rollout(world))
    assert outcome.action == "advanced"
    live = _drive(world, record.run_id)
    assert live.state == RunState.LIVE, live.error
    states = [s for s, _ in live.timeline]
    assert states[-8:] == [
        "running",
        "succeeded",
        "registering",
        "deploying",
        "smoke-testing",
        "evaluating",
        "shifting-traffic",
        "live",
    ] or states[-7:] == [
        "succeeded",
        "registering",
        "deploying",
        "smoke-testing",
        "evaluating",
        "shifting-traffic",
        "live",
    ]
    assert backend.calls["register_model"] == 1 and backend.calls["begin_create_deployment"] == 1
    endpoint = backend.get_endpoint(live.endpoint)
    assert endpoint.traffic == {live.deployment: 100}
    assert endpoint.tags["tunegrid-owner"] == world["settings"].instance
    created = [args for m, args in backend.log if m == "begin_create_deployment"]
    first_traffic = next(args for m, args in backend.log if m == "begin_set_traffic")
    assert created and first_traffic[1] == {live.deployment: 100}
    assert live.smoke["passed"] is True and len(live.smoke["rows"]) == 2
    assert all(r["latency_ms"] >= 0 for r in live.smoke["rows"])
    report = json.loads(world["blobs"].read_bytes(RUN_REPORTS_CONTAINER, f"{live.run_id}/report.json"))
    assert report["state"] == "live" and report["model"]["version"] == live.model_version
    assert report["metrics_series"]["loss"] == [[1, 2.5], [2, 1.5]]
    assert [t["state"] for t in report["timeline"]][-1] == "live"


def test_second_run_replaces_the_first_blue_green(world: dict[str, Any]) -> None:
    """Same model family: the new deployment takes 100 %, the old one is deleted, its run retired."""
    first = _submit(world, "family.jsonl")
    world["backend"].set_job(first.job_name, JobState.COMPLETED)
    first = _drive(world, first.run_id)
    second = _submit(world, "family.jsonl", rows=41)
    world["backend"].set_job(second.job_name, JobState.COMPLETED)
    second = _drive(world, second.run_id)
    assert second.state == RunState.LIVE and second.endpoint == first.endpoint
    assert second.previous_deployment == first.deployment
    deletes = [args for m, args in world["backend"].log if m == "begin_delete_deployment"]
    assert deletes == [(first.endpoint, first.deployment)]
    assert world["ledger"].get(first.run_id).state == RunState.RETIRED


def test_failing_smoke_rolls_back_and_keeps_old_traffic(world: dict[str, Any]) -> None:
    """Empty answers from the new deployment: it is deleted, the old one keeps 100 %."""
    first = _submit(world, "family.jsonl")
    world["backend"].set_job(first.job_name, JobState.COMPLETED)
    first = _drive(world, first.run_id)
    second = _submit(world, "family.jsonl", rows=42)
    world["backend"].set_job(second.job_name, JobState.COMPLETED)
    world["backend"].mute_deployments.add(f"d-{second.run_id}")
    second = _drive(world, second.run_id)
    assert second.state == RunState.ROLLED_BACK
    assert "smoke test failed" in second.error and "empty answer" in second.error
    assert world["backend"].get_endpoint(first.endpoint).traffic.get(first.deployment) == 100
    assert world["ledger"].get(first.run_id).state == RunState.LIVE
    assert ("begin_delete_deployment", (second.endpoint, second.deployment)) in world["backend"].log


def test_failed_provisioning_rolls_back(world: dict[str, Any]) -> None:
    """A deployment that fails to provision is removed and the run is rolled back with the reason."""
    record = _submit(world)
    world["backend"].set_job(record.job_name, JobState.COMPLETED)
    world["backend"].failing_deployments.add(f"d-{record.run_id}")
    final = _drive(world, record.run_id)
    assert final.state == RunState.ROLLED_BACK and "image failed to start" in final.error


@pytest.mark.parametrize(
    ("file", "state", "expected"),
    [
        ("parent_failed.json", JobState.FAILED, RunState.FAILED),
        ("parent_canceled.json", JobState.CANCELED, RunState.CANCELED),
    ],
)
def test_failed_and_canceled_jobs_are_recorded_with_reason(
    world: dict[str, Any], file: str, state: JobState, expected: RunState
) -> None:
    """The reason comes from the backend (the failed step's message), not from the event."""
    record = _submit(world)
    world["backend"].set_job(
        record.job_name, state, error="finetune step: CUDA out of memory" if state == JobState.FAILED else None
    )
    [event] = _event(file, record)
    handle_run_event(event, _rollout(world))
    final = world["ledger"].get(record.run_id)
    assert final.state == expected
    assert ("CUDA out of memory" in final.error) if state == JobState.FAILED else ("canceled" in final.error)
    assert (
        json.loads(world["blobs"].read_bytes(RUN_REPORTS_CONTAINER, f"{record.run_id}/report.json"))["state"]
        == expected.value
    )


@pytest.mark.parametrize("file", ["child_completed.json", "child_failed.json", "foreign_completed.json"])
def test_child_and_foreign_events_are_ignored(world: dict[str, Any], file: str) -> None:
    """Pipeline steps and runs we did not submit never move a run."""
    record = _submit(world)
    world["backend"].set_job(record.job_name, JobState.COMPLETED)
    [event] = _event(file, record)
    assert handle_run_event(event, _rollout(world)).action == "ignored"
    assert world["ledger"].get(record.run_id).state == RunState.SUBMITTED


def test_pascal_case_and_unknown_fields_parse(world: dict[str, Any]) -> None:
    """PascalCase keys and unknown fields are tolerated at the edge."""
    record = _submit(world)
    [event] = _event("parent_completed_pascal.json", record)
    assert event.run_id == record.job_name and event.our_run_id == record.run_id and event.state == JobState.COMPLETED
    assert _event("model_registered.json", record) == []


def test_ten_duplicate_events_concurrently_and_shuffled(any_world: dict[str, Any]) -> None:
    """10 copies of the completion (and stale running events), concurrently: 1 version, 1 deployment, 1 shift."""
    world = any_world
    record = _submit(world)
    world["backend"].set_job(record.job_name, JobState.COMPLETED)
    events = (
        _event("duplicate_completed.json", record) * 4
        + _event("parent_completed.json", record) * 2
        + _event("parent_running.json", record) * 2
    )
    random.Random(3).shuffle(events)
    rollout = _rollout(world)
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda e: handle_run_event(e, rollout), events))
    final = _drive(world, record.run_id)
    assert final.state == RunState.LIVE
    backend = world["backend"]
    assert len(backend.models) == 1
    assert backend.calls["begin_create_deployment"] == 1 and backend.calls["begin_create_endpoint"] == 1
    shifts = [args for m, args in backend.log if m == "begin_set_traffic" and args[1].get(final.deployment) == 100]
    assert len(shifts) == 1


def test_transient_faults_everywhere_still_reach_live_without_duplicates(world: dict[str, Any]) -> None:
    """p=0.3 transient failure on every backend call: ticks keep going until live; nothing doubles."""
    clean = FakeBackend()
    record = _submit(world, backend=clean)
    flaky = FakeBackend(fail_rate=0.3, seed=11)
    flaky.jobs = clean.jobs
    flaky.set_job(record.job_name, JobState.COMPLETED)
    rollout = _rollout(world, backend=flaky)
    for _ in range(200):
        try:
            tick(rollout)
        except Exception:  # a tick may fail as a whole (e.g. list); the timer fires again
            pass
        if world["ledger"].get(record.run_id).state == RunState.LIVE:
            break
    final = world["ledger"].get(record.run_id)
    assert final.state == RunState.LIVE, (final.state, final.error)
    assert len(flaky.models) == 1
    assert len([k for k in flaky.deployments if k[0] == final.endpoint]) == 1
    assert flaky.calls["begin_create_deployment"] >= 1 and len(flaky.endpoints) == 1


def test_deploying_run_completes_after_a_restart(azurite_world: dict[str, Any]) -> None:
    """Stop mid-deploy; a new process (fresh clients, fresh rollout) finishes it from the ledger."""
    from shared.adapters.storage import BlobStore, StorageClients
    from shared.adapters.tables import TableRunLedger

    world = azurite_world
    backend = FakeBackend(settle_after=3)
    record = _submit(world, backend=backend)
    backend.set_job(record.job_name, JobState.COMPLETED)
    advance_run(record.run_id, _rollout(world, backend=backend))
    assert world["ledger"].get(record.run_id).state == RunState.DEPLOYING
    fresh = StorageClients.from_connection({"": world["conn"]})
    rollout2 = Rollout(
        ledger=TableRunLedger(fresh.tables.get_table_client(LEDGER_TABLE)),
        backend=backend,
        blobs=BlobStore(fresh.blobs),
        settings=world["settings"],
        upstream=FakeUpstream(backend),
    )
    for _ in range(15):
        tick(rollout2)
    assert world["ledger"].get(record.run_id).state == RunState.LIVE
    assert backend.calls["begin_create_deployment"] == 1


@pytest.mark.parametrize(
    "data",
    [None, [1, 2], {"runId": "x", "runType": "azureml.PipelineRun", "runTags": {"tunegridrunid": "a/b#c?\x01"}}],
    ids=["null", "array", "bad-tag"],
)
def test_bad_run_events_are_acknowledged_not_retried(azurite_world: dict[str, Any], data: Any) -> None:
    """An event whose data is not an object, or whose run tag cannot be a table key, is acknowledged at once
    (the function returns; Event Grid does not retry it into the dead-letter queue); a malformed one is
    recorded with its id."""
    import azure.functions as func

    from function_app import app
    from shared.bootstrap import AppContext, set_app_context
    from shared.domain.events import RUN_COMPLETED
    from tunegrid.appindex import functions_of

    world = azurite_world
    ctx = AppContext(
        world["settings"], overrides={"ledger": world["ledger"], "blobs": world["blobs"], "backend": world["backend"]}
    )
    [fn] = [f.get_user_function() for f in functions_of(app) if f.get_function_name() == "job_events"]
    event_id = f"bad-{world['prefix'].strip('/')}"
    event = func.EventGridEvent(
        id=event_id,
        data=data,
        topic="/subscriptions/x/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws",
        subject="experiments/e/runs/x",
        event_type=RUN_COMPLETED,
        event_time=None,
        data_version="1",
    )
    set_app_context(ctx)
    try:
        fn(event)
    finally:
        set_app_context(None)
    if not isinstance(data, dict):
        [rejection] = [r for r in world["ledger"].rejections() if r["subject"] == event_id]
        assert rejection["source"] == "job_events" and "expected an object" in rejection["reason"]
