"""ScoringService end to end over a real loopback upstream: translation both ways, retries honouring
Retry-After, upstream error mapping, timeouts, the score route, the usage counter, and admission
control (the FIFO queue per deployment, its limits and its Retry-After)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import orjson
import pytest
import stamina

from shared.adapters.endpoint_credentials import CredentialCache, EndpointCaller
from shared.adapters.http_client import HttpClient
from shared.errors import UpstreamError
from shared.usecases.scoring import (
    Gate,
    InvalidRequest,
    LiveModels,
    PayloadTooLarge,
    QueueRejected,
    ScoringService,
    StreamReply,
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
        upstream=EndpointCaller(HttpClient(), CredentialCache(backend.get_credentials, ttl_s=600)),
        usage=usage,
        retry_wait_initial_s=0.05,
    )
    return service, usage


def chat(service: ScoringService, **fields: Any) -> dict[str, Any]:
    body = orjson.dumps({"model": "phi3-chat", "messages": [{"role": "user", "content": "Hi"}], **fields})

    async def call() -> dict[str, Any]:
        reply = await service.chat(body, selector=None, request_id="rid0001")
        if isinstance(reply, StreamReply):
            try:
                return {"sse": b"".join([event async for event in reply]).decode()}
            finally:
                await reply.aclose()
        return orjson.loads(reply.body)

    return asyncio.run(call())


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


def test_stop_cuts_the_answer() -> None:
    """Stop sequences cut the answer, and the finish reason is `stop`."""
    with LoopbackUpstream(shape="indexed") as upstream:
        upstream.reply = lambda conv: "first part\n\nsecond part"
        service, _ = make_service(upstream)
        out = chat(service, stop=["\n\n"])
    assert [c["message"]["content"] for c in out["choices"]] == ["first part"]
    assert [c["finish_reason"] for c in out["choices"]] == ["stop"]


def test_answer_count_mismatch_is_an_upstream_error() -> None:
    """An image answering twice for one conversation is a 502, not a silent pick."""
    with LoopbackUpstream() as upstream:
        upstream.queue(200, [{"0": "one"}, {"0": "two"}])
        service, _ = make_service(upstream)
        with pytest.raises(UpstreamError, match="returned 2 answers for one conversation"):
            chat(service)


def test_streaming_reply_is_sse() -> None:
    """stream=true gives SSE events ending in [DONE] (an upstream that cannot stream: its text in pieces)."""
    with LoopbackUpstream() as upstream:
        service, _ = make_service(upstream)
        out = chat(service, stream=True)
    assert out["sse"].startswith("data: {") and out["sse"].endswith("data: [DONE]\n\n")
    assert '"content":"echo: Hi"' in out["sse"]
    assert "application/x-ndjson" in upstream.seen[0].headers["accept"]


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


def test_the_queue_is_fifo_and_its_limits_refuse_with_retry_after() -> None:
    """Capacity 1, queue of 2: the first call runs, two wait in line and get the slot in arrival order,
    the fourth is refused at once (queue_full); a waiter past its timeout is refused (queue_timeout);
    both 429s carry a Retry-After from the observed service time."""

    async def scenario() -> None:
        gate = Gate("ep/blue", 1, queue_max=2, clock=time.monotonic)
        order: list[int] = []

        async def call(i: int, wait_s: float = 5.0) -> None:
            taken = await gate.acquire(wait_s)
            order.append(i)
            await asyncio.sleep(0.05)
            gate.release(time.monotonic() - taken)

        first = asyncio.ensure_future(call(0))
        await asyncio.sleep(0)
        queued = [asyncio.ensure_future(call(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        assert (gate.in_flight, gate.queued) == (1, 2)
        with pytest.raises(QueueRejected) as full:
            await gate.acquire(5.0)
        assert full.value.code == "queue_full" and full.value.retry_after is not None and full.value.retry_after >= 1
        await asyncio.gather(first, *queued)
        assert order == [0, 1, 2] and (gate.in_flight, gate.queued) == (0, 0)
        assert gate.service_s < 1.0  # learned from the calls: about 0.05 s each

        await gate.acquire(1.0)  # held for longer than the next one may wait
        started = time.monotonic()
        with pytest.raises(QueueRejected) as late:
            await gate.acquire(0.1)
        assert late.value.code == "queue_timeout" and 0.09 <= time.monotonic() - started < 1.0
        gate.release(None)
        assert (gate.in_flight, gate.queued) == (0, 0)

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_the_queue_and_passes_its_slot_on() -> None:
    """A queued request whose client went away is dropped; the others keep their order and nothing leaks."""

    async def scenario() -> None:
        gate = Gate("ep/blue", 1, queue_max=8, clock=time.monotonic)
        await gate.acquire(1.0)
        waiters = [asyncio.ensure_future(gate.acquire(5.0)) for _ in range(3)]
        await asyncio.sleep(0)
        waiters[0].cancel()
        await asyncio.sleep(0)
        assert gate.queued == 2
        gate.release(0.01)
        await asyncio.sleep(0)
        assert waiters[1].done() and not waiters[2].done()
        waiters[1].cancel()  # too late to leave the line: it holds the slot, cancelling gives it on
        gate.release(0.01)
        await asyncio.sleep(0)
        assert waiters[2].done() and gate.in_flight == 1
        gate.release(0.01)
        assert (gate.in_flight, gate.queued) == (0, 0)

    asyncio.run(scenario())


def test_the_service_queues_calls_to_a_busy_deployment() -> None:
    """Through the service: 6 concurrent calls to a capacity-1 deployment all succeed, one at a time, in
    arrival order; with PROXY_QUEUE_MAX=1 the surplus gets 429 queue_full at once."""
    with LoopbackUpstream() as upstream:
        upstream.capacity = 1
        upstream.delay_s = 0.05
        service, _ = make_service(upstream)

        async def many(n: int) -> list[Any]:
            async def one(i: int) -> Any:
                body = orjson.dumps({"model": "phi3-chat", "messages": [{"role": "user", "content": str(i)}]})
                return await service.chat(body, selector=None, request_id=f"rid{i:04d}")

            return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)

        replies = asyncio.run(many(6))
        assert all(not isinstance(r, Exception) for r in replies)
        assert [s.headers["x-ms-client-request-id"] for s in upstream.seen] == [f"rid{i:04d}" for i in range(6)]
        assert upstream.refused == 0 and upstream.max_in_flight == 1

        small, _ = make_service(upstream, PROXY_QUEUE_MAX="1")
        service = small
        outcomes = asyncio.run(many(4))
        refused = [r for r in outcomes if isinstance(r, QueueRejected)]
        assert len(refused) == 2 and all(r.code == "queue_full" for r in refused)
        assert sum(not isinstance(r, Exception) for r in outcomes) == 2


class WordCounter:
    """A hand-written `TokenCounter` (shared.domain.validation): one token per word."""

    name = "words"
    note = "one token per word"
    template_failures = 0

    def count(self, roles: Any, contents: Any, assistant_slice: slice) -> tuple[int, int]:
        words = [len(c.split()) for c in contents]
        return sum(words), sum(words[assistant_slice])


@pytest.mark.parametrize(("max_tokens", "reason"), [(5, "length"), (6, "stop")])
def test_the_tokenizer_tells_length_when_the_upstream_does_not(max_tokens: int, reason: str) -> None:
    """An image that reports neither a finish reason nor usage: with the model's tokenizer known, an
    answer as long as max_tokens is `length`; without one it can only be `stop`."""
    with LoopbackUpstream(shape="indexed") as upstream:
        upstream.reply = lambda conv: "one two three four five"
        service, _ = make_service(upstream)
        assert chat(service, max_tokens=max_tokens)["choices"][0]["finish_reason"] == "stop"
        service.token_counter = WordCounter
        out = chat(service, max_tokens=max_tokens)
    assert out["choices"][0]["finish_reason"] == reason and "usage" not in out
