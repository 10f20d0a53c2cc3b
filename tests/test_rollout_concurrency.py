"""Runs that meet: several versions of one dataset, a poison run among good ones, cancel in any state, and a
lease holder that outlives its lease. On the in-memory ledger and blob store (tests/fakes.py, held to the
real adapters by tests/test_storage_contract.py) and the fake backend."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.domain.janitor_rules import ROLLOUT_STATES
from shared.domain.resources import JobState
from shared.domain.runs import IN_FLIGHT, RunState
from shared.errors import BackendError, InvalidInput
from shared.settings import RUN_REPORTS_CONTAINER, Settings
from shared.usecases.rollout import Rollout, advance_run, tick
from shared.usecases.runs import cancel_run
from tests.fakes import FakeBackend, FakeUpstream, InMemoryBlobs, InMemoryLedger
from tests.support import upload_and_ingest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
LINES = (SAMPLES / "ultrachat_small.jsonl").read_bytes().splitlines()


class Clock:
    """A settable clock for the roll-out (`Rollout.now`): a test moves time past a lease without sleeping."""

    def __init__(self) -> None:
        self.at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
        self.lock = threading.Lock()

    def __call__(self) -> datetime:
        with self.lock:
            return self.at

    def advance(self, delta: timedelta) -> None:
        with self.lock:
            self.at += delta


@pytest.fixture
def world(unique: str) -> dict[str, Any]:
    """The use cases' ports in memory, with a settable clock."""
    return {
        "settings": Settings.from_env({"TUNEGRID_INSTANCE": f"c{unique}", "SMOKE_ROWS": "2"}),
        "ledger": InMemoryLedger(),
        "blobs": InMemoryBlobs(),
        "backend": FakeBackend(),
        "prefix": f"c{unique}/",
        "clock": Clock(),
    }


def _rollout(world: dict[str, Any], **settings: str) -> Rollout:
    base = world["settings"]
    if settings:
        base = Settings.from_env({"TUNEGRID_INSTANCE": base.instance, "SMOKE_ROWS": "2", **settings})
    return Rollout(
        ledger=world["ledger"],
        backend=world["backend"],
        blobs=world["blobs"],
        settings=base,
        upstream=FakeUpstream(world["backend"]),
        now=world["clock"],
    )


def _upload_and_ingest(world: dict[str, Any], name: str, *, offset: int = 0, rows: int = 24) -> Any:
    return upload_and_ingest(world, world["prefix"] + name, b"\n".join(LINES[offset : offset + rows]) + b"\n")


def _complete_live_jobs(backend: FakeBackend) -> None:
    """The backend finishes every job nobody canceled."""
    for name, job in list(backend.jobs.items()):
        if job.state not in (JobState.CANCELED, JobState.FAILED):
            backend.set_job(name, JobState.COMPLETED)


def _tick_until_quiet(rollout: Rollout, *, limit: int = 40) -> int:
    """Ticks until no run is in flight; returns how many it took (fails past `limit`)."""
    for n in range(1, limit + 1):
        tick(rollout)
        if not [r for r in rollout.ledger.list() if r.state in IN_FLIGHT]:
            return n
    states = sorted((r.run_id, r.state.value) for r in rollout.ledger.list())
    raise AssertionError(f"runs still in flight after {limit} ticks: {states}")


def _full_shifts(backend: FakeBackend) -> list[dict[str, int]]:
    return [args[1] for m, args in backend.log if m == "begin_set_traffic" and 100 in args[1].values()]


# ---- 1. one endpoint, five versions -------------------------------------------------------------


def test_five_uploads_of_the_same_content_train_once(world: dict[str, Any]) -> None:
    """The same bytes uploaded five times (five blob versions) are trained once; the later versions are
    recorded as duplicates of the first run, which goes live alone."""
    outcomes = [_upload_and_ingest(world, "same.jsonl") for _ in range(5)]
    first = outcomes[0]
    assert first.action == "submitted", first
    assert len(world["backend"].submissions) == 1
    assert [o.action for o in outcomes[1:]] == ["duplicate"] * 4
    for outcome in outcomes[1:]:
        record = world["ledger"].get(outcome.run_id)
        assert record.state == RunState.DUPLICATE and record.extra["duplicate_of"] == first.run_id
        assert first.run_id in record.error
    _complete_live_jobs(world["backend"])
    _tick_until_quiet(_rollout(world))
    assert world["ledger"].get(first.run_id).state == RunState.LIVE
    assert len(_full_shifts(world["backend"])) == 1


