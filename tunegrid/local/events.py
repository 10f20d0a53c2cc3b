"""Event Grid events the way an Azure ML workspace emits them, with an on-disk outbox.

Every job state change becomes `Microsoft.MachineLearningServices.RunStatusChanged` (and, on
success, `RunCompleted` too). An event is first written to the outbox (one file per event), then
delivered with azure-eventgrid's `EventGridPublisherClient` to the configured webhook. A file is
removed only after the webhook answered 2xx, so delivery is at least once: a crash between the
POST and the removal sends the event again, with the same `id` (receivers deduplicate on it).
Events the webhook refuses for good (4xx other than 408/429), or that stay undelivered for 24 h
(Event Grid's own retry window), move to `outbox/dead/`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.domain.clock import iso, utcnow
from shared.domain.clock import parse_time as parse_iso
from tunegrid.local.workspace import read_json, try_file_lock, write_json_atomic

log = logging.getLogger(__name__)

RUN_STATUS_CHANGED = "Microsoft.MachineLearningServices.RunStatusChanged"
RUN_COMPLETED = "Microsoft.MachineLearningServices.RunCompleted"
LOCAL_TOPIC = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/local/providers/"
    "Microsoft.MachineLearningServices/workspaces/local"
)
PIPELINE_RUN = "azureml.PipelineRun"
DEAD_AFTER_S = 24 * 3600
_RETRYABLE_STATUS = {408, 429}


def experiment_id(experiment_name: str) -> str:
    """A stable GUID per experiment name (Azure ML experiment ids are GUIDs)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"tunegrid-local-experiment:{experiment_name}"))


def run_events(
    *,
    run_id: str,
    run_status: str,
    experiment_name: str,
    run_tags: Mapping[str, str],
    run_properties: Mapping[str, str],
    topic: str = LOCAL_TOPIC,
) -> list[dict[str, Any]]:
    """The events Azure ML sends for one status change of a pipeline job (plain JSON dicts)."""
    exp_id = experiment_id(experiment_name)
    data: dict[str, Any] = {
        "experimentId": exp_id,
        "experimentName": experiment_name,
        "runId": run_id,
        "runType": PIPELINE_RUN,
        "runTags": dict(run_tags),
        "runProperties": dict(run_properties),
    }
    now = iso(utcnow())
    out = [
        {
            "id": str(uuid.uuid4()),
            "topic": topic,
            "subject": f"experiments/{exp_id}/runs/{run_id}",
            "eventType": RUN_STATUS_CHANGED,
            "eventTime": now,
            "data": {**data, "runStatus": run_status},
            "dataVersion": "2",
            "metadataVersion": "1",
        }
    ]
    if run_status == "Completed":
        out.append(
            {
                "id": str(uuid.uuid4()),
                "topic": topic,
                "subject": f"experiments/{exp_id}/runs/{run_id}",
                "eventType": RUN_COMPLETED,
                "eventTime": now,
                "data": dict(data),
                "dataVersion": "2",
                "metadataVersion": "1",
            }
        )
    return out


@dataclass(frozen=True)
class DeliveryResult:
    sent: int
    pending: int
    dead: int
    error: str | None = None
    busy: bool = False


