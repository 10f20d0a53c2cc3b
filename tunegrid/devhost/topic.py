"""The dev host as the app's Event Grid topic for run events (`RUN_EVENTS_TOPIC_ENDPOINT` locally).

It takes what `EventGridPublisherClient` publishes to `/runtime/topics/run-events` (CloudEvents v1.0, key
in `aeg-sas-key` = `LOCAL_RUN_EVENTS_KEY`; a topic answers 200) and delivers every event to every webhook in
`LOCAL_RUN_EVENTS_SUBSCRIBERS`, the way an Event Grid subscription with the CloudEvents schema does:

- the CloudEvents abuse-protection handshake first (`OPTIONS` with `WebHook-Request-Origin`; the webhook
  must answer 200 with `WebHook-Allowed-Origin` naming that origin or `*`);
- one event per `POST`, structured mode (`application/cloudevents+json`), `aeg-delivery-count` set;
- 200-204 is delivered; 400, 401, 403 and 413 are dead-lettered at once (Event Grid does not retry them);
  anything else, a timeout or a refused connection is retried with exponential backoff and dead-lettered
  after the last try, as a JSON file with `deadLetterReason`, `deliveryAttempts`, `lastDeliveryOutcome`
  and `lastHttpStatusCode`, as Event Grid writes its dead-letter blobs.

Unlike Event Grid, each subscriber gets its events in publish order (one delivery at a time), which keeps
`make demo` readable; subscribers must not rely on that in Azure (the events carry `data.sequence`).
Events still queued when the host stops are dead-lettered (`HostStopped`), so none vanishes silently.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunegrid.devhost.eventgrid import WebhookReply
from tunegrid.devhost.invoker import RetryPolicy
from tunegrid.devhost.keys import key_matches

log = logging.getLogger("tunegrid.devhost")

TOPIC_PATH = "/runtime/topics/run-events"
ORIGIN = "eventgrid.azure.net"
MAX_PUBLISH_BYTES = 1024 * 1024
"""Event Grid's limit for one publish request (and one event)."""
DELIVERED = range(200, 205)
NOT_RETRIED = {
    400: "UndeliverableDueToHttpBadRequest",
    401: "UndeliverableDueToHttpUnauthorized",
    403: "UndeliverableDueToHttpForbidden",
    413: "UndeliverableDueToHttpRequestEntityTooLarge",
}
"""Webhook answers Event Grid dead-letters without retrying (the reason names follow its `...BadRequest`)."""


def _error(status: int, message: str) -> WebhookReply:
    return WebhookReply(status, json.dumps({"error": {"code": "BadRequest", "message": message}}).encode())


def parse_published(body: bytes, content_type: str) -> list[dict[str, Any]]:
    """The CloudEvents of a publish request (a batch, or one event in structured mode), each checked with the
    SDK's `CloudEvent.from_dict` (id, source, type, specversion 1.0). ValueError says what is wrong."""
    from azure.core.messaging import CloudEvent

    kind = content_type.split(";", 1)[0].strip().lower()
    if kind not in ("application/cloudevents-batch+json", "application/cloudevents+json", "application/json"):
        raise ValueError(f"this topic takes CloudEvents v1.0 (application/cloudevents-batch+json), not {kind!r}")
    try:
        doc = json.loads(body or b"null")
    except ValueError as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    events = [doc] if isinstance(doc, dict) else doc
    if not isinstance(events, list) or not events or not all(isinstance(e, dict) for e in events):
        raise ValueError("body must be a CloudEvent or a non-empty JSON array of CloudEvents")
    for index, event in enumerate(events):
        if event.get("specversion") != "1.0":
            raise ValueError(f"event {index}: specversion must be '1.0' (CloudEvents v1.0 input schema)")
        try:
            CloudEvent.from_dict(event)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"event {index} is not a CloudEvent: {type(exc).__name__}: {exc}") from None
    return events


@dataclass
class Subscription:
    """One webhook subscriber and its own queue (events reach it in publish order)."""

    name: str
    url: str
    queue: asyncio.Queue[tuple[dict[str, Any], str]] = field(default_factory=asyncio.Queue)
    validated: bool = False
    delivered: int = 0
    dead_lettered: int = 0


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:120]


