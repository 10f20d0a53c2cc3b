"""Run events: one CloudEvent per state change, recorded in the run's outbox by the change itself, published
at least once and in order, never failing the run, and never carrying a secret.

The use cases run on the in-memory ports (`FakeBackend`, `InMemoryLedger`, `RecordingRunEvents`); the
envelope and the secrets check go through the real adapter (`EventGridPublisherClient`) to the dev host's
stand-in topic and a webhook subscriber, where the SDK's `CloudEvent` model reads every event."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.domain.clock import utcnow
from shared.domain.resources import JobRef, JobState
from shared.domain.run_events import EVENT_TYPES, FAILURE_STATES, event_source, event_type, scrub_text, scrub_url
from shared.domain.runs import RunRecord, RunState, apply_transition, new_record
from shared.errors import ConfigError, InvalidInput, TransientError
from shared.settings import RUN_REPORTS_CONTAINER, TRAINING_CONTAINER, Settings
from shared.usecases.rollout import Rollout, advance_run, tick
from shared.usecases.run_events import LEFT_OVER_AFTER, NotifyingLedger, publish_left_over
from tests.fakes import FakeBackend, FakeUpstream, InMemoryBlobs, InMemoryLedger, RecordingRunEvents
from tests.support import upload_and_ingest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
SECRETS = {
    "sas": "sig=SAS-SECRET-0123456789abcdef",
    "function key": "code=FUNCTION-KEY-SECRET-abcdef",
    "account key": "AccountKey=ACCOUNT-KEY-SECRET==",
    "bearer": "Bearer eyJSECRETTOKENabcdef.payload.sig",
}


class SasBlobs(InMemoryBlobs):
    """Blob URLs with a SAS token, as a store that hands out SAS links would give them."""

    def url(self, container: str, name: str) -> str:
        return super().url(container, name) + "?sv=2024-05-04&sp=r&" + SECRETS["sas"]


class SecretLinksBackend(FakeBackend):
    """A backend whose job links carry query strings: a secret, and Azure ML studio's workspace id."""

    def submit_finetune(self, request: Any) -> JobRef:
        ref = super().submit_finetune(request)
        return replace(ref, studio_url=f"{ref.studio_url}?wsid=/subscriptions/s/workspaces/w&{SECRETS['function key']}")


def _world(*, events: RecordingRunEvents | None = None, **kw: Any) -> dict[str, Any]:
    events = events if events is not None else RecordingRunEvents()
    store = InMemoryLedger()
    return {
        "settings": Settings.from_env({"TUNEGRID_INSTANCE": "tevents", "SMOKE_ROWS": "2"}),
        "store": store,
        "ledger": NotifyingLedger(store, events),
        "events": events,
        "blobs": kw.get("blobs") or InMemoryBlobs(),
        "backend": kw.get("backend") or FakeBackend(),
    }


def _rollout(world: dict[str, Any], **kw: Any) -> Rollout:
    return Rollout(
        ledger=world["ledger"],
        backend=world["backend"],
        blobs=world["blobs"],
        settings=world["settings"],
        upstream=FakeUpstream(world["backend"]),
        events=world["events"],
        **kw,
    )


def _upload(world: dict[str, Any], name: str = "events.jsonl", rows: int = 40, data: bytes | None = None) -> Any:
    if data is None:
        lines = (SAMPLES / "ultrachat_small.jsonl").read_bytes().splitlines()
        offset = random.Random(name).randrange(0, 900)
        data = b"\n".join(lines[offset : offset + rows]) + b"\n"
    return upload_and_ingest(world, name, data)


def _drive(world: dict[str, Any], run_id: str, **kw: Any) -> RunRecord:
    rollout = _rollout(world, **kw)
    record = world["ledger"].get(run_id)
    for _ in range(20):
        record = advance_run(run_id, rollout)
        if record.state.terminal or record.state == RunState.LIVE:
            break
    return record


def _timeline(record: RunRecord) -> list[str]:
    return [state for state, _ in record.timeline]


# ---- the event itself -----------------------------------------------------------------------------


