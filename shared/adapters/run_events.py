"""`RunEvents` over an Event Grid topic: run events as CloudEvents v1.0 through `EventGridPublisherClient`.

In Azure the app publishes with its managed identity (role "EventGrid Data Sender" on the topic; the topic
has local auth disabled, so there is no key to leak). The dev host stands in for the topic locally; its
plain-http endpoint cannot take a bearer token (azure-core refuses to send one over http), so there the
client sends `LOCAL_RUN_EVENTS_KEY` as `aeg-sas-key`, a LOCAL_* setting that is never set in Azure.
The only module that builds this client and translates its errors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)

from shared.domain.clock import parse_time
from shared.domain.run_events import event_source
from shared.errors import ConfigError, InvalidInput, PermissionDenied, TransientError, TunegridError
from shared.settings import Settings

log = logging.getLogger(__name__)

CONNECTION_TIMEOUT_S = 5
READ_TIMEOUT_S = 10
RETRY_TOTAL = 1
"""One publish blocks the state change that made it for at most about (1 + RETRY_TOTAL) x 15 s, and only when
the topic is unreachable (then in-line publishing pauses and the roll-out timer retries)."""

_REQUEST_OPTIONS = {
    "retry_total": RETRY_TOTAL,
    "connection_timeout": CONNECTION_TIMEOUT_S,
    "read_timeout": READ_TIMEOUT_S,
}


class _RequestOptionNoise(logging.Filter):
    """azure-eventgrid 4.22's basic-tier client ignores client options (it builds its pipeline without them), so
    timeouts and retries go per call to `send`, which also hands them to its CloudEvent model; that model logs a
    warning for each ("... is not a known attribute ... will be ignored") on every publish. Drop those only."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not ("is not a known attribute" in str(record.msg) and args and args[0] in _REQUEST_OPTIONS)


logging.getLogger("azure.eventgrid._legacy._generated._serialization").addFilter(_RequestOptionNoise())


def _credential(settings: Settings) -> Any:
    """A key for the dev host's stand-in topic (LOCAL_RUN_EVENTS_KEY), else the app's identity, as
    `shared.adapters.storage` gets it (the user-assigned identity's client id in Azure)."""
    endpoint = settings.run_events_topic_endpoint
    if settings.local_run_events_key:
        from azure.core.credentials import AzureKeyCredential

        return AzureKeyCredential(settings.local_run_events_key)
    if endpoint.lower().startswith("http://"):
        raise ConfigError(
            f"RUN_EVENTS_TOPIC_ENDPOINT={endpoint} is plain http (the dev host's topic): set LOCAL_RUN_EVENTS_KEY "
            "too; an identity token is only ever sent over https"
        )
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if settings.client_id:
        return ManagedIdentityCredential(client_id=settings.client_id)
    return DefaultAzureCredential(exclude_interactive_browser_credential=True)


def _translated(exc: AzureError) -> TunegridError:
    status = getattr(exc, "status_code", None)
    message = str(getattr(exc, "message", "") or exc).splitlines()[0][:300]
    if isinstance(exc, ClientAuthenticationError) and getattr(exc, "response", None) is None:
        return TransientError(f"no token for Event Grid: {message}")
    if status in (401, 403):
        return PermissionDenied(
            f"the topic refused the app's identity (HTTP {status}): it needs the role EventGrid Data Sender on the "
            "topic of RUN_EVENTS_TOPIC_ENDPOINT"
        )
    if isinstance(exc, ResourceNotFoundError) or status == 404:
        return ConfigError(f"no Event Grid topic at RUN_EVENTS_TOPIC_ENDPOINT (HTTP 404): {message}")
    if status in (400, 413):
        return InvalidInput(f"the topic refused the events (HTTP {status}): {message}")
    if isinstance(exc, HttpResponseError) and status is not None:
        return TransientError(f"the topic answered HTTP {status}: {message}")
    return TransientError(f"the topic could not be reached: {type(exc).__name__}: {message}")


class EventGridRunEvents:
    """`RunEvents`: publishes pending run events to one Event Grid topic (CloudEvents v1.0 input schema)."""

    enabled = True

    def __init__(self, client: Any, *, source: str) -> None:
        self._client = client
        self.source = source

    @classmethod
    def from_settings(cls, settings: Settings) -> EventGridRunEvents:
        from azure.eventgrid import EventGridPublisherClient

        client = EventGridPublisherClient(settings.run_events_topic_endpoint, _credential(settings))
        return cls(client, source=event_source(settings.instance))

    def cloud_events(self, events: Sequence[Mapping[str, Any]]) -> list[Any]:
        """The SDK's CloudEvent objects for pending events (the SDK writes the CloudEvents JSON)."""
        from azure.core.messaging import CloudEvent

        return [
            CloudEvent(
                source=self.source,
                type=event["type"],
                subject=event["subject"],
                id=event["id"],
                time=parse_time(event["time"]),
                data=event["data"],
                datacontenttype="application/json",
            )
            for event in events
        ]

    def publish(self, events: Sequence[Mapping[str, Any]]) -> None:
        if not events:
            return
        batch = self.cloud_events(events)
        try:
            self._client.send(batch, **_REQUEST_OPTIONS)
        except AzureError as exc:
            raise _translated(exc) from exc

    def close(self) -> None:
        self._client.close()