class RunEventsTopic:
    """Stands in for the run-events topic: accepts publishes, delivers to the subscribers, dead-letters."""

    def __init__(
        self,
        *,
        key: str,
        subscribers: Sequence[str],
        dead_letter_dir: Path,
        retry: RetryPolicy,
        delivery_timeout_s: float = 30.0,
        drain_s: float = 5.0,
    ) -> None:
        self._key = key.encode() if key else b""
        self.subscriptions = [Subscription(f"local-{i}", url) for i, url in enumerate(subscribers, start=1)]
        self.dead_letter_dir = dead_letter_dir
        self._retry = retry
        self._timeout = delivery_timeout_s
        self._drain_s = drain_s
        self._client: Any = None
        self._busy = 0

    @property
    def enabled(self) -> bool:
        return bool(self._key)

    # ---------------------------------------------------------------------------------- publishing
    async def handle(self, method: str, headers: Mapping[str, str], body: bytes) -> WebhookReply:
        """The topic's answer to one publish request."""
        if not self.enabled:
            return _error(404, "the dev host's run-events topic is off: set LOCAL_RUN_EVENTS_KEY")
        if method != "POST":
            return _error(405, "publish with POST")
        sas = headers.get("aeg-sas-key")
        if not key_matches(sas.encode("latin-1") if sas else None, (self._key,)):
            return WebhookReply(401, json.dumps({"error": {"code": "Unauthorized"}}).encode())
        if len(body) > MAX_PUBLISH_BYTES:
            return _error(413, f"a publish request is limited to {MAX_PUBLISH_BYTES} bytes")
        try:
            events = parse_published(body, headers.get("content-type", ""))
        except ValueError as exc:
            return _error(400, str(exc))
        published = dt.datetime.now(dt.UTC).isoformat()
        for event in events:
            for subscription in self.subscriptions:
                subscription.queue.put_nowait((event, published))
        log.info(
            "run-events topic: %d events published (%s), %d subscribers",
            len(events),
            ", ".join(str(e.get("type")) for e in events),
            len(self.subscriptions),
        )
        return WebhookReply(200)

    # ----------------------------------------------------------------------------------- delivering
    async def run(self, stopping: asyncio.Event) -> None:
        """Deliver until `stopping` is set (one worker per subscriber), then for at most `drain_s` more."""
        if not self.subscriptions:
            await stopping.wait()
            return
        import httpx

        async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=False) as client:
            self._client = client
            workers = [asyncio.create_task(self._work(s), name=f"run-events-{s.name}") for s in self.subscriptions]
            await stopping.wait()
            await self.wait_idle(self._drain_s)
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        self._client = None
        for subscription in self.subscriptions:
            while not subscription.queue.empty():
                event, published = subscription.queue.get_nowait()
                self._park(subscription, event, published, "HostStopped", 0, "the dev host stopped first", None)

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once every queued event was delivered or dead-lettered (bounded; for shutdown and tests)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if self._busy == 0 and all(s.queue.empty() for s in self.subscriptions):
                return True
            await asyncio.sleep(0.02)
        return False

    async def _work(self, subscription: Subscription) -> None:
        while True:
            event, published = await subscription.queue.get()
            self._busy += 1
            try:
                await self._deliver(subscription, event, published)
            except asyncio.CancelledError:
                self._park(subscription, event, published, "HostStopped", 0, "the dev host stopped first", None)
                raise
            except Exception:  # a bug here must not stop the other deliveries
                log.exception("run-events topic: delivering %s to %s failed", event.get("id"), subscription.name)
            finally:
                self._busy -= 1

    async def _handshake(self, subscription: Subscription) -> str | None:
        """The CloudEvents abuse-protection handshake; None when the webhook agreed, else why not."""
        try:
            response = await self._client.request(
                "OPTIONS", subscription.url, headers={"WebHook-Request-Origin": ORIGIN}
            )
        except Exception as exc:
            return f"validation handshake: {type(exc).__name__}"
        allowed = response.headers.get("WebHook-Allowed-Origin", "")
        if response.status_code != 200 or allowed not in (ORIGIN, "*"):
            return f"validation handshake: HTTP {response.status_code}, WebHook-Allowed-Origin {allowed!r}"
        subscription.validated = True
        log.info("run-events topic: %s validated the subscription (origin %s)", subscription.name, allowed)
        return None

    async def _deliver(self, subscription: Subscription, event: dict[str, Any], published: str) -> None:
        outcome, status = "", None
        for attempt in range(1, self._retry.tries + 1):
            problem = None if subscription.validated else await self._handshake(subscription)
            if problem is None:
                try:
                    response = await self._client.post(
                        subscription.url,
                        content=json.dumps(event).encode(),
                        headers={
                            "content-type": "application/cloudevents+json; charset=utf-8",
                            "aeg-event-type": "Notification",
                            "aeg-subscription-name": subscription.name.upper(),
                            "aeg-delivery-count": str(attempt - 1),
                        },
                    )
                except Exception as exc:  # timeout, refused connection: retried, as Event Grid does
                    outcome, status = f"{type(exc).__name__}", None
                else:
                    status = response.status_code
                    if status in DELIVERED:
                        subscription.delivered += 1
                        return
                    outcome = f"HTTP {status}"
                    if status in NOT_RETRIED:
                        self._park(subscription, event, published, NOT_RETRIED[status], attempt, outcome, status)
                        return
            else:
                outcome, status = problem, None
            if attempt < self._retry.tries:
                await asyncio.sleep(self._retry.delay_after(attempt))
        self._park(subscription, event, published, "MaxDeliveryAttemptsExceeded", self._retry.tries, outcome, status)

    def _park(
        self,
        subscription: Subscription,
        event: Mapping[str, Any],
        published: str,
        reason: str,
        attempts: int,
        outcome: str,
        status: int | None,
    ) -> Path:
        folder = self.dead_letter_dir / subscription.name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_safe(str(event.get('id')))}.json"
        record = {
            **event,
            "deadLetterReason": reason,
            "deliveryAttempts": attempts,
            "lastDeliveryOutcome": outcome,
            "lastHttpStatusCode": status,
            "publishTime": published,
            "lastDeliveryAttemptTime": dt.datetime.now(dt.UTC).isoformat(),
            "subscription": subscription.name,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        tmp.replace(path)
        subscription.dead_lettered += 1
        log.error(
            "run-events topic: event %s for %s dead-lettered (%s after %d attempts: %s) to %s",
            event.get("id"),
            subscription.name,
            reason,
            attempts,
            outcome,
            path,
        )
        return path