def test_one_event_type_per_state_in_pascal_case() -> None:
    """`Tunegrid.Run.<State>`: every state has its own type, so subscriptions filter on the type alone."""
    assert event_type(RunState.SMOKE_TESTING) == "Tunegrid.Run.SmokeTesting"
    assert event_type(RunState.ROLLED_BACK) == "Tunegrid.Run.RolledBack"
    assert event_type(RunState.LIVE) == "Tunegrid.Run.Live"
    assert len(set(EVENT_TYPES.values())) == len(RunState)
    assert all(re.fullmatch(r"Tunegrid\.Run\.(?:[A-Z][a-z]+)+", t) for t in EVENT_TYPES.values())
    assert [EVENT_TYPES[s] for s in FAILURE_STATES] == [
        "Tunegrid.Run.Invalid",
        "Tunegrid.Run.Failed",
        "Tunegrid.Run.RolledBack",
        "Tunegrid.Run.Error",
    ]
    assert event_source("tunegrid-demo") == "/tunegrid/tunegrid-demo"


def test_a_record_from_before_run_events_reads_and_moves_on() -> None:
    """A row written before the outbox existed has no events; its next move is event 1 and the row stays valid."""
    old = new_record(run_id="rold", container="training-data", blob="a.jsonl", blob_version="v", backend="local")
    entity = {k: v for k, v in old.to_entity().items() if k not in ("outbox", "event_seq")}
    record = RunRecord.from_entity(entity)
    assert record.outbox == () and record.event_seq == 0
    moved = apply_transition(record, RunState.VALIDATING, None, {})
    assert [e["id"] for e in moved.outbox] == ["rold-1"] and moved.outbox[0]["data"]["previousState"] == "received"
    assert RunRecord.from_entity(moved.to_entity()) == moved
    assert "outbox" not in moved.public() and "event_seq" not in moved.public()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://acct.blob.core.windows.net/c/r.json?sv=2024&sp=r&sig=abc",
            "https://acct.blob.core.windows.net/c/r.json",
        ),
        (
            "https://ml.azure.com/runs/j?wsid=/subscriptions/s/w&tid=t&code=k",
            "https://ml.azure.com/runs/j?wsid=/subscriptions/s/w&tid=t",
        ),
        ("https://user:password@host.example:8443/p#frag", "https://host.example:8443/p"),
        ("", ""),
    ],
)
def test_urls_lose_their_secrets(url: str, expected: str) -> None:
    """User info, fragments and every query parameter but studio's wsid/tid are dropped."""
    assert scrub_url(url) == expected


def test_reasons_lose_their_secrets() -> None:
    """Free text keeps its meaning but not its keys, tokens or SAS links, and stays short."""
    text = scrub_text(
        f"upload to https://a.blob/x?{SECRETS['sas']} failed; {SECRETS['account key']}; {SECRETS['bearer']}"
    )
    assert "https://a.blob/x failed" in text and "AccountKey=***" in text and "Bearer ***" in text
    assert not any(secret.split("=", 1)[-1].split(" ", 1)[-1] in text for secret in SECRETS.values())
    assert len(scrub_text("x" * 5000)) == 1000


# ---- the sequence of a run ------------------------------------------------------------------------


def test_a_full_run_announces_every_state_in_order() -> None:
    """received ... live: one event per state of the timeline, ids run-1..n, each with its previous state,
    the live one with model, endpoint, smoke and metric summaries, and the report links."""
    world = _world()
    outcome = _upload(world)
    world["backend"].set_job(f"tunegrid-{outcome.run_id}", JobState.COMPLETED)
    live = _drive(world, outcome.run_id)
    assert live.state == RunState.LIVE, live.error
    published = world["events"].published
    assert [e["data"]["state"] for e in published] == _timeline(live)
    assert _timeline(live)[:4] == ["received", "validating", "submitting", "submitted"]
    assert [e["id"] for e in published] == [f"{live.run_id}-{n}" for n in range(1, len(published) + 1)]
    assert [e["data"]["previousState"] for e in published] == [None, *_timeline(live)[:-1]]
    assert all(
        e["subject"] == f"runs/{live.run_id}" and e["type"] == EVENT_TYPES[RunState(e["data"]["state"])]
        for e in published
    )
    assert world["store"].get(live.run_id).outbox == (), "published events leave the outbox"
    last = published[-1]["data"]
    assert (last["modelName"], last["modelVersion"]) == (live.model_name, live.model_version)
    assert (last["endpoint"], last["deployment"]) == (live.endpoint, live.deployment)
    assert last["smoke"] == {"passed": True, "p50Ms": live.smoke["p50_ms"], "rows": 2}
    assert last["metrics"] == {"eval_loss": 1.7, "loss": 1.5}
    assert last["validationReportUrl"] == live.report_url and last["jobUrl"] == live.job_url
    stored = world["store"].get(live.run_id)
    assert stored.run_report_url and last["runReportUrl"] == stored.run_report_url, "the report written after it"
    assert world["blobs"].read_bytes(RUN_REPORTS_CONTAINER, f"{live.run_id}/report.json")
    assert last["reason"] is None and published[0]["data"]["dataset"] == f"{TRAINING_CONTAINER}/events.jsonl"


