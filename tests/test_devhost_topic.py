"""The dev host as the run-events topic: the publisher's key and schema are checked, and each event reaches
every webhook subscriber after the CloudEvents validation handshake, retried with backoff, dead-lettered to
a folder when it cannot be delivered. Real servers on 127.0.0.1 throughout: the dev host, the SDK's
publisher client and `tunegrid.notifications.WebhookListener` subscribers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import httpx
import pytest

from shared.domain.runs import RunState, apply_transition, new_record
from shared.settings import Settings
from tunegrid.devhost import DevHost, HostTimings
from tunegrid.notifications import Notification, WebhookListener

KEY = "run-events-topic-key-for-tests"


class ScriptedListener(WebhookListener):
    """A subscriber that answers deliveries with the statuses of `script` first (then 200), and may refuse
    the handshake."""

    def __init__(self, script: list[int] | None = None, *, allow: bool = True) -> None:
        super().__init__()
        self.script = list(script or [])
        self.allow = allow
        self.attempts: list[tuple[str, int]] = []

    def allowed_origin(self, origin: str) -> str | None:
        return origin if self.allow else None

    def answer(self, notification: Notification) -> int:
        self.attempts.append((notification.id, notification.delivery_count))
        return self.script.pop(0) if self.script else 200


def _app() -> func.FunctionApp:
    app = func.FunctionApp()

    @app.route(route="ping")
    def ping(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("pong")

    return app


@pytest.fixture
def start_host(tmp_path: Path) -> Iterator[Any]:
    """`start_host(subscribers, key=KEY)`: a dev host whose topic delivers to those webhooks (3 tries, fast
    backoff), dead-lettering into tmp_path/deadletter; stopped at the end."""
    hosts: list[DevHost] = []

    def start(
        subscribers: list[WebhookListener], *, key: str = KEY, drain_s: float = 5.0, first_delay_s: float = 0.05
    ) -> DevHost:
        host = DevHost(
            _app(),
            settings={
                "LOCAL_RUN_EVENTS_KEY": key,
                "LOCAL_RUN_EVENTS_SUBSCRIBERS": ",".join(s.url for s in subscribers),
                "LOCAL_RUN_EVENTS_DEAD_LETTER_DIR": str(tmp_path / "deadletter"),
            },
            port=0,
            state_dir=tmp_path / "devhost",
            root=tmp_path,
            timings=HostTimings(
                run_event_tries=3, run_event_retry_first_delay_s=first_delay_s, run_event_drain_s=drain_s
            ),
        )
        hosts.append(host.start())
        return host

    yield start
    for host in hosts:
        host.stop()


def _events(run_id: str = "rtopic", moves: int = 2) -> tuple[dict[str, Any], ...]:
    record = new_record(run_id=run_id, container="training-data", blob="t.jsonl", blob_version="v", backend="x")
    for to in (RunState.VALIDATING, RunState.SUBMITTING)[:moves]:
        record = apply_transition(record, to, None, {})
    return record.outbox


def _publish(host: DevHost, events: tuple[dict[str, Any], ...]) -> None:
    from shared.adapters.run_events import EventGridRunEvents

    settings = Settings.from_env({"RUN_EVENTS_TOPIC_ENDPOINT": host.run_events_topic_url, "LOCAL_RUN_EVENTS_KEY": KEY})
    publisher = EventGridRunEvents.from_settings(settings)
    try:
        publisher.publish(events)
    finally:
        publisher.close()


def _dead_letters(tmp_path: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((tmp_path / "deadletter").rglob("*.json"))}


def test_every_subscriber_gets_every_event_in_order_after_one_handshake(start_host: Any) -> None:
    """Two webhooks: each validates once (OPTIONS), then gets the three events one POST each, in order."""
    with ScriptedListener() as first, ScriptedListener() as second:
        host = start_host([first, second])
        _publish(host, _events())
        for listener in (first, second):
            assert listener.wait_for(lambda seen: len(seen) == 3, timeout_s=10)
            assert [n.id for n in listener.events] == ["rtopic-1", "rtopic-2", "rtopic-3"]
            assert [n.type for n in listener.events] == [
                "Tunegrid.Run.Received",
                "Tunegrid.Run.Validating",
                "Tunegrid.Run.Submitting",
            ]
            assert listener.handshakes == 1 and listener.duplicates == 0
            assert all(count == 0 for _, count in listener.attempts)
        assert "Run-events topic: " in host.describe() and "-> 2 webhook subscribers" in host.describe()


def test_a_failing_webhook_is_retried_with_backoff_until_it_takes_the_event(start_host: Any, tmp_path: Path) -> None:
    """503, then 500, then 200: delivered on the third try (aeg-delivery-count 2), later events after it."""
    with ScriptedListener([503, 500]) as listener:
        host = start_host([listener])
        _publish(host, _events(moves=1))
        assert listener.wait_for(lambda seen: len(seen) == 2, timeout_s=10)
        assert listener.attempts == [("rtopic-1", 0), ("rtopic-1", 1), ("rtopic-1", 2), ("rtopic-2", 0)]
        assert [n.id for n in listener.events] == ["rtopic-1", "rtopic-2"]
    assert _dead_letters(tmp_path) == {}


def test_an_undeliverable_event_is_dead_lettered_and_the_next_one_still_goes(start_host: Any, tmp_path: Path) -> None:
    """Three 500s: the event goes to the dead-letter folder as Event Grid writes it; the next is delivered."""
    with ScriptedListener([500, 500, 500]) as listener:
        host = start_host([listener])
        _publish(host, _events(moves=1))
        assert listener.wait_for(lambda seen: [n.id for n in seen] == ["rtopic-2"], timeout_s=10)
    [(name, parked)] = _dead_letters(tmp_path).items()
    assert name == "rtopic-1" and parked["id"] == "rtopic-1" and parked["type"] == "Tunegrid.Run.Received"
    assert parked["deadLetterReason"] == "MaxDeliveryAttemptsExceeded" and parked["deliveryAttempts"] == 3
    assert (parked["lastDeliveryOutcome"], parked["lastHttpStatusCode"]) == ("HTTP 500", 500)
    assert (
        parked["subscription"] == "local-1" and parked["specversion"] == "1.0" and parked["data"]["runId"] == "rtopic"
    )


@pytest.mark.parametrize(
    ("status", "reason"),
    [(400, "UndeliverableDueToHttpBadRequest"), (413, "UndeliverableDueToHttpRequestEntityTooLarge")],
)
def test_a_webhook_that_refuses_an_event_for_good_is_not_retried(
    start_host: Any, tmp_path: Path, status: int, reason: str
) -> None:
    """400 and 413 are dead-lettered at once, as Event Grid does."""
    with ScriptedListener([status]) as listener:
        host = start_host([listener])
        _publish(host, _events(moves=1))
        assert listener.wait_for(lambda seen: len(seen) == 1, timeout_s=10)
        assert listener.attempts[0] == ("rtopic-1", 0) and listener.attempts[1][0] == "rtopic-2"
    parked = _dead_letters(tmp_path)["rtopic-1"]
    assert (parked["deadLetterReason"], parked["deliveryAttempts"]) == (reason, 1)


def test_a_webhook_that_refuses_the_handshake_gets_no_event(start_host: Any, tmp_path: Path) -> None:
    """No `WebHook-Allowed-Origin`: nothing is POSTed; each try repeats the handshake, then the event is parked."""
    with ScriptedListener(allow=False) as listener:
        host = start_host([listener])
        _publish(host, _events(moves=0))
        parked = _wait_for_dead_letter(tmp_path, "rtopic-1")
        assert listener.attempts == [] and listener.handshakes == 3
    assert parked["deadLetterReason"] == "MaxDeliveryAttemptsExceeded"
    assert parked["lastDeliveryOutcome"].startswith("validation handshake: HTTP 403")


def _wait_for_dead_letter(tmp_path: Path, event_id: str) -> dict[str, Any]:
    from tests.support import wait_for

    return wait_for(lambda: _dead_letters(tmp_path).get(event_id), timeout_s=10, what=f"dead letter {event_id}")


def test_events_still_queued_when_the_host_stops_are_dead_lettered(start_host: Any, tmp_path: Path) -> None:
    """The subscriber is failing and the topic waits to retry: stopping the host parks the event being retried
    and those queued behind it (`HostStopped`) instead of losing them."""
    with ScriptedListener([503] * 100) as listener:
        host = start_host([listener], drain_s=0.2, first_delay_s=60)
        _publish(host, _events())
        listener.wait_for(lambda seen: len(listener.attempts) >= 1, timeout_s=10)
        host.stop()
    parked = _dead_letters(tmp_path)
    assert set(parked) == {"rtopic-1", "rtopic-2", "rtopic-3"}
    assert {p["deadLetterReason"] for p in parked.values()} == {"HostStopped"}
    assert listener.attempts == [("rtopic-1", 0)]


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({}, "batch", 401),
        ({"aeg-sas-key": "wrong"}, "batch", 401),
        ({"aeg-sas-key": KEY, "content-type": "application/cloudevents-batch+json"}, b"[{", 400),
        ({"aeg-sas-key": KEY, "content-type": "application/cloudevents-batch+json"}, b"[]", 400),
        ({"aeg-sas-key": KEY, "content-type": "application/cloudevents-batch+json"}, "eventgrid-schema", 400),
        ({"aeg-sas-key": KEY, "content-type": "application/cloudevents-batch+json"}, "no-source", 400),
        ({"aeg-sas-key": KEY, "content-type": "text/plain"}, "batch", 400),
        ({"aeg-sas-key": KEY, "content-type": "application/cloudevents-batch+json"}, "batch", 200),
    ],
)
def test_the_topic_checks_the_key_and_the_cloud_events_schema(
    start_host: Any, headers: dict[str, str], body: Any, status: int
) -> None:
    """Only the holder of LOCAL_RUN_EVENTS_KEY publishes, and only CloudEvents v1.0 (checked with the SDK model)."""
    with ScriptedListener() as listener:
        host = start_host([listener])
        event = {**_events(moves=0)[0], "source": "/tunegrid/t", "specversion": "1.0"}
        bodies = {
            "batch": json.dumps([event]).encode(),
            "eventgrid-schema": json.dumps(
                [{"id": "1", "eventType": "x", "subject": "s", "data": {}, "dataVersion": "1"}]
            ).encode(),
            "no-source": json.dumps([{k: v for k, v in event.items() if k != "source"}]).encode(),
        }
        payload = bodies.get(body, body) if isinstance(body, str) else body
        response = httpx.post(host.run_events_topic_url, content=payload, headers=headers, timeout=10)
        assert response.status_code == status, response.text
        assert httpx.get(host.run_events_topic_url, headers={"aeg-sas-key": KEY}, timeout=10).status_code == 405


def test_the_topic_is_off_without_a_key(start_host: Any) -> None:
    """No LOCAL_RUN_EVENTS_KEY: the topic answers 404 and says which setting turns it on."""
    with ScriptedListener() as listener:
        host = start_host([listener], key="")
        response = httpx.post(host.run_events_topic_url, content=b"[]", headers={"aeg-sas-key": ""}, timeout=10)
        assert response.status_code == 404 and "LOCAL_RUN_EVENTS_KEY" in response.text
        assert "Run-events topic" not in host.describe()