def test_five_versions_in_a_burst_converge_in_one_shift(world: dict[str, Any]) -> None:
    """Five different versions of one dataset name: the newest supersedes the four older ones (their jobs are
    canceled, no deployment of theirs is created), goes live with one traffic shift, and no run is left in
    a roll-out state that would keep the janitor off the endpoint."""
    outcomes = [_upload_and_ingest(world, "burst.jsonl", offset=100 * i) for i in range(5)]
    assert [o.action for o in outcomes] == ["submitted"] * 5
    newest, older = outcomes[-1], outcomes[:-1]
    backend = world["backend"]
    later = [o.run_id for o in outcomes]
    for i, outcome in enumerate(older):
        record = world["ledger"].get(outcome.run_id)
        assert record.state == RunState.SUPERSEDED, record.state
        assert f"superseded by run {later[i + 1]}, a newer version of" in record.error
        assert backend.jobs[record.job_name].state == JobState.CANCELED
    _complete_live_jobs(backend)
    ticks = _tick_until_quiet(_rollout(world))
    live = world["ledger"].get(newest.run_id)
    assert live.state == RunState.LIVE, (live.state, live.error)
    assert backend.calls["begin_create_deployment"] == 1 and len(backend.models) == 1
    assert _full_shifts(backend) == [{live.deployment: 100}]
    assert not [r for r in world["ledger"].list() if r.state in ROLLOUT_STATES]
    assert ticks <= 8


# ---- 2. one bad run never blocks another ---------------------------------------------------------


def test_a_refused_deployment_errors_its_run_and_the_tick_moves_the_others(world: dict[str, Any]) -> None:
    """A non-transient refusal (no quota) on one run's deployment moves that run to `error` with the reason in
    its status and run report; the same ticks carry the other run to live."""
    good = _upload_and_ingest(world, "good.jsonl")
    poison = _upload_and_ingest(world, "poison.jsonl", offset=300)
    backend = world["backend"]

    def refuse(endpoint: str, deployment: str) -> None:
        if deployment == f"d-{poison.run_id}":
            raise BackendError("quota exceeded: 0 of 16 cores of Standard_NC24ads_A100_v4 left")

    backend.hooks["begin_create_deployment"] = refuse
    _complete_live_jobs(backend)
    rollout = _rollout(world)
    for _ in range(12):
        tick(rollout)
    bad = world["ledger"].get(poison.run_id)
    assert bad.state == RunState.ERROR and "quota exceeded" in bad.error
    report = json.loads(world["blobs"].read_bytes(RUN_REPORTS_CONTAINER, f"{bad.run_id}/report.json"))
    assert report["state"] == "error" and "quota exceeded" in report["error"]
    assert world["ledger"].get(good.run_id).state == RunState.LIVE


def _to_state(world: dict[str, Any], run_id: str, state: RunState) -> Any:
    rollout = _rollout(world)
    for _ in range(20):
        record = advance_run(run_id, rollout, max_steps=1)
        if record.state == state:
            return record
    raise AssertionError(f"run {run_id} never reached {state.value}")