@pytest.mark.parametrize(
    ("state", "expected"), [(JobState.FAILED, RunState.FAILED), (JobState.CANCELED, RunState.CANCELED)]
)
def test_a_failed_run_announces_the_failure_with_its_reason(state: JobState, expected: RunState) -> None:
    """The job fails: the last event is Tunegrid.Run.Failed (or Canceled), with the reason and the report link."""
    world = _world()
    outcome = _upload(world)
    world["backend"].set_job(f"tunegrid-{outcome.run_id}", state, error="finetune step: CUDA out of memory")
    final = _drive(world, outcome.run_id)
    assert final.state == expected
    published = world["events"].published
    assert [e["data"]["state"] for e in published] == _timeline(final)
    assert published[-1]["type"] == EVENT_TYPES[expected]
    assert published[-1]["data"]["reason"] == "finetune step: CUDA out of memory"
    report_url = world["store"].get(final.run_id).run_report_url
    assert report_url and published[-1]["data"]["runReportUrl"] == report_url
    assert published[-1]["data"]["metrics"] == {"eval_loss": 1.7, "loss": 1.5}


def test_an_invalid_dataset_announces_received_validating_invalid() -> None:
    """A dataset that fails validation: three events, the last with the error summary and the report link."""
    world = _world()
    outcome = _upload(world, "broken.jsonl", data=b'{"messages": [}\n' * 12)
    assert outcome.action == "invalid"
    published = world["events"].published
    assert [e["type"] for e in published] == [
        "Tunegrid.Run.Received",
        "Tunegrid.Run.Validating",
        "Tunegrid.Run.Invalid",
    ]
    invalid = published[-1]["data"]
    assert invalid["reason"].startswith("invalid dataset:") and invalid["validationReportUrl"] == outcome.report_url
    assert invalid["runReportUrl"] is None


def test_a_rolled_back_run_and_a_retired_one_are_announced() -> None:
    """Blue-green: the second run going live retires the first (Retired, with why); a mute model rolls back."""
    world = _world()
    first = _upload(world, "family.jsonl")
    world["backend"].set_job(f"tunegrid-{first.run_id}", JobState.COMPLETED)
    _drive(world, first.run_id)
    second = _upload(world, "family.jsonl", rows=41)
    world["backend"].set_job(f"tunegrid-{second.run_id}", JobState.COMPLETED)
    _drive(world, second.run_id)
    retired = [e for e in world["events"].published if e["type"] == "Tunegrid.Run.Retired"]
    assert [e["data"]["runId"] for e in retired] == [first.run_id]
    assert retired[0]["data"]["reason"] == f"replaced by run {second.run_id}"
    third = _upload(world, "family.jsonl", rows=42)
    world["backend"].set_job(f"tunegrid-{third.run_id}", JobState.COMPLETED)
    world["backend"].mute_deployments.add(f"d-{third.run_id}")
    assert _drive(world, third.run_id).state == RunState.ROLLED_BACK
    rolled = world["events"].published[-1]
    assert rolled["type"] == "Tunegrid.Run.RolledBack" and rolled["data"]["smoke"]["passed"] is False
    assert "smoke test failed" in rolled["data"]["reason"]


def _to(world: dict[str, Any], run_id: str, state: RunState) -> RunRecord:
    rollout = _rollout(world)
    for _ in range(20):
        record = advance_run(run_id, rollout, max_steps=1)
        if record.state == state:
            return record
    raise AssertionError(f"run {run_id} never reached {state.value}")


def _announced(world: dict[str, Any], record: RunRecord) -> list[dict[str, Any]]:
    """The run's published events, checked against its timeline: one per state, ids 1..n, in order."""
    mine = [e for e in world["events"].published if e["data"]["runId"] == record.run_id]
    assert [e["data"]["state"] for e in mine] == _timeline(record)
    assert [e["id"] for e in mine] == [f"{record.run_id}-{n}" for n in range(1, len(mine) + 1)]
    assert world["store"].get(record.run_id).outbox == ()
    return mine


