"""ScoringService end to end over a real loopback upstream: translation both ways, retries honouring
Retry-After, upstream error mapping, timeouts, the score route and the usage counter."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import orjson
import pytest
import stamina
from shared.adapters.upstream import HttpPool

from shared.adapters.endpoint_credentials import CredentialCache, EndpointCaller
from shared.errors import UpstreamError
from shared.usecases.scoring import (
    InvalidRequest,
    LiveModels,
    PayloadTooLarge,
    ScoringService,
    UpstreamBusy,
    UpstreamRejected,
)
from tests.scoring_support import CredentialsBackend, LoopbackUpstream, MemoryLedger, live_record, proxy_settings


class CountingUsage:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def record(self, endpoint: str) -> None:
        self.counts[endpoint] += 1


def make_service(upstream: LoopbackUpstream, **settings: str) -> tuple[ScoringService, CountingUsage]:
    backend = CredentialsBackend(upstream)
    usage = CountingUsage()
    service = ScoringService(
        settings=proxy_settings(**settings),
        models=LiveModels(
            MemoryLedger([live_record("r1", model_name="phi3-chat", version="4", endpoint="ep-one")]).list
        ),
        upstream=EndpointCaller(HttpPool(), CredentialCache(backend.get_credentials, ttl_s=600)),
        usage=usage,
        retry_wait_initial_s=0.05,
    )
    return service, usage


def chat(service: ScoringService, **fields: Any) -> dict[str, Any]:
    body = orjson.dumps({"model": "phi3-chat", "messages": [{"role": "user", "content": "Hi"}], **fields})
    reply = asyncio.run(service.chat(body, selector=None, request_id="rid0001"))
    if reply.content_type == "text/event-stream":
        return {"sse": reply.body.decode()}
    return orjson.loads(reply.body)


@pytest.mark.parametrize("shape", ["output", "indexed", "strings", "choices", "generated_text", "predictions"])
def test_chat_completion_from_every_answer_shape(shape: str) -> None:
    """Whatever shape the image answers in, the caller gets a proper chat.completion."""
    with LoopbackUpstream(shape=shape) as upstream:
        service, usage = make_service(upstream)
        out = chat(service, temperature=0.6, max_tokens=50)
    assert out["id"] == "chatcmpl-rid0001" and out["object"] == "chat.completion"
    assert out["model"] == "phi3-chat" and out["system_fingerprint"] == "r1" and isinstance(out["created"], int)
    assert out["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "echo: Hi"}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert ("usage" in out) is (shape == "choices")
    assert usage.counts == {"ep-one": 1}
    sent = upstream.seen[0].body
    assert sent == {
        "input_data": {
            "input_string": [[{"role": "user", "content": "Hi"}]],
            "parameters": {"max_new_tokens": 50, "do_sample": True, "temperature": 0.6, "top_p": 1.0},
        },
        "params": {},
    }


def test_n_choices_and_stop() -> None:
    """n=2 gives two choices from one upstream call; stop sequences cut each answer."""
    with LoopbackUpstream(shape="indexed") as upstream:
        upstream.reply = lambda conv: "first part\n\nsecond part"
        service, _ = make_service(upstream)
        out = chat(service, n=2, stop=["\n\n"])
    assert [c["message"]["content"] for c in out["choices"]] == ["first part", "first part"]
    assert [c["finish_reason"] for c in out["choices"]] == ["stop", "stop"]
    assert len(upstream.seen) == 1 and len(upstream.seen[0].body["input_data"]["input_string"]) == 2


def test_answer_count_mismatch_is_an_upstream_error() -> None:
    """An image answering once for n conversations is a 502, not silently fewer choices."""
    with LoopbackUpstream() as upstream:
        upstream.queue(200, [{"0": "only one"}])
        service, _ = make_service(upstream)
        with pytest.raises(UpstreamError, match="returned 1 answers for 3 conversations"):
            chat(service, n=3)


def test_streaming_reply_is_sse() -> None:
    """stream=true gives one SSE body ending in [DONE]."""
    with LoopbackUpstream() as upstream:
        service, _ = make_service(upstream)
        out = chat(service, stream=True)
    assert out["sse"].startswith("data: {") and out["sse"].endswith("data: [DONE]\n\n")
    assert '"content":"echo: Hi"' in out["sse"]


@pytest.mark.parametrize(
    ("script", "requests"),
    [
        ([(429, {"Retry-After": "0.3"})], 2),
        ([(503, {})], 2),
        ([(503, {}), (429, {"retry-after-ms": "100"})], 3),
    ],
)
def test_429_and_503_are_retried_honouring_retry_after(script: list[tuple[int, dict[str, str]]], requests: int) -> None:
    """Throttling answers are retried with backoff (Retry-After when given) until one succeeds."""
    with LoopbackUpstream() as upstream:
        for status, headers in script:
            upstream.queue(status, {"error": "busy"}, headers=headers)
        service, _ = make_service(upstream)
        started = time.monotonic()
        out = chat(service)
        elapsed = time.monotonic() - started
    assert out["choices"][0]["message"]["content"] == "echo: Hi"
    assert len(upstream.seen) == requests
    if "Retry-After" in script[0][1]:
        assert elapsed >= 0.3


def test_persistent_429_is_passed_on() -> None:
    """Still throttled after the bounded retries: UpstreamBusy (429) with the endpoint's Retry-After."""
    with stamina.set_testing(True, attempts=3), LoopbackUpstream() as upstream:
        for _ in range(5):
            upstream.queue(429, {"error": "busy"}, headers={"Retry-After": "1"})
        service, _ = make_service(upstream)
        with pytest.raises(UpstreamBusy) as err:
            chat(service)
    assert err.value.retry_after == 1.0 and err.value.status == 429
    assert len(upstream.seen) == 3


