"""Test support for the local backend: the tiny model cache, chat data, an Event Grid sink, waiting.

Other test modules that drive `LocalBackend` (rollout, janitor, end to end) can use these too:
`model_cache(tmp_path_factory)` builds the tiny random Phi3 once per test session, `TINY_PARAMS`
trains it in seconds, `EventSink` is a real HTTP webhook that records what Event Grid would deliver.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from tests.support import wait_for

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"

TINY_PARAMS: dict[str, Any] = {
    "max_steps": 16,
    "learning_rate": 0.005,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "max_seq_length": 128,
    "lora_r": 8,
    "lora_alpha": 16,
    "seed": 7,
    "eval_steps": 8,
    "apply_deepspeed": "true",
}
"""Component-named parameters that train the tiny model in a few seconds with a visible loss drop."""

T = TypeVar("T")


def model_cache(tmp_path_factory: Any) -> Path:
    """One model cache per test session (the tiny model is built into it once, in seconds)."""
    from tunegrid.local.base_models import prepare_tiny_phi3

    cache = tmp_path_factory.getbasetemp() / "tunegrid-model-cache"
    prepare_tiny_phi3(cache)
    return cache


def write_rows(dest: Path, *, source: str = "azureml_chat_train.jsonl", start: int = 0, count: int = 40) -> Path:
    """Copy `count` rows of a sample file (real chat data) to `dest`."""
    lines = [ln for ln in (SAMPLES / source).read_text(encoding="utf-8").splitlines() if ln.strip()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(lines[start : start + count]) + "\n", encoding="utf-8")
    return dest


def wait_until(predicate: Callable[[], T], *, timeout_s: float, interval_s: float = 0.25, what: str = "condition") -> T:
    """`tests.support.wait_for`, polling every quarter second by default (these predicates read job files)."""
    return wait_for(predicate, timeout_s=timeout_s, interval_s=interval_s, what=what)


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    events: list[dict[str, Any]]


@dataclass
class EventSink:
    """A real webhook on 127.0.0.1 recording Event Grid deliveries; answers 401 to a wrong aeg-sas-key."""

    key: str
    port: int = 0
    deliveries: list[Delivery] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/runtime/webhooks/eventgrid?functionName=job_events"

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for d in self.deliveries for e in d.events]

    def start(self) -> EventSink:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("aeg-sas-key") != sink.key:
                    self.send_response(401)
                    self.end_headers()
                    return
                sink.deliveries.append(Delivery(self.path, dict(self.headers), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@contextlib.contextmanager
def event_sink(key: str, *, port: int = 0) -> Iterator[EventSink]:
    sink = EventSink(key=key, port=port).start()
    try:
        yield sink
    finally:
        sink.stop()