def test_superseded_duplicate_and_canceled_runs_are_announced() -> None:
    """The ends of issue 14 go through the outbox like every other move: a version superseded by a newer one
    (and why), the same content again as a duplicate (naming the run reused), a cancel during the evaluation
    gate whose undo had to be finished by a tick (undo-pending: no second event)."""
    from shared.usecases.rollout.ending import UNDO_PENDING
    from shared.usecases.runs import cancel_run

    world = _world()
    older = _upload(world, "family.jsonl", rows=40)
    newer = _upload(world, "family.jsonl", rows=41)
    again = _upload(world, "family.jsonl", rows=41)
    assert (older.action, newer.action, again.action) == ("submitted", "submitted", "duplicate")
    superseded = _announced(world, world["store"].get(older.run_id))
    assert superseded[-1]["type"] == "Tunegrid.Run.Superseded"
    assert superseded[-1]["data"]["previousState"] == "submitted"
    assert superseded[-1]["data"]["reason"].startswith(f"superseded by run {newer.run_id}")
    duplicate = _announced(world, world["store"].get(again.run_id))
    assert [e["type"] for e in duplicate][-1] == "Tunegrid.Run.Duplicate"
    assert newer.run_id in duplicate[-1]["data"]["reason"]

    world["backend"].set_job(f"tunegrid-{newer.run_id}", JobState.COMPLETED)
    evaluating = _to(world, newer.run_id, RunState.EVALUATING)
    failures = [TransientError("injected: delete timed out")]

    def flaky_delete(endpoint: str, name: str) -> None:
        if failures:
            raise failures.pop()

    world["backend"].hooks["begin_delete_deployment"] = flaky_delete
    cancel_run(world["ledger"], world["backend"], newer.run_id, blobs=world["blobs"], settings=world["settings"])
    assert world["store"].get(newer.run_id).operation == UNDO_PENDING
    tick(_rollout(world))
    canceled = world["store"].get(newer.run_id)
    assert canceled.state == RunState.CANCELED and canceled.operation == ""
    assert ("begin_delete_deployment", (evaluating.endpoint, evaluating.deployment)) in world["backend"].log
    announced = _announced(world, canceled)
    assert announced[-1]["type"] == "Tunegrid.Run.Canceled"
    assert announced[-1]["data"]["previousState"] == "evaluating" and announced[-1]["data"]["reason"]


# ---- the fence: publishing never breaks a holder's lease or claim ---------------------------------------


def _quiet(world: dict[str, Any]) -> None:
    """In-line publishing fails once and then waits out its quiet period: events stay in the outboxes."""
    world["events"].failures.append(TransientError("topic unreachable"))


@pytest.mark.parametrize("guarded", [True, False])
def test_left_over_events_of_a_leased_run_wait_for_its_holder(guarded: bool) -> None:
    """A tick publishes left-over events while another worker's gate step holds the run lease. Guarded (as the
    tick does it), the held record is skipped and the step finishes; its events go out with its next move.
    Unguarded, taking the events out of the outbox would be a write under the holder's feet: its next
    conditional write fails and the step stops (what the guard prevents)."""
    from shared.usecases.rollout.leases import is_held

    world = _world()
    outcome = _upload(world, "held.jsonl")
    world["backend"].set_job(f"tunegrid-{outcome.run_id}", JobState.COMPLETED)
    _quiet(world)
    record = _to(world, outcome.run_id, RunState.EVALUATING)
    assert world["store"].get(record.run_id).outbox, "events waiting"
    rollout = _rollout(world)
    skipped: list[int] = []

    def answer(deployment: str, conversation: list[Any]) -> str:
        if not skipped:  # the other worker's tick, while this step holds the lease
            held = (lambda r: is_held(r, rollout)) if guarded else None
            late = utcnow() + LEFT_OVER_AFTER + timedelta(seconds=1)
            skipped.append(publish_left_over(world["store"], world["events"], now=late, held=held).published)
        return "an answer"

    rollout.upstream.answerers[record.deployment] = answer  # type: ignore[attr-defined]
    moved = advance_run(record.run_id, rollout, max_steps=1)
    if guarded:
        assert skipped == [0] and moved.state == RunState.SHIFTING_TRAFFIC
        assert world["store"].get(record.run_id).outbox, "still waiting: the holder's move did not publish yet"
    else:
        assert skipped[0] > 0 and moved.state == RunState.EVALUATING, "the holder lost its fence"


