"""The official `openai` client, unchanged, against the chat functions served by the dev host, with a
real loopback upstream behind them and the usage table in Azurite: plain and streamed chat, max_tokens
cut-offs, 32 concurrent calls on a capacity-1 deployment, auth failures, oversize bodies, unknown
models, malformed JSON. Also: no key material ever leaks into responses or logs. (Streaming from the
real local model: tests/test_scoring_local_model.py.)"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import httpx
import openai
import pytest

from functions import chat
from shared.adapters.storage import StorageClients
from shared.adapters.usage import read_usage
from shared.bootstrap import AppContext, set_app_context
from shared.settings import USAGE_TABLE
from tests.scoring_support import (
    OTHER_PROXY_KEY,
    PROXY_KEY,
    UPSTREAM_KEY,
    CredentialsBackend,
    LoopbackUpstream,
    MemoryLedger,
    live_record,
    proxy_settings,
)
from tunegrid.devhost import DevHost

pytestmark = pytest.mark.azurite

MAX_BODY = 64 * 1024
ENDPOINT = "ep-openai-test"
HI = [{"role": "user", "content": "Hi there"}]


class Proxy:
    def __init__(
        self, host: DevHost, upstream: LoopbackUpstream, backend: CredentialsBackend, usage_table: Any
    ) -> None:
        self.host = host
        self.upstream = upstream
        self.backend = backend
        self.usage_table = usage_table
        self.base_url = host.base_url + "/api/v1"
        self.queue_timeout_s = 30.0

    def client(self, key: str = PROXY_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def proxy(azurite: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """The chat blueprint on the dev host, wired through the real app context (settings, ledger,
    backend port, usage table) exactly as `scoring_service()` builds it in a function app."""
    storage = StorageClients.from_connection({"": azurite.connection_string})
    storage.ensure_resources()
    usage_table = storage.tables.get_table_client(USAGE_TABLE)
    with LoopbackUpstream(shape="indexed") as upstream:
        backend = CredentialsBackend(upstream)
        ledger = MemoryLedger(
            [live_record("run-openai-1", model_name="phi3-ultrachat", version="3", endpoint=ENDPOINT)]
        )
        settings = proxy_settings(PROXY_MAX_BODY_BYTES=str(MAX_BODY), PROXY_UPSTREAM_TIMEOUT_S="5")
        set_app_context(
            AppContext(settings, overrides={"ledger": ledger, "backend": backend, "usage_table": usage_table})
        )
        chat.set_scoring_service(None)
        app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
        app.register_functions(chat.bp)
        try:
            with DevHost(app, settings={}, port=0, state_dir=Path(tmp_path_factory.mktemp("devhost"))) as host:
                yield Proxy(host, upstream, backend, usage_table)
        finally:
            chat.set_scoring_service(None)
            set_app_context(None)


@pytest.fixture(autouse=True)
def _reset_upstream(proxy: Proxy) -> Iterator[None]:
    yield
    proxy.upstream.shape = "indexed"
    proxy.upstream.script.clear()
    proxy.upstream.reply = lambda conv: f"echo: {conv[-1]['content']}"
    proxy.upstream.capacity = None
    proxy.upstream.delay_s = 0.0
    proxy.upstream.cut_off = False


def test_plain_chat(proxy: Proxy) -> None:
    """A plain completion: content, ids, model and the request id header the client exposes."""
    raw = proxy.client().chat.completions.with_raw_response.create(
        model="phi3-ultrachat", messages=HI, temperature=0.6, top_p=0.9, max_tokens=64
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: Hi there"
    assert completion.choices[0].message.role == "assistant" and completion.choices[0].finish_reason == "stop"
    assert completion.model == "phi3-ultrachat" and completion.system_fingerprint == "run-openai-1"
    request_id = raw.headers["x-request-id"]
    assert completion.id == f"chatcmpl-{request_id}" and completion._request_id == request_id
    sent = proxy.upstream.seen[-1]
    assert sent.body["input_data"]["parameters"] == {
        "max_new_tokens": 64,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
    }
    assert sent.headers["azureml-model-deployment"] == "blue" and sent.headers["x-ms-client-request-id"] == request_id


def test_usage_is_reported_when_the_image_reports_it(proxy: Proxy) -> None:
    """An OpenAI-shaped upstream answer carries token usage through to the client."""
    proxy.upstream.shape = "choices"
    completion = proxy.client().chat.completions.create(model="run-openai-1", messages=HI)
    assert [c.message.content for c in completion.choices] == ["echo: Hi there"]
    assert completion.usage is not None and completion.usage.total_tokens == 18


def test_streaming_chat(proxy: Proxy) -> None:
    """stream=True yields OpenAI chunks: role, content, finish reason, optional usage, then the stream ends."""
    proxy.upstream.shape = "choices"
    stream = proxy.client().chat.completions.create(
        model="phi3-ultrachat", messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == "echo: Hi there"
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_streaming_from_an_upstream_that_cannot_stream(proxy: Proxy) -> None:
    """An upstream answering in one piece (Azure ML's MLflow images) still gives a chunked stream:
    role first, the text in several content chunks, the finish reason last, then the end."""
    proxy.upstream.reply = lambda conv: "a fairly long answer, " * 6
    chunks = list(proxy.client().chat.completions.create(model="phi3-ultrachat", messages=HI, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert len(contents) > 2 and "".join(contents) == "a fairly long answer, " * 6  # type: ignore[arg-type]
    assert chunks[-1].choices[0].finish_reason == "stop" and all(
        c.choices[0].finish_reason is None for c in chunks[:-1]
    )


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_cut_off_is_length(proxy: Proxy, stream: bool) -> None:
    """An answer that used all of max_tokens reports finish_reason `length` (the upstream's token counts);
    one that ended sooner reports `stop`; the counts come back as usage."""
    proxy.upstream.shape = "usage"
    client = proxy.client()
    for cut, expected in ((True, "length"), (False, "stop")):
        proxy.upstream.cut_off = cut
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model="phi3-ultrachat",
                    messages=HI,
                    max_tokens=5,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            usage = chunks[-1].usage
        else:
            completion = client.chat.completions.create(model="phi3-ultrachat", messages=HI, max_tokens=5)
            reason, usage = completion.choices[0].finish_reason, completion.usage
        assert reason == expected
        assert usage is not None and usage.completion_tokens == (5 if cut else 3) and usage.prompt_tokens == 11
    assert proxy.upstream.seen[-1].body["input_data"]["parameters"]["max_new_tokens"] == 5


def test_a_stop_sequence_ends_with_stop(proxy: Proxy) -> None:
    """The proxy cuts the answer at a stop sequence (also across streamed pieces) and says `stop`."""
    proxy.upstream.shape = "usage"
    proxy.upstream.cut_off = True
    proxy.upstream.reply = lambda conv: "first line, and some more words\nsecond line that is never sent"
    client = proxy.client()
    plain = client.chat.completions.create(model="phi3-ultrachat", messages=HI, stop=["\n"])
    assert plain.choices[0].message.content == "first line, and some more words"
    assert plain.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="phi3-ultrachat", messages=HI, stop="\n", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "first line, and some more words"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_32_concurrent_calls_on_a_capacity_1_deployment(proxy: Proxy) -> None:
    """32 clients at once against a deployment that serves one request at a time (429 beyond): every
    call succeeds, the upstream never sees two at once, calls reach it in the order they arrived, and
    none waits as long as the queue timeout."""
    proxy.upstream.capacity = 1
    proxy.upstream.delay_s = 0.02
    before = len(proxy.upstream.seen)
    results: list[Any] = [None] * 32
    waits: list[float] = [0.0] * 32
    start = threading.Barrier(32)

    def call(i: int) -> None:
        client = proxy.client()
        start.wait()
        began = time.monotonic()
        try:
            results[i] = client.chat.completions.create(
                model="phi3-ultrachat", messages=[{"role": "user", "content": f"caller {i}"}]
            )
        except Exception as exc:  # kept for the assertion below
            results[i] = exc
        waits[i] = time.monotonic() - began

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(not isinstance(r, Exception) for r in results), [r for r in results if isinstance(r, Exception)]
    assert sorted(r.choices[0].message.content for r in results) == sorted(f"echo: caller {i}" for i in range(32))
    assert proxy.upstream.refused == 0 and proxy.upstream.max_in_flight == 1
    served = [s.headers["x-ms-client-request-id"] for s in proxy.upstream.seen[before:]]
    assert len(served) == 32 and served == sorted(served)  # request ids count up as requests arrive: FIFO
    assert max(waits) < proxy.queue_timeout_s


def test_malformed_json_is_a_400(proxy: Proxy) -> None:
    """A body that is not JSON (the official client's request, its bytes cut short on the way) is a
    400 `invalid_json` in OpenAI's error shape, and nothing goes upstream."""

    class CutShort(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            body = request.read()[:-7]
            headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
            return super().handle_request(httpx.Request(request.method, request.url, headers=headers, content=body))

    before = len(proxy.upstream.seen)
    client = openai.OpenAI(
        base_url=proxy.base_url, api_key=PROXY_KEY, max_retries=0, http_client=httpx.Client(transport=CutShort())
    )
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="phi3-ultrachat", messages=HI)
    assert err.value.body["code"] == "invalid_json" and err.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert err.value.body["request_id"] == err.value.request_id  # type: ignore[index]
    assert len(proxy.upstream.seen) == before


def test_models_list(proxy: Proxy) -> None:
    """client.models.list() lists the live models."""
    models = proxy.client().models.list()
    assert [m.id for m in models.data] == ["phi3-ultrachat"]
    assert models.data[0].owned_by == "tunegrid"


def test_upstream_failure_is_a_502_with_request_id(proxy: Proxy) -> None:
    """An upstream 500 surfaces as openai.APIStatusError 502 carrying the request id (header and body)."""
    proxy.upstream.queue(500, {"error": "CUDA out of memory"})
    with pytest.raises(openai.APIStatusError) as err:
        proxy.client().chat.completions.create(model="phi3-ultrachat", messages=HI)
    assert err.value.status_code == 502
    assert err.value.request_id and err.value.body["request_id"] == err.value.request_id  # type: ignore[index]
    assert err.value.body["code"] == "upstream_error" and "HTTP 500" in err.value.body["message"]  # type: ignore[index]


def test_wrong_key_is_401(proxy: Proxy) -> None:
    """A wrong key raises openai.AuthenticationError."""
    with pytest.raises(openai.AuthenticationError) as err:
        proxy.client("not-the-key").chat.completions.create(model="phi3-ultrachat", messages=HI)
    assert err.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        proxy.client("not-the-key").models.list()


def test_missing_key_is_401(proxy: Proxy) -> None:
    """No key at all (plain HTTP) is a 401 with an OpenAI-style error object."""
    reply = httpx.post(proxy.base_url + "/chat/completions", json={"model": "phi3-ultrachat", "messages": HI})
    assert reply.status_code == 401
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and "missing API key" in error["message"]
    assert error["request_id"] == reply.headers["x-request-id"]
    assert reply.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError) as err:  # the client with its Authorization header removed
        proxy.client().chat.completions.create(
            model="phi3-ultrachat", messages=HI, extra_headers={"Authorization": openai.omit}
        )
    assert "missing API key" in err.value.body["message"]  # type: ignore[index]


def test_functions_key_header_is_accepted(proxy: Proxy) -> None:
    """`x-functions-key` works as well as the bearer token (second configured key)."""
    reply = httpx.post(
        proxy.base_url + "/chat/completions",
        json={"model": "phi3-ultrachat", "messages": HI},
        headers={"x-functions-key": OTHER_PROXY_KEY},
    )
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "echo: Hi there"


def test_oversized_body_is_413(proxy: Proxy) -> None:
    """A body over PROXY_MAX_BODY_BYTES gives 413 before it is parsed or sent on."""
    before = len(proxy.upstream.seen)
    with pytest.raises(openai.APIStatusError) as err:
        proxy.client().chat.completions.create(
            model="phi3-ultrachat", messages=[{"role": "user", "content": "x" * (MAX_BODY + 1)}]
        )
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"  # type: ignore[index]
    assert len(proxy.upstream.seen) == before


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"model": "no-such-model"}, openai.NotFoundError, "model"),
        ({"model": "phi3-ultrachat", "temperature": 5}, openai.BadRequestError, "temperature"),
        (
            {"model": "phi3-ultrachat", "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
            openai.BadRequestError,
            "tools",
        ),
        ({"model": "phi3-ultrachat", "n": 2}, openai.BadRequestError, "n"),
        ({"model": "phi3-ultrachat", "logprobs": True}, openai.BadRequestError, "logprobs"),
        (
            {"model": "phi3-ultrachat", "response_format": {"type": "json_object"}},
            openai.BadRequestError,
            "response_format",
        ),
    ],
)
def test_client_errors(proxy: Proxy, kwargs: dict[str, Any], error: type[openai.APIStatusError], param: str) -> None:
    """Unknown models are 404, schema errors 400 naming the parameter."""
    with pytest.raises(error) as err:
        proxy.client().chat.completions.create(messages=HI, **kwargs)
    assert err.value.body["param"] == param  # type: ignore[index]


