"""A webhook subscriber for run events: what `make demo` listens with, and a template for your own.

It behaves as an Event Grid webhook with the CloudEvents v1.0 schema must: it answers the abuse-protection
handshake (`OPTIONS` with `WebHook-Request-Origin` -> 200 and `WebHook-Allowed-Origin`), reads each delivery
with the SDK's `CloudEvent.from_json` (a malformed one is refused with 400) and keeps every event id once:
Event Grid delivers at least once, and the app may publish an event again after a crash, always with the
same id (`<run_id>-<sequence>`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Notification:
    """One run event as the subscriber received it."""

    id: str
    type: str
    source: str
    subject: str | None
    time: datetime | None
    data: dict[str, Any]
    delivery_count: int
    specversion: str = "1.0"
    datacontenttype: str | None = None

    @property
    def state(self) -> str:
        return str(self.data.get("state", ""))

    def summary(self) -> str:
        """One line for a person: type, run, move and what matters about the new state."""
        data = self.data
        move = f"{data.get('previousState')} -> {data.get('state')}" if data.get("previousState") else "created"
        detail = {
            "submitted": f"job {data.get('jobName')}",
            "deploying": f"model {data.get('modelName')}:{data.get('modelVersion')} to {data.get('endpoint')}",
            "live": f"{data.get('endpoint')}/{data.get('deployment')}"
            + (f", smoke p50 {data['smoke'].get('p50Ms')} ms" if data.get("smoke") else ""),
        }.get(self.state, "")
        if data.get("reason"):
            detail = f"reason: {str(data['reason'])[:120]}"
        return f"{self.type:<30} {data.get('runId')} #{data.get('sequence')} {move}" + (f"  {detail}" if detail else "")


class WebhookListener:
    """A CloudEvents webhook on 127.0.0.1 (a free port unless one is given); `on_event` sees each new event once."""

    def __init__(
        self,
        *,
        on_event: Callable[[Notification], None] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._on_event = on_event
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self.events: list[Notification] = []
        self.duplicates = 0
        self.handshakes = 0
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/events"

    def allowed_origin(self, origin: str) -> str | None:
        """The origin to allow in the handshake (Event Grid's `eventgrid.azure.net`); None refuses deliveries."""
        return origin

    def answer(self, notification: Notification) -> int:
        """The HTTP status to answer a new delivery with (a test subclass makes it fail); 200 takes it."""
        return 200

    def take(self, notification: Notification) -> bool:
        """Keep a delivered event unless its id was seen; True when it was new."""
        with self._lock:
            if notification.id in self._seen:
                self.duplicates += 1
                return False
            self._seen.add(notification.id)
            self.events.append(notification)
        if self._on_event is not None:
            self._on_event(notification)
        return True

    def wait_for(self, predicate: Callable[[list[Notification]], bool], *, timeout_s: float) -> bool:
        """Poll until `predicate(events)` holds (True) or the time is up (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                events = list(self.events)
            if predicate(events):
                return True
            time.sleep(0.05)
        return False

    def start(self) -> WebhookListener:
        self._thread = threading.Thread(target=self._server.serve_forever, name="run-events-listener", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> WebhookListener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("listener: " + format, *args)

            def _reply(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_OPTIONS(self) -> None:
                origin = self.headers.get("WebHook-Request-Origin")
                if not origin:
                    self._reply(400, body=b"WebHook-Request-Origin is required")
                    return
                listener.handshakes += 1
                allowed = listener.allowed_origin(origin)
                if allowed is None:
                    self._reply(403, body=b"deliveries from this origin are not wanted")
                    return
                self._reply(
                    200, {"WebHook-Allowed-Origin": allowed, "WebHook-Allowed-Rate": "*", "Allow": "POST, OPTIONS"}
                )

            def do_POST(self) -> None:
                from azure.core.messaging import CloudEvent

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    docs = json.loads(body)
                    events: list[CloudEvent[Any]] = [
                        CloudEvent.from_dict(d) for d in (docs if isinstance(docs, list) else [docs])
                    ]
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    self._reply(400, body=f"not a CloudEvent: {exc}".encode())
                    return
                count = int(self.headers.get("aeg-delivery-count") or 0)
                for event in events:
                    notification = Notification(
                        id=event.id,
                        type=event.type,
                        source=event.source,
                        subject=event.subject,
                        time=event.time,
                        data=event.data if isinstance(event.data, dict) else {},
                        delivery_count=count,
                        specversion=event.specversion,
                        datacontenttype=event.datacontenttype,
                    )
                    status = listener.answer(notification)
                    if not 200 <= status < 300:
                        self._reply(status)
                        return
                    listener.take(notification)
                self._reply(200)

        return Handler
