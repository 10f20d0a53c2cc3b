"""Support for the scoring-proxy tests: a real loopback upstream speaking the Azure ML scoring contract,
a hand-written fake of the backend port's credential call, an in-memory ledger and live run records."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from shared.adapters.endpoint_credentials import CredentialCache, EndpointCaller
from shared.adapters.http_client import HttpClient
from shared.domain.resources import EndpointCredentials
from shared.domain.runs import RunRecord, RunState
from shared.ports import UpstreamReply
from shared.settings import Settings

UPSTREAM_KEY = "upstream-secret-KEY-9f8e7d6c5b4a"
PROXY_KEY = "proxy-key-ALPHA-0123456789abcdef"
OTHER_PROXY_KEY = "proxy-key-BETA-fedcba9876543210"


def answer_in_shape(shape: str, texts: list[str], *, completion_tokens: int = 7) -> Any:
    """The answer body a serving image of this `shape` gives for these texts (one per conversation).
    `usage` is the local server's one-conversation shape: the text, and its token counts beside it."""
    if shape == "usage":
        return {
            "output": texts[0],
            "usage": {
                "prompt_tokens": 11,
                "completion_tokens": completion_tokens,
                "total_tokens": 11 + completion_tokens,
            },
        }
    if shape == "output":
        return {"output": texts[0]} if len(texts) == 1 else {"output": texts}
    if shape == "indexed":
        return [{"0": t} for t in texts]
    if shape == "strings":
        return list(texts)
    if shape == "choices":
        return {
            "id": "cmpl-upstream",
            "object": "chat.completion",
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                for i, t in enumerate(texts)
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        }
    if shape == "generated_text":
        return [{"generated_text": t} for t in texts]
    if shape == "predictions":
        return {"predictions": [{"0": t} for t in texts]}
    raise ValueError(shape)


@dataclass
class Scripted:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class SeenRequest:
    path: str
    headers: dict[str, str]
    body: Any


class LoopbackUpstream:
    """A real HTTP/1.1 server on 127.0.0.1 answering like a deployed chat model.

    It checks `Authorization: Bearer <key>` (401 otherwise), records every request, and answers
    `reply(conversation) -> text` per conversation in the configured `shape`. Tests can queue
    scripted answers (status, body, headers, delay) that are used first.
    """

    def __init__(self, *, key: str = UPSTREAM_KEY, shape: str = "indexed") -> None:
        self.key = key
        self.shape = shape
        self.reply: Callable[[list[dict[str, str]]], str] = lambda conv: f"echo: {conv[-1]['content']}"
        self.script: deque[Scripted] = deque()
        self.seen: list[SeenRequest] = []
        self.capacity: int | None = None
        """Requests served at once, as a deployment's max_concurrent_requests_per_instance: 429 beyond."""
        self.delay_s = 0.0
        self.cut_off = False
        """The `usage` shape reports max_new_tokens completion tokens (generation stopped at the limit)."""
        self.in_flight = 0
        self.max_in_flight = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                with upstream._lock:
                    upstream.seen.append(SeenRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    scripted = upstream.script.popleft() if upstream.script else None
                if self.headers.get("Authorization") != f"Bearer {upstream.key}":
                    self._send(401, b'{"message": "invalid key"}', {})
                    return
                if scripted is not None:
                    if upstream._closing.wait(scripted.delay_s):
                        return  # the test is over: answer nobody
                    self._send(scripted.status, scripted.body, scripted.headers)
                    return
                with upstream._lock:
                    if upstream.capacity is not None and upstream.in_flight >= upstream.capacity:
                        upstream.refused += 1
                        busy = True
                    else:
                        busy = False
                        upstream.in_flight += 1
                        upstream.max_in_flight = max(upstream.max_in_flight, upstream.in_flight)
                if busy:
                    self._send(429, b'{"message": "too many requests"}', {"Retry-After": "1"})
                    return
                try:
                    upstream._closing.wait(upstream.delay_s)
                    conversations = body["input_data"]["input_string"]
                    if conversations and isinstance(conversations[0], dict):
                        conversations = [conversations]
                    texts = [upstream.reply(conv) for conv in conversations]
                    limit = (body["input_data"].get("parameters") or {}).get("max_new_tokens", 256)
                    answer = answer_in_shape(upstream.shape, texts, completion_tokens=limit if upstream.cut_off else 3)
                finally:
                    with upstream._lock:
                        upstream.in_flight -= 1
                self._send(200, json.dumps(answer).encode(), {})

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            # One handler thread per connection, joined by server_close(); __exit__ first ends the
            # keep-alive connections a client pool still holds, so no handler thread outlives the test.
            daemon_threads = False
            block_on_close = True

            def __init__(self, *args: Any) -> None:
                super().__init__(*args)
                self.open_connections: set[socket.socket] = set()
                self.connections_lock = threading.Lock()

            def process_request(self, request: Any, client_address: Any) -> None:
                with self.connections_lock:
                    self.open_connections.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request: Any) -> None:
                with self.connections_lock:
                    self.open_connections.discard(request)
                super().shutdown_request(request)

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up (timeout tests) makes the write fail: expected

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/score"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> LoopbackUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._server.shutdown()
        with self._server.connections_lock:
            for connection in self._server.open_connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)  # the handler's blocking read returns: it ends
        self._server.server_close()  # joins the handler threads
        self._thread.join()

    def queue(
        self, status: int, body: Any = b"", *, headers: dict[str, str] | None = None, delay_s: float = 0.0
    ) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.script.append(Scripted(status, raw, headers or {}, delay_s))