def test_score_route(proxy: Proxy) -> None:
    """POST /api/score passes the Azure ML schema through, selecting the model by query or header."""
    body = {
        "input_data": {
            "input_string": [[{"role": "user", "content": "One"}], [{"role": "user", "content": "Two"}]],
            "parameters": {"max_new_tokens": 20},
        },
        "params": {},
    }
    auth = {"Authorization": f"Bearer {PROXY_KEY}"}
    by_query = httpx.post(proxy.host.base_url + "/api/score", params={"model": "run-openai-1"}, json=body, headers=auth)
    by_header = httpx.post(
        proxy.host.base_url + "/api/score", json=body, headers={**auth, "x-tunegrid-model": "phi3-ultrachat"}
    )
    for reply in (by_query, by_header):
        assert reply.status_code == 200
        assert reply.json()["output"] == ["echo: One", "echo: Two"] and reply.json()["run_id"] == "run-openai-1"
    missing = httpx.post(proxy.host.base_url + "/api/score", json=body, headers={**auth, "x-tunegrid-model": "nope"})
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("parameters", "conversations", "param"),
    [
        ({}, 17, "input_data.input_string"),
        ({"num_beams": 8}, 1, "input_data.parameters.num_beams"),
        ({"max_new_tokens": 10, "min_new_tokens": 11}, 1, "input_data.parameters.min_new_tokens"),
        ({"output_scores": True}, 1, "input_data.parameters.output_scores"),
    ],
)
def test_score_route_limits(proxy: Proxy, parameters: dict[str, Any], conversations: int, param: str) -> None:
    """/api/score caps the conversations per request and checks every generation parameter (400, OpenAI shape)."""
    body = {
        "input_data": {"input_string": [[{"role": "user", "content": "x"}]] * conversations, "parameters": parameters}
    }
    before = len(proxy.upstream.seen)
    reply = httpx.post(
        proxy.host.base_url + "/api/score", json=body, headers={"Authorization": f"Bearer {PROXY_KEY}"}, timeout=30
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param
    assert len(proxy.upstream.seen) == before


def test_usage_record_reaches_the_table(proxy: Proxy) -> None:
    """Served requests show up in the usage table the janitor reads (the first flush is immediate)."""
    import time

    proxy.client().chat.completions.create(model="phi3-ultrachat", messages=HI)
    deadline = time.monotonic() + 10
    record = None
    while time.monotonic() < deadline:
        record = read_usage(proxy.usage_table, ENDPOINT)
        if record is not None:
            break
        time.sleep(0.1)
    assert record is not None and record.requests >= 1 and record.last_used_at is not None


def test_no_key_material_in_responses_or_logs(proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    """Across successes, refusals, upstream errors that echo the key and a key rotation, neither the
    upstream key nor any proxy key appears in any response or any log record."""
    caplog.set_level(logging.DEBUG)
    echo = f'{{"error": "bad request, Authorization: Bearer {UPSTREAM_KEY}"}}'.encode()
    texts: list[str] = []

    def keep(reply: httpx.Response) -> None:
        texts.append(reply.text)
        texts.extend(f"{k}: {v}" for k, v in reply.headers.items())

    url = proxy.base_url + "/chat/completions"
    good = {"Authorization": f"Bearer {PROXY_KEY}"}
    payload = {"model": "phi3-ultrachat", "messages": HI}
    with httpx.Client(timeout=30) as http:
        keep(http.post(url, json=payload, headers=good))
        keep(http.post(url, json={**payload, "stream": True}, headers=good))
        keep(http.get(proxy.base_url + "/models", headers=good))
        keep(http.post(url, json=payload, headers={"Authorization": f"Bearer {PROXY_KEY}x"}))
        keep(http.post(url, json=payload, headers={"x-functions-key": OTHER_PROXY_KEY[:-1]}))
        proxy.upstream.queue(500, echo)
        keep(http.post(url, json=payload, headers=good))
        proxy.upstream.queue(400, echo)
        keep(http.post(url, json=payload, headers=good))
        proxy.backend.key = "stale-" + UPSTREAM_KEY  # rotation: cached key refused, refetch, refused again
        proxy.upstream.key = "rotated-" + UPSTREAM_KEY
        try:
            # the cache still holds the old key: 401, refresh gets the stale one: 401 again -> 502
            keep(http.post(url, json=payload, headers=good))
        finally:
            proxy.backend.key = None
            proxy.upstream.key = UPSTREAM_KEY
        keep(http.post(url, json=payload, headers=good))  # 401 -> refresh -> works again
    statuses = [t for t in texts if t.startswith("{")]
    assert len(statuses) >= 8
    assert any('"upstream_rejected"' in t for t in texts) and any("***" in t for t in texts)
    logged = [caplog.text]
    for record in caplog.records:
        logged.append(record.getMessage())
        logged.append(repr(record.__dict__))
    secrets = [UPSTREAM_KEY, "stale-" + UPSTREAM_KEY, PROXY_KEY, OTHER_PROXY_KEY, OTHER_PROXY_KEY[:-1]]
    for secret in secrets:
        assert not [t for t in texts if secret in t], f"a response contains {secret[:6]}..."
        assert not [t for t in logged if secret in t], f"a log record contains {secret[:6]}..."
    assert any("answered 401" in t for t in logged)  # the rotation really happened