class Outbox:
    """Events waiting for delivery, one JSON file each, delivered oldest first."""

    def __init__(self, directory: Path, *, webhook_url: str | None, key: str | None) -> None:
        self.directory = directory
        self.webhook_url = webhook_url or None
        self._key = key or ""
        self._client: Any = None

    @property
    def dead_dir(self) -> Path:
        return self.directory / "dead"

    def put(self, events: Iterable[Mapping[str, Any]]) -> None:
        for event in events:
            name = f"{time.time_ns():020d}-{event['id']}.json"
            write_json_atomic(self.directory / name, {"event": dict(event), "attempts": 0, "last_error": None})

    def pending_files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("*.json") if p.is_file())

    def pending(self) -> list[dict[str, Any]]:
        out = []
        for path in self.pending_files():
            doc = read_json(path)
            if doc:
                out.append(doc["event"])
        return out

    def _publisher(self) -> Any:
        if self._client is None:
            from azure.core.credentials import AzureKeyCredential
            from azure.eventgrid import EventGridPublisherClient

            assert self.webhook_url
            self._client = EventGridPublisherClient(
                self.webhook_url,
                AzureKeyCredential(self._key or "local"),
                retry_total=0,
                connection_timeout=3,
                read_timeout=120,
            )
        return self._client

    def _send(self, event: Mapping[str, Any]) -> None:
        from azure.eventgrid import EventGridEvent

        published = EventGridEvent(
            subject=event["subject"],
            event_type=event["eventType"],
            data=event["data"],
            data_version=event["dataVersion"],
            topic=event["topic"],
            id=event["id"],
            event_time=parse_iso(event["eventTime"]),
        )
        from azure.core.exceptions import HttpResponseError

        # Event Grid sends this header with every delivery; the Functions host's webhook checks it.
        try:
            self._publisher().send([published], headers={"aeg-event-type": "Notification"})
        except HttpResponseError as exc:
            # The publisher client expects a topic's 200; a Functions host's webhook answers 202.
            if not 200 <= (exc.status_code or 0) < 300:
                raise

    def deliver(self, *, limit: int = 200) -> DeliveryResult:
        """Send pending events in order until one fails to reach the webhook. Never raises.

        Only one process delivers at a time (a lock file); the others return `busy`."""
        if not self.webhook_url:
            return DeliveryResult(sent=0, pending=len(self.pending_files()), dead=0)
        from azure.core.exceptions import HttpResponseError

        sent = dead = 0
        error: str | None = None
        with try_file_lock(self.directory / ".deliver.lock") as got:
            if not got:
                return DeliveryResult(sent=0, pending=len(self.pending_files()), dead=0, busy=True)
            for path in self.pending_files()[:limit]:
                doc = read_json(path)
                if doc is None:
                    continue
                event = doc["event"]
                try:
                    self._send(event)
                except HttpResponseError as exc:
                    status = exc.status_code or 0
                    if status >= 500 or status in _RETRYABLE_STATUS:
                        error = f"webhook answered {status}"
                        self._record_failure(path, doc, error)
                        break
                    dead += 1
                    self._dead_letter(path, doc, f"webhook refused the event with {status}")
                    continue
                except Exception as exc:  # connection refused, timeout: the app is not up yet
                    error = f"webhook unreachable: {type(exc).__name__}"
                    self._record_failure(path, doc, error)
                    break
                sent += 1
                path.unlink(missing_ok=True)
                log.info(
                    "event delivered: %s %s %s",
                    event["data"].get("runId"),
                    event["eventType"].rsplit(".", 1)[-1],
                    event["data"].get("runStatus", ""),
                )
        return DeliveryResult(sent=sent, pending=len(self.pending_files()), dead=dead, error=error)

    def _record_failure(self, path: Path, doc: dict[str, Any], error: str) -> None:
        doc["attempts"] = int(doc.get("attempts", 0)) + 1
        doc["last_error"] = error
        created = parse_iso(doc["event"].get("eventTime"))
        if created and (utcnow() - created).total_seconds() > DEAD_AFTER_S:
            self._dead_letter(path, doc, f"undelivered for 24 h ({error})")
            return
        write_json_atomic(path, doc)

    def _dead_letter(self, path: Path, doc: dict[str, Any], reason: str) -> None:
        doc["dead_reason"] = reason
        write_json_atomic(self.dead_dir / path.name, doc)
        path.unlink(missing_ok=True)
        log.warning("event %s dead-lettered: %s", doc["event"]["id"], reason)


def deliver_with_backoff(
    outbox: Outbox, *, for_s: float, first_delay_s: float = 0.5, max_delay_s: float = 30.0, stop: Any = None
) -> DeliveryResult:
    """Keep delivering until the outbox is empty or `for_s` has passed (backoff between tries)."""
    deadline = time.monotonic() + for_s
    delay = first_delay_s
    result = outbox.deliver()
    while result.pending and outbox.webhook_url and time.monotonic() < deadline:
        if stop is not None and stop():
            break
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, max_delay_s)
        result = outbox.deliver()
    return result
