"""Event Grid triggers behind `/runtime/webhooks/eventgrid?functionName=NAME`, as the host's extension
serves them: the subscription-validation handshake, then one invocation per event of a notification.

A failing event is retried in-process with backoff; when the tries are spent it is parked in the
dead-letter folder (the event plus `deadLetterReason`, `deliveryAttempts` and the error, as Event Grid
dead-letters it) and the request answers 500, so the sender's own retry applies.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import azure.functions as func
from azure.functions.meta import InConverter

from tunegrid.devhost.catalog import FunctionSpec
from tunegrid.devhost.invoker import Invoker, RetryPolicy

log = logging.getLogger("tunegrid.devhost")

VALIDATION_EVENT = "Microsoft.EventGrid.SubscriptionValidationEvent"


class EventPayloadError(ValueError):
    """The request body is not an Event Grid (or CloudEvents) array."""


def parse_events(body: bytes) -> list[dict[str, Any]]:
    """The events of a webhook body: a JSON array of event objects (a single object is accepted too)."""
    try:
        doc = json.loads(body or b"null")
    except ValueError as exc:
        raise EventPayloadError(f"body is not JSON: {exc}") from exc
    events = [doc] if isinstance(doc, dict) else doc
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise EventPayloadError("body must be a JSON array of event objects")
    for index, event in enumerate(events):
        kind = event.get("type") if "specversion" in event else event.get("eventType")
        if not event.get("id") or not kind:
            raise EventPayloadError(f"event {index} lacks 'id' or its event type")
    return events


def _time(value: Any) -> dt.datetime | None:
    return InConverter._parse_datetime(value) if isinstance(value, str) and value else None


def trigger_value(event: Mapping[str, Any], spec: FunctionSpec) -> func.EventGridEvent | func.CloudEvent:
    """The object the worker would pass: `func.CloudEvent` when the function asks for one, else
    `func.EventGridEvent` (a CloudEvents payload is mapped onto it: source->topic, type->event_type)."""
    wants_cloud_event = spec.annotation_name().endswith("CloudEvent")
    is_cloud_event = "specversion" in event
    if wants_cloud_event:
        known = {"specversion", "id", "source", "type", "time", "subject", "datacontenttype", "dataschema", "data"}
        return func.CloudEvent(
            id=str(event["id"]),
            source=event.get("source", event.get("topic")),
            type=event.get("type", event.get("eventType")),
            specversion=event.get("specversion", "1.0"),
            time=_time(event.get("time", event.get("eventTime"))),
            subject=event.get("subject"),
            datacontenttype=event.get("datacontenttype"),
            dataschema=event.get("dataschema", event.get("dataVersion")),
            data=event.get("data"),
            **{k: v for k, v in event.items() if k not in known and is_cloud_event},
        )
    if is_cloud_event:
        return func.EventGridEvent(
            id=event["id"],
            data=event.get("data"),  # type: ignore[arg-type]
            topic=event.get("source", ""),
            subject=event.get("subject", ""),
            event_type=event["type"],
            event_time=_time(event.get("time")),
            data_version=event.get("dataschema") or "",
        )
    return func.EventGridEvent(
        id=event["id"],
        data=event.get("data"),  # type: ignore[arg-type]
        topic=event.get("topic", ""),
        subject=event.get("subject", ""),
        event_type=event["eventType"],
        event_time=_time(event.get("eventTime")),
        data_version=event.get("dataVersion", ""),
    )


@dataclass(frozen=True)
class WebhookReply:
    status: int
    body: bytes = b""
    content_type: str = "application/json; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def _error(status: int, message: str) -> WebhookReply:
    return WebhookReply(status, json.dumps({"error": message}).encode())


class EventGridDispatcher:
    """Serves the Event Grid webhook for the app's Event Grid functions."""

    def __init__(
        self, specs: Sequence[FunctionSpec], invoker: Invoker, *, retry: RetryPolicy, dead_letter_dir: Path
    ) -> None:
        self._functions = {s.name.lower(): s for s in specs}
        self._invoker = invoker
        self._retry = retry
        self.dead_letter_dir = dead_letter_dir

    @property
    def function_names(self) -> list[str]:
        return [s.name for s in self._functions.values()]

    async def handle(
        self,
        method: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
        *,
        as_topic: bool = False,
    ) -> WebhookReply:
        """The webhook's answer. `as_topic`: the request is a publish (aeg-sas-key) to the topic the dev
        host stands in for: no aeg-event-type means Notification, and success is 200 as a topic answers."""
        spec = self._functions.get(query.get("functionName", "").lower())
        if spec is None:
            return _error(404, "no Event Grid function with that functionName")
        if method == "OPTIONS":  # CloudEvents abuse-protection handshake
            origin = headers.get("webhook-request-origin", "")
            return WebhookReply(200, headers=(("WebHook-Allowed-Origin", origin), ("WebHook-Allowed-Rate", "*")))
        if method != "POST":
            return _error(405, "the Event Grid webhook takes POST")
        event_type = headers.get("aeg-event-type", "notification" if as_topic else "").lower()
        if event_type == "unsubscribe":
            return WebhookReply(202)
        if event_type not in ("subscriptionvalidation", "notification"):
            return _error(400, "header aeg-event-type must be SubscriptionValidation or Notification")
        try:
            events = parse_events(body)
        except EventPayloadError as exc:
            return _error(400, str(exc))
        if event_type == "subscriptionvalidation":
            first = events[0] if events else {}
            code = (first.get("data") or {}).get("validationCode") if isinstance(first.get("data"), dict) else None
            if first.get("eventType") != VALIDATION_EVENT or not code:
                return _error(
                    400, f"a SubscriptionValidation request carries one {VALIDATION_EVENT} with data.validationCode"
                )
            log.info(
                "performed the handshake with Event Grid for function %s", spec.name, extra={"function": spec.name}
            )
            return WebhookReply(200, json.dumps({"validationResponse": code}).encode())
        failed = [event["id"] for event in events if not await self.deliver(spec, event)]
        if failed:
            return _error(500, f"{len(failed)} of {len(events)} events failed and were dead-lettered")
        return WebhookReply(200 if as_topic else 202)

    async def deliver(self, spec: FunctionSpec, event: Mapping[str, Any]) -> bool:
        """Invoke `spec` for one event, retrying; park it and return False when every try failed."""
        invocation_ids: list[str] = []
        error: BaseException | None = None
        for attempt in range(1, self._retry.tries + 1):
            invocation_id = str(uuid.uuid4())
            invocation_ids.append(invocation_id)
            try:
                await self._invoker.invoke(
                    spec,
                    trigger_value(event, spec),
                    reason=f"EventGrid trigger fired for event {event.get('id')} (try {attempt} of {self._retry.tries})",
                    invocation_id=invocation_id,
                    retry_count=attempt - 1,
                    max_retry_count=self._retry.tries - 1,
                    extra={"event_id": event.get("id")},
                )
                return True
            except Exception as exc:
                error = exc
                if attempt < self._retry.tries:
                    await asyncio.sleep(self._retry.delay_after(attempt))
        path = self._park(spec, event, error, invocation_ids)
        log.error(
            "event %s for %s failed %d times; dead-lettered to %s",
            event.get("id"),
            spec.name,
            self._retry.tries,
            path,
            extra={"function": spec.name, "event_id": event.get("id"), "invocation_id": invocation_ids[-1]},
        )
        return False

    def _park(self, spec: FunctionSpec, event: Mapping[str, Any], error: BaseException | None, ids: list[str]) -> Path:
        safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", str(event.get("id")))[:120]
        folder = self.dead_letter_dir / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{safe_id}.json"
        now = dt.datetime.now(dt.UTC).isoformat()
        record = {
            **event,
            "deadLetterReason": "MaxDeliveryAttemptsExceeded",
            "deliveryAttempts": len(ids),
            "lastDeliveryOutcome": f"{type(error).__name__}: {error}" if error else "unknown",
            "lastDeliveryAttemptTime": now,
            "function": spec.name,
            "invocationIds": ids,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        tmp.replace(path)
        return path