@pytest.mark.parametrize(
    "state",
    [RunState.SUBMITTED, RunState.DEPLOYING, RunState.SMOKE_TESTING, RunState.EVALUATING, RunState.SHIFTING_TRAFFIC],
)
def test_cancel_works_in_every_state_before_live(world: dict[str, Any], state: RunState) -> None:
    """Cancel moves the run to `canceled` at once and undoes what it started: the job is canceled, a
    deployment at 0 % is removed; a second cancel is refused."""
    outcome = _upload_and_ingest(world, "cancel.jsonl")
    backend = world["backend"]
    if state != RunState.SUBMITTED:
        backend.set_job(f"tunegrid-{outcome.run_id}", JobState.COMPLETED)
        record = _to_state(world, outcome.run_id, state)
        if state == RunState.DEPLOYING:  # let the endpoint settle and the deployment start
            for _ in range(3):
                advance_run(outcome.run_id, _rollout(world), max_steps=1)
                record = world["ledger"].get(outcome.run_id)
            assert record.state == RunState.DEPLOYING and backend.calls["begin_create_deployment"] == 1
    cancel_run(world["ledger"], backend, outcome.run_id, blobs=world["blobs"], settings=world["settings"])
    record = world["ledger"].get(outcome.run_id)
    assert record.state == RunState.CANCELED and "canceled" in record.error
    if state == RunState.SUBMITTED:
        assert backend.jobs[record.job_name].state == JobState.CANCELED
    else:
        assert ("begin_delete_deployment", (record.endpoint, record.deployment)) in backend.log
    with pytest.raises(InvalidInput, match="already canceled"):
        cancel_run(world["ledger"], backend, outcome.run_id, blobs=world["blobs"], settings=world["settings"])


# ---- 7. the lease is a fenced value ---------------------------------------------------------------


def test_a_stale_lease_holder_never_deletes_a_deployment(world: dict[str, Any]) -> None:
    """Worker 1's smoke request outlives its lease; worker 2 takes the lease over and moves the run on. When
    worker 1's request then fails, it must not delete the deployment: its lease is gone, so it stops."""
    outcome = _upload_and_ingest(world, "stale.jsonl")
    backend, clock = world["backend"], world["clock"]
    backend.set_job(f"tunegrid-{outcome.run_id}", JobState.COMPLETED)
    record = _to_state(world, outcome.run_id, RunState.SMOKE_TESTING)
    started, resume = threading.Event(), threading.Event()
    first = threading.current_thread()

    def slow_then_failing(endpoint: str, deployment: str | None) -> None:
        if threading.current_thread() is first:
            return
        if not started.is_set():
            started.set()
            assert resume.wait(10)
            raise BackendError("upstream answered 500")

    backend.hooks["score"] = slow_then_failing
    errors: list[BaseException] = []

    def worker_1() -> None:
        try:
            advance_run(record.run_id, _rollout(world), max_steps=1)
        except BaseException as exc:  # the test inspects what worker 1 did, not how it ended
            errors.append(exc)

    thread = threading.Thread(target=worker_1)
    thread.start()
    try:
        assert started.wait(10)
        clock.advance(timedelta(hours=1))
        moved = advance_run(record.run_id, _rollout(world), max_steps=1)
        assert moved.state == RunState.EVALUATING
    finally:
        resume.set()
        thread.join(10)
    deletes = [args for m, args in backend.log if m == "begin_delete_deployment"]
    assert deletes == []
    assert world["ledger"].get(record.run_id).state == RunState.EVALUATING


def test_a_smoke_step_as_long_as_its_settings_allow_keeps_its_lease(world: dict[str, Any]) -> None:
    """Three smoke rows that each take almost SMOKE_TIMEOUT_S (120 s): a second worker arriving during the
    third finds the lease held (renewed after each row) and sends no smoke request of its own."""
    outcome = _upload_and_ingest(world, "longsmoke.jsonl", rows=60)
    backend, clock = world["backend"], world["clock"]
    backend.set_job(f"tunegrid-{outcome.run_id}", JobState.COMPLETED)
    rollout = _rollout(world, SMOKE_ROWS="3", SMOKE_TIMEOUT_S="120")
    record = _to_state(world, outcome.run_id, RunState.SMOKE_TESTING)
    calls: list[str] = []
    second: list[Any] = []

    def slow(endpoint: str, deployment: str | None) -> None:
        calls.append(threading.current_thread().name)
        clock.advance(timedelta(seconds=119))
        if len(calls) == 3:
            other = threading.Thread(
                target=lambda: second.append(advance_run(record.run_id, rollout, max_steps=1)), name="worker-2"
            )
            other.start()
            other.join(10)

    backend.hooks["score"] = slow
    final = advance_run(record.run_id, rollout, max_steps=1)
    assert "worker-2" not in calls, calls
    assert len(calls) == 3 and final.state == RunState.EVALUATING
    assert second and second[0].state == RunState.SMOKE_TESTING