@pytest.mark.parametrize("guarded", [True, False])
def test_left_over_events_of_a_run_in_ingest_wait_for_its_claim(guarded: bool) -> None:
    """The same for an ingest delivery's claim: a tick during validation leaves the claimed record alone and the
    delivery submits; unguarded, the delivery's next write would fail and it would have to start over."""
    from shared.usecases.rollout.leases import is_held

    class PublishingMidRead(InMemoryBlobs):
        """A dataset read during which another worker's tick publishes left-over events."""

        def __init__(self) -> None:
            super().__init__()
            self.published: list[int] = []

        def chunks(self, container: str, name: str, **kw: Any) -> Iterator[bytes]:
            if name.endswith("claimed.jsonl") and not self.published:
                held = (lambda r: is_held(r, _rollout(world))) if guarded else None
                late = utcnow() + LEFT_OVER_AFTER + timedelta(seconds=1)
                self.published.append(publish_left_over(world["store"], world["events"], now=late, held=held).published)
            yield from super().chunks(container, name, **kw)

    blobs = PublishingMidRead()
    world = _world(blobs=blobs)
    _quiet(world)
    if guarded:
        outcome = _upload(world, "claimed.jsonl")
        assert blobs.published == [0] and outcome.action == "submitted"
    else:
        with pytest.raises(TransientError, match="retrying with the current files"):
            _upload(world, "claimed.jsonl")
        assert blobs.published[0] > 0


def test_a_holder_goes_on_with_the_record_the_notifying_ledger_returns() -> None:
    """After a move under a claim, NotifyingLedger has published the event and written the outbox: the record it
    returns carries that write's ETag, so the holder's next conditional write succeeds."""
    world = _world()
    created, _ = world["ledger"].create(
        new_record(run_id="rfence", container="training-data", blob="f.jsonl", blob_version="v", backend="x")
    )
    moved = world["ledger"].transition(created, RunState.VALIDATING)
    assert moved.outbox == () and moved.etag == world["store"].get("rfence").etag
    assert world["ledger"].update(moved, claimed_at="x").claimed_at == "x"
    assert [e["id"] for e in world["events"].published] == ["rfence-1", "rfence-2"]


# ---- at least once, never blocking ----------------------------------------------------------------


def test_a_crash_between_transition_and_publish_is_published_by_the_next_tick() -> None:
    """The process dies right after a state change was written: the next tick publishes its event, with
    the id it was given in the write, and nothing twice."""
    world = _world()
    outcome = _upload(world)
    record = world["store"].get(outcome.run_id)
    assert record.outbox == () and len(world["events"].published) == 4
    # the crash: the transition is written (by the bare ledger), the publish never happens
    world["backend"].set_job(f"tunegrid-{outcome.run_id}", JobState.RUNNING)
    crashed = world["store"].transition(outcome.run_id, RunState.RUNNING, expect=[RunState.SUBMITTED])
    [pending] = crashed.outbox
    assert pending["id"] == f"{outcome.run_id}-5" and pending["type"] == "Tunegrid.Run.Running"
    soon = _rollout(world, now=lambda: utcnow() + timedelta(seconds=1))
    publish_left_over(soon.ledger, soon.events, now=soon.now())
    assert len(world["events"].published) == 4, "too fresh: an in-line publish may still be under way"
    later = utcnow() + LEFT_OVER_AFTER + timedelta(seconds=1)
    tick(_rollout(world, now=lambda: later))
    ids = [e["id"] for e in world["events"].published]
    assert ids[4] == pending["id"] and ids.count(pending["id"]) == 1
    assert world["events"].published[4] == pending
    assert all(e["id"] != pending["id"] for e in world["store"].get(outcome.run_id).outbox)


def test_a_publish_failure_never_fails_the_run_and_nothing_is_lost() -> None:
    """The topic is down for the whole run: the run still goes live, every event waits in the outbox, in-line
    publishing pauses after the first failure, and the first tick after the outage publishes them all in order."""
    events = RecordingRunEvents(failures=[TransientError("topic unreachable")])
    world = _world(events=events)
    outcome = _upload(world)
    world["backend"].set_job(f"tunegrid-{outcome.run_id}", JobState.COMPLETED)
    live = _drive(world, outcome.run_id)
    assert live.state == RunState.LIVE
    assert events.calls == 1, "after a failure, in-line publishing waits out its quiet period"
    stored = world["store"].get(live.run_id)
    assert [e["data"]["state"] for e in stored.outbox] == _timeline(stored)
    report = publish_left_over(world["ledger"], events, now=utcnow() + LEFT_OVER_AFTER + timedelta(seconds=1))
    assert report.published == len(_timeline(stored)) and not report.failed
    assert events.states(live.run_id) == _timeline(stored)
    assert world["store"].get(live.run_id).outbox == ()


