"""The proxy in front of a real local deployment: the tiny model's server process behind its endpoint
router, both as the local backend starts them, with the chat functions on the dev host and the official
`openai` client in front. Streaming is real (tokens leave as they are generated), `max_tokens` cut-offs
report `length` with real token counts, and callers that hang up free the deployment at once."""

from __future__ import annotations

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
from shared.bootstrap import AppContext, set_app_context
from tests.scoring_support import PROXY_KEY, MemoryLedger, live_record, proxy_settings
from tests.tiny_model import model_cache, wait_until
from tunegrid.devhost import DevHost
from tunegrid.local.standalone import StandaloneEndpoint

ENDPOINT = "ep-local-stream"
SERVER_TOKEN = "local-server-token-0123"
ENDPOINT_KEY = "local-endpoint-key-4567"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneEndpoint]:
    """The tiny model's deployment server (capacity 1) behind its endpoint router."""
    from tunegrid.local.base_models import prepare_tiny_phi3

    model = prepare_tiny_phi3(model_cache(tmp_path_factory))
    started = StandaloneEndpoint(
        model, tmp_path_factory.mktemp("endpoints"), name=ENDPOINT, key=ENDPOINT_KEY, token=SERVER_TOKEN
    )
    try:
        yield started.wait_ready()
    finally:
        started.stop()


@pytest.fixture(scope="module")
def base_url(deployment: StandaloneEndpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The chat functions on the dev host, wired to the local deployment through the app context."""
    ledger = MemoryLedger([live_record("run-local-1", model_name="tiny-chat", endpoint=ENDPOINT, deployment="blue")])
    settings = proxy_settings(PROXY_UPSTREAM_TIMEOUT_S="60")
    set_app_context(AppContext(settings, overrides={"ledger": ledger, "backend": deployment, "usage_table": None}))
    chat.set_scoring_service(None)
    app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
    app.register_functions(chat.bp)
    try:
        with DevHost(app, settings={}, port=0, state_dir=Path(tmp_path_factory.mktemp("devhost"))) as host:
            yield host.base_url + "/api/v1"
    finally:
        chat.set_scoring_service(None)
        set_app_context(None)


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=PROXY_KEY, max_retries=0, timeout=60)


def test_a_streamed_answer_arrives_in_pieces_as_the_model_generates(
    base_url: str, deployment: StandaloneEndpoint
) -> None:
    """Several content chunks, the first of them while the model is still generating (its server, capacity 1,
    still answers 429 to a direct call: an answer buffered anywhere on the way would arrive only after the
    model had finished); role first, finish reason last, real usage counts from the model's tokenizer."""
    stream = client(base_url).chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=400,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks: list[Any] = []
    server_at_first_piece = None
    for chunk in stream:
        chunks.append(chunk)
        if server_at_first_piece is None and chunk.choices and chunk.choices[0].delta.content:
            server_at_first_piece = deployment.server_status()
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(content) >= 10, f"only {len(content)} content chunks"
    assert server_at_first_piece == 429, f"the first piece came when the model was done ({server_at_first_piece})"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 400 and usage.prompt_tokens > 0


def test_max_tokens_cut_off_reports_length_with_real_counts(base_url: str) -> None:
    """A plain completion stopped by max_tokens says `length`, with the tokenizer's counts."""
    completion = client(base_url).chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0
    )
    assert completion.choices[0].finish_reason == "length" and completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5


def test_callers_that_hang_up_free_the_deployment(base_url: str, deployment: StandaloneEndpoint) -> None:
    """Five streamed max_tokens=2048 calls whose clients hang up at once: the one generating is
    stopped and the queued ones are dropped, so the deployment is free again right away and the next
    caller is served (before, it got 429)."""
    body = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "Go on forever."}],
        "max_tokens": 2048,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {PROXY_KEY}"}
    firsts: list[bytes] = []

    def hang_up_soon() -> None:
        try:
            with httpx.stream(
                "POST", base_url + "/chat/completions", json=body, headers=headers, timeout=httpx.Timeout(1.0)
            ) as reply:
                for line in reply.iter_lines():
                    firsts.append(line.encode())
                    break
                time.sleep(0.3)
        except httpx.TimeoutException:
            pass  # still queued behind the first: hanging up now

    clients = [threading.Thread(target=hang_up_soon) for _ in range(5)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(30)
    assert firsts and firsts[0].startswith(b"data: ")  # one of them was being answered
    gone = time.monotonic()
    assert wait_until(
        lambda: deployment.server_status() == 200, timeout_s=1.5, interval_s=0.05, what="a free deployment"
    )
    freed_after = time.monotonic() - gone
    completion = client(base_url).chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert completion.choices[0].finish_reason == "length" and freed_after < 1.5