class CredentialsBackend:
    """The backend port's `get_credentials`, answering with the loopback upstream's URL and key."""

    name = "fake"

    def __init__(self, upstream: LoopbackUpstream, *, expires_in: timedelta | None = None) -> None:
        self.upstream = upstream
        self.calls: list[str] = []
        self.expires_in = expires_in
        self.key: str | None = None  # when set, handed out instead of the upstream's (a stale key)

    def get_credentials(self, endpoint: str) -> EndpointCredentials:
        self.calls.append(endpoint)
        expires = datetime.now(UTC) + self.expires_in if self.expires_in is not None else None
        return EndpointCredentials(scoring_uri=self.upstream.url, key=self.key or self.upstream.key, expires_at=expires)


class MemoryLedger:
    """The ledger's `list()` over records held in memory; counts reads."""

    def __init__(self, records: list[RunRecord] | None = None) -> None:
        self.records = list(records or [])
        self.reads = 0

    def list(self) -> list[RunRecord]:
        self.reads += 1
        return sorted(self.records, key=lambda r: r.created_at, reverse=True)


def live_record(
    run_id: str,
    *,
    model_name: str = "phi3-ultrachat",
    version: str = "1",
    endpoint: str = "ep-test",
    deployment: str = "blue",
    live_at: datetime | None = None,
    state: RunState = RunState.LIVE,
) -> RunRecord:
    live_at = live_at or datetime.now(UTC)
    return RunRecord(
        run_id=run_id,
        state=state,
        container="training-data",
        blob=f"{run_id}.jsonl",
        blob_version="v1",
        created_at=live_at - timedelta(minutes=30),
        updated_at=live_at,
        timeline=(("received", (live_at - timedelta(minutes=30)).isoformat()), (state.value, live_at.isoformat())),
        model_name=model_name,
        model_version=version,
        endpoint=endpoint,
        deployment=deployment,
    )


def score_endpoint(
    backend: Any, endpoint: str, body: Any, *, deployment: str = "", timeout_s: float = 60.0
) -> UpstreamReply:
    """One blocking call to an endpoint through the app's own caller (its one HTTP client and credential
    cache), as the roll-out's smoke test makes it; the answer's status and body come back."""
    http = HttpClient()
    caller = EndpointCaller(http, CredentialCache(backend.get_credentials, ttl_s=60))
    try:
        return caller.post_json_blocking(
            endpoint, deployment, json.dumps(body).encode(), request_id="test-call", timeout_s=timeout_s
        )
    finally:
        http.close_blocking()


def proxy_settings(**values: str) -> Settings:
    env = {"PROXY_API_KEYS": f"{PROXY_KEY},{OTHER_PROXY_KEY}", **values}
    return Settings.from_env(env)


@contextmanager
def loopback_upstream(**kwargs: Any) -> Iterator[LoopbackUpstream]:
    with LoopbackUpstream(**kwargs) as upstream:
        yield upstream