def test_a_tick_stops_at_the_first_failure_and_drops_events_older_than_a_day() -> None:
    """Two runs wait: the topic fails, nothing is acknowledged; then a day later their events are dropped."""
    events = RecordingRunEvents(enabled=True)
    ledger = InMemoryLedger()
    for run_id in ("ra", "rb"):
        ledger.create(
            new_record(run_id=run_id, container="training-data", blob=f"{run_id}.jsonl", blob_version="v", backend="x")
        )
    events.failures = [TransientError("down")]
    failed = publish_left_over(ledger, events, now=utcnow() + timedelta(minutes=5))
    assert failed.failed and events.calls == 1 and all(len(r.outbox) == 1 for r in ledger.list())
    dropped = publish_left_over(ledger, events, now=utcnow() + timedelta(hours=25))
    assert (dropped.published, dropped.expired) == (0, 2) and events.published == []
    assert all(r.outbox == () for r in ledger.list())


def test_events_the_topic_refuses_for_good_are_dropped_not_retried_forever() -> None:
    """A 400 or 413 from the topic will never turn into a 200: those events are logged and dropped."""
    events = RecordingRunEvents(failures=[InvalidInput("HTTP 400")])
    world = _world(events=events)
    outcome = _upload(world)
    assert events.calls == 4, "the run goes on, and so does publishing"
    assert [e["id"] for e in events.published] == [f"{outcome.run_id}-{n}" for n in (2, 3, 4)]
    assert world["store"].get(outcome.run_id).outbox == ()


def test_publishing_off_keeps_one_event_per_change_and_publishes_nothing() -> None:
    """Without a topic the events stay in the record (bounded by the state machine) and the tick does nothing."""
    from shared.usecases.run_events import NO_RUN_EVENTS

    world = _world()
    world["ledger"] = InMemoryLedger()
    world["events"] = NO_RUN_EVENTS
    outcome = _upload(world)
    assert len(world["ledger"].get(outcome.run_id).outbox) == 4
    assert publish_left_over(world["ledger"], NO_RUN_EVENTS, now=utcnow() + timedelta(hours=1)).published == 0


# ---- the wiring -----------------------------------------------------------------------------------


def test_the_app_context_wires_publishing_only_when_a_topic_is_set(storage_conn: str) -> None:
    """RUN_EVENTS_TOPIC_ENDPOINT set: the ledger announces and the roll-out drains; empty: a plain ledger."""
    from shared.adapters.run_events import EventGridRunEvents
    from shared.adapters.tables import TableRunLedger
    from shared.bootstrap import AppContext, rollout_from_context

    off = AppContext(Settings.from_env({"DataStorage": storage_conn}))
    assert isinstance(off.ledger, TableRunLedger) and not off.run_events.enabled
    on = AppContext(
        Settings.from_env(
            {
                "DataStorage": storage_conn,
                "RUN_EVENTS_TOPIC_ENDPOINT": "http://127.0.0.1:9/runtime/topics/run-events",
                "LOCAL_RUN_EVENTS_KEY": "k",
            }
        ),
        overrides={"backend": FakeBackend(), "upstream": None},
    )
    try:
        assert isinstance(on.run_events, EventGridRunEvents) and on.run_events.source == "/tunegrid/tunegrid"
        assert isinstance(on.ledger, NotifyingLedger) and isinstance(on.ledger.inner, TableRunLedger)
        assert rollout_from_context(on).events is on.run_events
    finally:
        on.close()


def test_a_plain_http_topic_needs_the_local_key() -> None:
    """An identity token is never sent over http: the dev host's topic needs LOCAL_RUN_EVENTS_KEY."""
    from shared.adapters.run_events import EventGridRunEvents

    settings = Settings.from_env({"RUN_EVENTS_TOPIC_ENDPOINT": "http://127.0.0.1:7071/runtime/topics/run-events"})
    with pytest.raises(ConfigError, match="LOCAL_RUN_EVENTS_KEY"):
        EventGridRunEvents.from_settings(settings)
    assert "hunter2-secret" not in repr(Settings.from_env({"LOCAL_RUN_EVENTS_KEY": "hunter2-secret"}))


# ---- through the real publisher, the dev host's topic and a webhook subscriber --------------------