def test_an_undo_that_fails_is_finished_by_a_later_tick(world: dict[str, Any]) -> None:
    """Cancel wins the move, but canceling the job fails (a transient error): the run is marked undo-pending,
    and the next tick cancels the job and clears the mark."""
    from shared.errors import TransientError
    from shared.usecases.rollout.ending import UNDO_PENDING

    outcome = _upload_and_ingest(world, "undo.jsonl")
    backend = world["backend"]
    failures = [TransientError("injected: cancel timed out")]

    def flaky_cancel(job_name: str) -> None:
        if failures:
            raise failures.pop()

    backend.hooks["cancel_job"] = flaky_cancel
    cancel_run(world["ledger"], backend, outcome.run_id, blobs=world["blobs"], settings=world["settings"])
    record = world["ledger"].get(outcome.run_id)
    assert record.state == RunState.CANCELED and record.operation == UNDO_PENDING
    assert backend.jobs[record.job_name].state == JobState.PENDING
    tick(_rollout(world))
    record = world["ledger"].get(outcome.run_id)
    assert record.operation == "" and backend.jobs[record.job_name].state == JobState.CANCELED


def _live_with_a_stray(world: dict[str, Any], name: str) -> tuple[Any, Callable[[], None]]:
    """A run gone live, a second deployment `d-stray` on its endpoint, and the late traffic update that moves all
    the traffic to the stray (what a holder that stalled past its lease sends)."""
    from shared.domain.resources import DeploymentSpec, ModelRef

    first = _upload_and_ingest(world, name)
    backend = world["backend"]
    backend.set_job(f"tunegrid-{first.run_id}", JobState.COMPLETED)
    live = _to_state(world, first.run_id, RunState.LIVE)
    stray = DeploymentSpec(live.endpoint, "d-stray", ModelRef("m", "1", "azureml:m:1"), instance_type="cpu")
    backend.begin_create_deployment(stray)
    backend.get_deployment(live.endpoint, "d-stray")

    def late_update() -> None:
        backend.get_endpoint(live.endpoint)  # settle whatever is in progress
        backend.begin_set_traffic(live.endpoint, {live.deployment: 0, "d-stray": 100}, mirror_traffic={})
        backend.get_endpoint(live.endpoint)

    return live, late_update


def test_a_late_traffic_update_is_put_right_after_going_live(world: dict[str, Any]) -> None:
    """A traffic update that lands after a run went live (sent by a holder that stalled past its lease) is put
    right by the next tick, unless another run of the endpoint is rolling out (its shift decides), for three
    lease TTLs after going live and at the first conclusive check after that; later changes are left alone."""
    backend, clock = world["backend"], world["clock"]
    rollout = _rollout(world)
    live, late_update = _live_with_a_stray(world, "a/twin.jsonl")
    late_update()
    tick(rollout)
    backend.get_endpoint(live.endpoint)
    assert backend.get_endpoint(live.endpoint).traffic == {live.deployment: 100, "d-stray": 0}

    second = _upload_and_ingest(world, "b/twin.jsonl", offset=200)
    backend.set_job(f"tunegrid-{second.run_id}", JobState.COMPLETED)
    rolling = _to_state(world, second.run_id, RunState.DEPLOYING)
    assert rolling.endpoint == live.endpoint
    late_update()
    tick(rollout)  # the second run's deploy step holds the endpoint now: the traffic is its shift's business
    assert world["ledger"].get(second.run_id).state in (RunState.DEPLOYING, RunState.SMOKE_TESTING)
    assert backend.get_endpoint(live.endpoint).traffic.get(live.deployment) == 0
    # its endpoint lease lapses between two of its steps (its run lease is held by a stalled delivery, so this
    # tick does not renew it): it still rolls out, so the guard still leaves the traffic alone
    clock.advance(rollout.ttl * 2)
    held = world["ledger"].get(second.run_id)
    stalled = f"{held.state.value}|other|{(clock() + timedelta(hours=1)).isoformat()}"
    world["ledger"].update(held, operation=stalled)
    tick(rollout)
    assert backend.get_endpoint(live.endpoint).traffic.get(live.deployment) == 0
    cancel_run(world["ledger"], backend, second.run_id, blobs=world["blobs"], settings=world["settings"])
    clock.at = datetime.now(UTC) + timedelta(days=1)  # the records' times are real ones
    tick(rollout)  # the window closed while the other roll-out held the endpoint: this tick checks once more
    backend.get_endpoint(live.endpoint)
    assert backend.get_endpoint(live.endpoint).traffic.get(live.deployment) == 100
    assert world["ledger"].get(live.run_id).extra["traffic_guarded"] is True
    late_update()  # after that check, a change of the traffic is someone's choice (an operator's split)
    tick(rollout)
    assert backend.get_endpoint(live.endpoint).traffic.get(live.deployment) == 0