def test_retry_after_longer_than_allowed_is_not_waited_for() -> None:
    """A Retry-After beyond the retry budget is returned at once instead of holding the request."""
    with LoopbackUpstream() as upstream:
        upstream.queue(429, {"error": "busy"}, headers={"Retry-After": "120"})
        service, _ = make_service(upstream)
        started = time.monotonic()
        with pytest.raises(UpstreamBusy):
            chat(service)
    assert time.monotonic() - started < 2 and len(upstream.seen) == 1


@pytest.mark.parametrize(
    ("status", "error", "message"),
    [
        (500, UpstreamError, "answered HTTP 500"),
        (404, UpstreamError, "answered HTTP 404"),
        (403, UpstreamError, "refused the proxy's credentials"),
        (400, UpstreamRejected, "rejected the request \\(HTTP 400\\)"),
        (422, UpstreamRejected, "rejected the request \\(HTTP 422\\)"),
    ],
)
def test_upstream_errors_are_mapped(status: int, error: type[Exception], message: str) -> None:
    """Server errors become UpstreamError (502), client errors UpstreamRejected (400); no retry."""
    with LoopbackUpstream() as upstream:
        upstream.queue(status, {"error": "nope"})
        service, _ = make_service(upstream)
        with pytest.raises(error, match=message):
            chat(service)
    assert len(upstream.seen) == 1


def test_invalid_json_answer_is_an_upstream_error() -> None:
    """A 200 with a body that is not JSON is a 502."""
    with LoopbackUpstream() as upstream:
        upstream.queue(200, b"<html>oops</html>")
        service, _ = make_service(upstream)
        with pytest.raises(UpstreamError, match="invalid JSON"):
            chat(service)


def test_slow_upstream_times_out() -> None:
    """An upstream slower than PROXY_UPSTREAM_TIMEOUT_S gives a timeout UpstreamError (504)."""
    with LoopbackUpstream() as upstream:
        upstream.queue(200, [{"0": "late"}], delay_s=2.0)
        service, _ = make_service(upstream, PROXY_UPSTREAM_TIMEOUT_S="1")
        started = time.monotonic()
        with pytest.raises(UpstreamError) as err:
            chat(service)
    assert err.value.timeout and time.monotonic() - started < 1.8


@pytest.mark.parametrize(
    "input_string",
    [[{"role": "user", "content": "Hi"}], [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]]],
)
def test_score_route_passes_through_and_normalises(input_string: list[Any]) -> None:
    """/api/score sends the body in the form it came in and answers {output: [...], model, run_id}."""
    with LoopbackUpstream(shape="output") as upstream:
        service, usage = make_service(upstream)
        body = orjson.dumps(
            {
                "input_data": {
                    "input_string": input_string,
                    "parameters": {"temperature": 0.6, "max_new_tokens": 99999},
                },
                "params": {},
            }
        )
        reply = asyncio.run(service.score(body, selector="r1", request_id="rid0002"))
    out = orjson.loads(reply.body)
    expected = ["echo: Hi"] if len(input_string) == 1 or isinstance(input_string[0], dict) else ["echo: Hi", "echo: Yo"]
    assert out == {
        "output": expected,
        "model": "phi3-chat",
        "model_version": "4",
        "run_id": "r1",
        "request_id": "rid0002",
    }
    assert upstream.seen[0].body["input_data"]["input_string"] == input_string
    assert upstream.seen[0].body["input_data"]["parameters"]["max_new_tokens"] == 2048
    assert usage.counts == {"ep-one": 1}


@pytest.mark.parametrize("body", [b"", b"{not json", b"[1, 2]"])
def test_bad_bodies_are_invalid_requests(body: bytes) -> None:
    """Empty, malformed or non-object bodies are 400s before any upstream call."""
    with LoopbackUpstream() as upstream:
        service, usage = make_service(upstream)
        with pytest.raises(InvalidRequest):
            asyncio.run(service.chat(body, selector=None, request_id="r"))
    assert upstream.seen == [] and not usage.counts


def test_body_size_limit() -> None:
    """A body over PROXY_MAX_BODY_BYTES (or declaring to be) is refused before parsing."""
    with LoopbackUpstream() as upstream:
        service, _ = make_service(upstream, PROXY_MAX_BODY_BYTES="100")
        service.check_size("100", b"x" * 100)
        with pytest.raises(PayloadTooLarge):
            service.check_size(None, b"x" * 101)
        with pytest.raises(PayloadTooLarge):
            service.check_size("5000", b"")