@pytest.fixture
def topic(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """(dev host with its run-events topic, the webhook subscriber it delivers to)."""
    import azure.functions as func

    from tunegrid.devhost import DevHost
    from tunegrid.notifications import WebhookListener

    app = func.FunctionApp()

    @app.route(route="ping")
    def ping(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("pong")

    with WebhookListener() as listener:
        host = DevHost(
            app,
            settings={"LOCAL_RUN_EVENTS_KEY": "topic-key-for-tests", "LOCAL_RUN_EVENTS_SUBSCRIBERS": listener.url},
            port=0,
            state_dir=tmp_path / "devhost",
            root=tmp_path,
        )
        host.start()
        try:
            yield host, listener
        finally:
            host.stop()


def test_the_envelope_is_a_cloud_event_and_carries_no_secret(topic: tuple[Any, Any]) -> None:
    """The adapter publishes CloudEvents v1.0 (read back with the SDK's CloudEvent model): source, type,
    subject, id and time as recorded; no key, token, SAS or connection string anywhere in what was sent."""

    from shared.adapters.run_events import EventGridRunEvents

    host, listener = topic
    settings = Settings.from_env(
        {
            "TUNEGRID_INSTANCE": "tevents",
            "RUN_EVENTS_TOPIC_ENDPOINT": host.run_events_topic_url,
            "LOCAL_RUN_EVENTS_KEY": "topic-key-for-tests",
            "PROXY_API_KEYS": "proxy-key-SECRET",
        }
    )
    publisher = EventGridRunEvents.from_settings(settings)
    world = _world(blobs=SasBlobs(), backend=SecretLinksBackend())
    world["ledger"] = NotifyingLedger(world["store"], publisher)
    world["events"] = publisher
    try:
        outcome = _upload(world)
        world["backend"].set_job(
            f"tunegrid-{outcome.run_id}",
            JobState.FAILED,
            error=f"step failed: {SECRETS['account key']} {SECRETS['bearer']}",
        )
        final = _drive(world, outcome.run_id)
    finally:
        publisher.close()
    assert final.state == RunState.FAILED
    stored = world["store"].get(final.run_id)
    assert SECRETS["sas"] in stored.report_url and SECRETS["function key"] in stored.job_url
    assert SECRETS["account key"] in stored.error, "the record holds secrets: the events must not"
    assert listener.wait_for(lambda seen: len(seen) == len(final.timeline), timeout_s=20)
    assert [n.state for n in listener.events] == _timeline(final)
    raw = json.dumps([n.data for n in listener.events])
    for what, secret in SECRETS.items():
        assert secret.split("=", 1)[-1].split(" ", 1)[-1] not in raw, what
    assert "topic-key-for-tests" not in raw and "proxy-key-SECRET" not in raw
    assert "wsid=/subscriptions/s/workspaces/w" in listener.events[-1].data["jobUrl"]
    for notification in listener.events:
        stored = world["store"].get(final.run_id)
        assert notification.source == "/tunegrid/tevents" and notification.subject == f"runs/{stored.run_id}"
        assert notification.type == EVENT_TYPES[RunState(notification.state)]
        assert re.fullmatch(rf"{stored.run_id}-\d+", notification.id) and notification.time is not None
        assert (notification.specversion, notification.datacontenttype) == ("1.0", "application/json")


def test_a_republished_event_is_taken_once_by_the_subscriber(topic: tuple[Any, Any]) -> None:
    """A crash after the publish but before the outbox write publishes the same event again: the subscriber
    sees the same id twice and keeps it once."""
    from shared.adapters.run_events import EventGridRunEvents

    host, listener = topic
    publisher = EventGridRunEvents.from_settings(
        Settings.from_env(
            {"RUN_EVENTS_TOPIC_ENDPOINT": host.run_events_topic_url, "LOCAL_RUN_EVENTS_KEY": "topic-key-for-tests"}
        )
    )
    record = new_record(run_id="rdup", container="training-data", blob="d.jsonl", blob_version="v", backend="x")
    try:
        publisher.publish(record.outbox)
        publisher.publish(record.outbox)
    finally:
        publisher.close()
    assert listener.wait_for(lambda seen: listener.duplicates == 1, timeout_s=10)
    assert [n.id for n in listener.events] == ["rdup-1"]


class _Topic:
    """A stand-in topic that records each publish request and answers with the next status of `statuses`."""

    def __init__(self, statuses: list[int]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.statuses = statuses
        topic = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                topic.requests.append((self.path, dict(self.headers), body))
                status = topic.statuses.pop(0) if topic.statuses else 200
                payload = b'{"error": {"code": "x", "message": "refused"}}' if status >= 400 else b""
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/events"


@pytest.fixture
def fake_topic() -> Iterator[_Topic]:
    import threading

    topic = _Topic([])
    thread = threading.Thread(target=topic.server.serve_forever, daemon=True)
    thread.start()
    yield topic
    topic.server.shutdown()
    thread.join(10)
    topic.server.server_close()


def test_the_adapter_sends_a_cloud_events_batch_with_the_key(fake_topic: _Topic) -> None:
    """One POST per publish: `application/cloudevents-batch+json`, the key in `aeg-sas-key`, and each element
    read back by the SDK's `CloudEvent.from_json` equals the pending event with the deployment's source."""
    from azure.core.messaging import CloudEvent

    from shared.adapters.run_events import EventGridRunEvents

    settings = Settings.from_env(
        {"TUNEGRID_INSTANCE": "t one", "RUN_EVENTS_TOPIC_ENDPOINT": fake_topic.url, "LOCAL_RUN_EVENTS_KEY": "k-123"}
    )
    record = new_record(run_id="renv", container="training-data", blob="e.jsonl", blob_version="v", backend="x")
    record = apply_transition(record, RunState.VALIDATING, None, {})
    publisher = EventGridRunEvents.from_settings(settings)
    try:
        publisher.publish(record.outbox)
    finally:
        publisher.close()
    [(path, headers, body)] = fake_topic.requests
    assert path == "/api/events?api-version=2018-01-01"
    assert headers["Content-Type"] == "application/cloudevents-batch+json; charset=utf-8"
    assert headers["aeg-sas-key"] == "k-123" and "Authorization" not in headers
    batch = json.loads(body)
    events = [CloudEvent.from_json(json.dumps(item)) for item in batch]
    assert [e.id for e in events] == ["renv-1", "renv-2"]
    for event, pending in zip(events, record.outbox, strict=True):
        assert (event.type, event.subject, event.data) == (pending["type"], pending["subject"], pending["data"])
        assert event.source == "/tunegrid/t%20one" and event.specversion == "1.0"
        assert event.datacontenttype == "application/json" and event.time.isoformat().startswith(pending["time"][:19])


@pytest.mark.parametrize(
    ("status", "error", "message"),
    [
        (400, InvalidInput, "refused the events"),
        (413, InvalidInput, "refused the events"),
        (401, "PermissionDenied", "EventGrid Data Sender"),
        (403, "PermissionDenied", "EventGrid Data Sender"),
        (404, ConfigError, "no Event Grid topic"),
        (503, TransientError, "HTTP 503"),
    ],
)
def test_the_adapter_translates_what_the_topic_answers(
    fake_topic: _Topic, status: int, error: Any, message: str
) -> None:
    """The topic's refusals become domain errors the use case acts on (drop, keep and wait, retry later)."""
    from shared.adapters.run_events import EventGridRunEvents
    from shared.errors import PermissionDenied

    expected = PermissionDenied if error == "PermissionDenied" else error
    fake_topic.statuses = [status] * 3
    settings = Settings.from_env({"RUN_EVENTS_TOPIC_ENDPOINT": fake_topic.url, "LOCAL_RUN_EVENTS_KEY": "k"})
    record = new_record(run_id="rerr", container="training-data", blob="e.jsonl", blob_version="v", backend="x")
    publisher = EventGridRunEvents.from_settings(settings)
    try:
        with pytest.raises(expected, match=message):
            publisher.publish(record.outbox)
    finally:
        publisher.close()


def test_the_adapter_gives_up_quickly_on_an_unreachable_topic() -> None:
    """A refused connection is a TransientError after the one retry, not minutes of azure-core's default retries."""
    import time

    from shared.adapters.run_events import EventGridRunEvents

    settings = Settings.from_env(
        {"RUN_EVENTS_TOPIC_ENDPOINT": "http://127.0.0.1:9/api/events", "LOCAL_RUN_EVENTS_KEY": "k"}
    )
    record = new_record(run_id="rdown", container="training-data", blob="e.jsonl", blob_version="v", backend="x")
    publisher = EventGridRunEvents.from_settings(settings)
    started = time.monotonic()
    try:
        with pytest.raises(TransientError, match="could not be reached"):
            publisher.publish(record.outbox)
    finally:
        publisher.close()
    assert time.monotonic() - started < 10