def test_a_late_traffic_update_is_put_right_when_no_tick_ran_inside_the_guard_window(world: dict[str, Any]) -> None:
    """The guard window is a time and the timer can be late (a host restart, a queue of ticks): an update that
    landed inside the window is put right by the first tick after it closed, and that check ends the guard."""
    backend, clock = world["backend"], world["clock"]
    live, late_update = _live_with_a_stray(world, "late.jsonl")
    late_update()
    clock.at = datetime.now(UTC) + timedelta(days=1)  # no tick ran inside the window (the records' times are real)
    tick(_rollout(world))
    backend.get_endpoint(live.endpoint)
    assert backend.get_endpoint(live.endpoint).traffic == {live.deployment: 100, "d-stray": 0}
    record = world["ledger"].get(live.run_id)
    assert record.state == RunState.LIVE and record.extra["traffic_guarded"] is True
    calls = len(backend.log)
    tick(_rollout(world))  # guarded: the next ticks do not even read the endpoint for it
    assert not [m for m, _ in backend.log[calls:] if m in ("get_endpoint", "begin_set_traffic")]


def test_a_live_run_that_changes_while_being_replaced_is_still_retired(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shift retires the endpoint's live run before its own run goes live. A live record has no lease, and
    the run-event publisher may empty its outbox between the shift's read and its write: the retire re-reads
    and tries again instead of leaving two live runs on the endpoint for good (found while looking for why
    torture seed 1 once did not converge in CI).
    A record that keeps changing fails the step transiently; the next tick finishes it."""
    from shared.usecases.runs import RETIRE_ATTEMPTS

    ledger, backend = world["ledger"], world["backend"]
    first = _upload_and_ingest(world, "a/swap.jsonl")
    backend.set_job(f"tunegrid-{first.run_id}", JobState.COMPLETED)
    _to_state(world, first.run_id, RunState.LIVE)
    second = _upload_and_ingest(world, "b/swap.jsonl", offset=200)
    backend.set_job(f"tunegrid-{second.run_id}", JobState.COMPLETED)
    assert _to_state(world, second.run_id, RunState.SHIFTING_TRAFFIC).endpoint == ledger.get(first.run_id).endpoint

    write = ledger._replace
    writes = {"left": 0}

    def publisher_first(record: Any) -> Any:
        """Another writer changes the live record between the retire's read and its write (as
        `publish_left_over` may: it empties the outbox of a record nobody holds)."""
        if record.run_id == first.run_id and record.state == RunState.RETIRED and writes["left"]:
            writes["left"] -= 1
            ledger.update(ledger.get(first.run_id), outbox=())
        return write(record)

    monkeypatch.setattr(ledger, "_replace", publisher_first)
    writes["left"] = RETIRE_ATTEMPTS  # changes under every attempt: this tick gives up, transiently
    rollout = _rollout(world)
    for _ in range(6):
        tick(rollout)
        assert [r.state for r in (ledger.get(first.run_id), ledger.get(second.run_id))].count(RunState.LIVE) == 1
        if writes["left"] == 0:
            break
    assert ledger.get(first.run_id).state == RunState.LIVE
    assert ledger.get(second.run_id).state == RunState.SHIFTING_TRAFFIC
    writes["left"] = 2  # changes twice more, then lets the retire land: the next tick finishes the swap
    _tick_until_quiet(rollout)
    retired, live = ledger.get(first.run_id), ledger.get(second.run_id)
    assert retired.state == RunState.RETIRED and retired.error == f"replaced by run {second.run_id}"
    assert live.state == RunState.LIVE and writes["left"] == 0
    backend.get_endpoint(live.endpoint)
    assert backend.get_endpoint(live.endpoint).traffic == {live.deployment: 100}
