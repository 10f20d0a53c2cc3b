"""`ScoringService`: the per-process use case behind the chat, score and models functions.

Every call to a deployment waits its turn first (`admission`: the deployment's capacity in flight from
this process, the rest queued FIFO), is retried on 429/503 within the same budget as the queue, and
holds its slot until its answer has been read or streamed to the end, or its caller went away.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import stamina

from shared.errors import UpstreamError
from shared.ports import Upstream, UpstreamAnswer, UpstreamReply, UsageSink
from shared.usecases.scoring.admission import Admission
from shared.usecases.scoring.auth import ApiKeys
from shared.usecases.scoring.chat_request import ChatRequest, parse_chat_request, to_azureml_request
from shared.usecases.scoring.errors import InvalidRequest, PayloadTooLarge, UpstreamBusy, UpstreamRejected
from shared.usecases.scoring.live_models import DEFAULT_ALIASES, LiveModel, LiveModels
from shared.usecases.scoring.output import (
    ModelOutput,
    StopScanner,
    apply_stop,
    normalise_output,
    parse_stream_event,
    split_for_stream,
)
from shared.usecases.scoring.render import DONE, ChunkRenderer, render_completion, sse
from shared.usecases.scoring.score_request import parse_score_request

if TYPE_CHECKING:
    from shared.domain.validation import TokenCounter
    from shared.settings import Settings

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({429, 503})
REJECTED_STATUS = frozenset({400, 413, 422})


@dataclass(slots=True)
class Reply:
    """A finished answer: serialized body and its media type."""

    body: bytes
    content_type: str = "application/json"


class StreamReply:
    """An answer sent as server-sent events while the deployment generates it.

    Iterate it once; always `aclose()` it (iterated or not): that closes the upstream call, which stops
    the generation, and gives the deployment's slot to the next request in line.
    """

    content_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], resources: contextlib.AsyncExitStack) -> None:
        self._events = events
        self._resources = resources

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events

    async def aclose(self) -> None:
        try:
            await self._events.aclose()
        finally:
            await self._resources.aclose()


class _RetryableReply(Exception):
    def __init__(self, reply: UpstreamReply) -> None:
        super().__init__(f"upstream answered {reply.status}")
        self.reply = reply


@dataclass
class ScoringService:
    """Per-process scoring use case. Built once (see `shared.bootstrap.build_scoring_service`)."""

    settings: Settings
    models: LiveModels
    upstream: Upstream
    usage: UsageSink
    retry_attempts: int = 5
    retry_wait_initial_s: float = 0.5
    retry_wait_max_s: float = 10.0
    clock: Callable[[], float] = time.time
    token_counter: Callable[[], TokenCounter | None] | None = None
    """The deployed model's tokenizer (VALIDATION_TOKENIZER: the base model's, which fine-tuning keeps),
    to tell `length` from `stop` when an upstream reports neither a finish reason nor token counts."""
    keys: ApiKeys = field(init=False, repr=False)
    admission: Admission = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.keys = ApiKeys(self.settings.proxy_api_keys)
        self._max_body = self.settings.proxy_max_body_bytes
        self._cap = self.settings.proxy_max_tokens_cap
        self._default_tokens = self.settings.proxy_default_max_tokens
        self._timeout = float(self.settings.proxy_upstream_timeout_s)
        self._queue_timeout = float(self.settings.proxy_queue_timeout_s)
        self.admission = Admission(queue_max=self.settings.proxy_queue_max, queue_timeout_s=self._queue_timeout)

    # --- request gates
    def authorize(self, authorization: str | None, functions_key: str | None) -> None:
        self.keys.check(authorization, functions_key)

    @property
    def max_body_bytes(self) -> int:
        return self._max_body

    def check_size(self, declared_length: str | None, body: bytes) -> None:
        if len(body) > self._max_body:
            raise PayloadTooLarge(f"the request body is over {self._max_body} bytes, the limit")
        if declared_length and declared_length.isdigit() and int(declared_length) > self._max_body:
            raise PayloadTooLarge(f"the request body is {declared_length} bytes; the limit is {self._max_body}")

    def _decode(self, body: bytes) -> Any:
        if not body:
            raise InvalidRequest("the request body is empty; send a JSON object", code="invalid_body")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(
                f"the request body is not valid JSON ({exc.msg} at position {exc.pos})", code="invalid_json"
            ) from None

    async def _model(self, body_model: str | None, selector: str | None) -> LiveModel:
        wanted = _pick(body_model, selector)
        return self.models.cached(wanted) or await self.models.resolve(wanted)

    # --- admission and upstream calls
    async def _admit(self, resources: contextlib.AsyncExitStack, model: LiveModel, arrived: float) -> None:
        """Wait for a slot of the model's deployment; the slot is given back when `resources` closes."""
        gate = self.admission.gate(f"{model.endpoint}/{model.deployment}", model.capacity)
        taken = await gate.acquire(arrived + self._queue_timeout - time.monotonic())
        resources.callback(lambda: gate.release(time.monotonic() - taken))

    def _backoff(self, deadline: float) -> Callable[[Exception], bool | float]:
        def hook(exc: Exception) -> bool | float:
            if not isinstance(exc, _RetryableReply):
                return False
            left = deadline - time.monotonic()
            wait = exc.reply.retry_after
            if wait is None:
                return left > self.retry_wait_initial_s
            if wait > self.retry_wait_max_s or wait >= left:
                return False  # the endpoint asks for longer than we may wait: give its answer back
            return wait

        return hook

    async def _retrying(
        self, once: Callable[[], Awaitable[UpstreamReply | UpstreamAnswer]], retry_deadline: float
    ) -> UpstreamReply | UpstreamAnswer:
        """`once()` again while it answers 429/503, honouring Retry-After, until `retry_deadline`."""
        first = await once()
        if first.status not in RETRYABLE_STATUS or self.retry_attempts <= 1:
            return first
        pending = [first]
        try:
            async for attempt in stamina.retry_context(
                on=self._backoff(retry_deadline),
                attempts=self.retry_attempts,
                timeout=max(0.0, retry_deadline - time.monotonic()),
                wait_initial=self.retry_wait_initial_s,
                wait_max=self.retry_wait_max_s,
            ):
                with attempt:
                    result = pending.pop() if pending else await once()
                    if result.status in RETRYABLE_STATUS:
                        assert isinstance(result, UpstreamReply)  # non-2xx answers always come read
                        raise _RetryableReply(result)
                    return result
        except _RetryableReply as exc:
            return exc.reply
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call(self, model: LiveModel, payload: bytes, request_id: str, arrived: float) -> UpstreamReply:
        """A one-piece call: slot, POST (retried on 429/503), the answer read, slot given back."""
        deadline = arrived + self._timeout
        async with contextlib.AsyncExitStack() as resources:
            await self._admit(resources, model, arrived)

            async def once() -> UpstreamReply:
                return await self.upstream.post_json(
                    model.endpoint,
                    model.deployment,
                    payload,
                    request_id=request_id,
                    timeout_s=_left(deadline),
                )

            reply = await self._retrying(once, min(deadline, arrived + self._queue_timeout))
        self.usage.record(model.endpoint)
        assert isinstance(reply, UpstreamReply)
        if not 200 <= reply.status < 300:
            self._raise_for(reply, model, request_id)
        return reply

    async def _open_stream(
        self, resources: contextlib.AsyncExitStack, model: LiveModel, payload: bytes, request_id: str, arrived: float
    ) -> UpstreamReply | UpstreamAnswer:
        """A streamed call: the open answer (kept open in `resources`), or the whole reply when the
        upstream answered in one piece or with an error."""
        deadline = arrived + self._timeout

        async def once() -> UpstreamReply | UpstreamAnswer:
            attempt = contextlib.AsyncExitStack()
            await resources.enter_async_context(attempt)
            answer = await attempt.enter_async_context(
                self.upstream.open_stream(
                    model.endpoint, model.deployment, payload, request_id=request_id, timeout_s=_left(deadline)
                )
            )
            if answer.streamed:
                return answer
            try:
                return UpstreamReply(answer.status, await answer.read(), answer.retry_after, answer.content_type)
            finally:
                await attempt.aclose()

        result = await self._retrying(once, min(deadline, arrived + self._queue_timeout))
        self.usage.record(model.endpoint)
        if isinstance(result, UpstreamReply) and not 200 <= result.status < 300:
            self._raise_for(result, model, request_id)
        return result

    def _raise_for(self, reply: UpstreamReply, model: LiveModel, request_id: str) -> None:
        snippet = reply.body[:300].decode("utf-8", "replace")
        extra = {"endpoint": model.endpoint, "run_id": model.run_id, "request_id": request_id, "status": reply.status}
        log.warning("endpoint %s answered HTTP %d: %s", model.endpoint, reply.status, snippet, extra=extra)
        if reply.status in REJECTED_STATUS:
            raise UpstreamRejected(
                f"the model endpoint rejected the request (HTTP {reply.status}): {snippet}", status=reply.status
            )
        if reply.status == 429:
            raise UpstreamBusy("the model endpoint is busy (HTTP 429); retry later", retry_after=reply.retry_after)
        if reply.status in (401, 403):
            raise UpstreamError(
                f"the model endpoint refused the proxy's credentials (HTTP {reply.status})", status=reply.status
            )
        raise UpstreamError(f"the model endpoint answered HTTP {reply.status}", status=reply.status)

    @staticmethod
    def _answer(reply: UpstreamReply) -> ModelOutput:
        try:
            payload = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            raise UpstreamError("the model endpoint answered with invalid JSON") from None
        return normalise_output(payload)

    def _single(self, output: ModelOutput, chat: ChatRequest) -> tuple[str, str, dict[str, int] | None]:
        """The one answer of a chat call with its finish reason (see docs/scoring.md for the rule)."""
        if len(output.texts) != 1:
            raise UpstreamError(f"the model endpoint returned {len(output.texts)} answers for one conversation")
        text, stopped = apply_stop(output.texts[0], chat.stop)
        reason = _finish_reason(stopped, output.finish_reasons[0], output.usage, chat)
        if not stopped and output.finish_reasons[0] is None and output.usage is None:
            # the upstream says neither why it stopped nor how much it generated: count, if we can
            counted = self._count_tokens(output.texts[0])
            if counted is not None and counted >= chat.max_new_tokens:
                reason = "length"
        return text, reason, output.usage

    def _count_tokens(self, text: str) -> int | None:
        """Tokens of a generated text with the model's tokenizer, when one is configured (else None)."""
        if self.token_counter is None:
            return None
        counter = self.token_counter()
        if counter is None:
            return None
        return counter.count(("assistant",), (text,), slice(0, 1))[1]

    # --- use cases
    async def chat(self, body: bytes, *, selector: str | None, request_id: str) -> Reply | StreamReply:
        """A chat completion. The upstream is always asked to stream (an upstream that cannot answers in
        one piece), so a caller that goes away stops the generation whether or not it asked to stream."""
        arrived = time.monotonic()
        chat = parse_chat_request(self._decode(body), max_tokens_cap=self._cap, default_max_tokens=self._default_tokens)
        model = await self._model(chat.model, selector)
        payload = orjson.dumps(to_azureml_request(chat))
        completion_id = f"chatcmpl-{request_id}"
        created = int(self.clock())
        resources = contextlib.AsyncExitStack()
        try:
            await self._admit(resources, model, arrived)
            answer = await self._open_stream(resources, model, payload, request_id, arrived)
            if not chat.stream:
                async with resources:
                    text, reason, usage = await self._collect(chat, answer)
                completion = render_completion(completion_id, created, model, text, reason, usage)
                return Reply(orjson.dumps(completion))
        except BaseException:
            await resources.aclose()
            raise
        renderer = ChunkRenderer(completion_id, created, model, include_usage=chat.include_usage)
        return StreamReply(self._events(chat, answer, renderer, request_id), resources)

    async def _pieces(
        self, chat: ChatRequest, answer: UpstreamReply | UpstreamAnswer
    ) -> AsyncGenerator[str | tuple[str, dict[str, int] | None], None]:
        """The answer's text pieces as they arrive (stop sequences applied), then (finish reason, usage)."""
        if isinstance(answer, UpstreamReply):  # the upstream cannot stream: its answer, cut in pieces
            text, reason, usage = self._single(self._answer(answer), chat)
            for piece in split_for_stream(text):
                yield piece
            yield reason, usage
            return
        scanner = StopScanner(chat.stop)
        reported: str | None = None
        usage = None
        ended = False
        async for line in answer.lines():
            event = parse_stream_event(line)
            if event.delta:
                text = scanner.feed(event.delta)
                if text:
                    yield text
                if scanner.stopped:
                    break  # the rest is not wanted: leaving closes the call, the deployment stops generating
            if event.finish_reason is not None:
                reported, usage, ended = event.finish_reason, event.usage, True
                break
        if not ended and not scanner.stopped:
            raise UpstreamError("the model endpoint's stream ended before its finish reason")
        tail = scanner.flush()
        if tail:
            yield tail
        yield _finish_reason(scanner.stopped, reported, usage, chat), usage

    async def _collect(
        self, chat: ChatRequest, answer: UpstreamReply | UpstreamAnswer
    ) -> tuple[str, str, dict[str, int] | None]:
        if isinstance(answer, UpstreamReply):  # answered in one piece: nothing to cut and join again
            return self._single(self._answer(answer), chat)
        texts: list[str] = []
        reason, usage = "stop", None
        async for piece in self._pieces(chat, answer):
            if isinstance(piece, str):
                texts.append(piece)
            else:
                reason, usage = piece
        return "".join(texts), reason, usage

    async def _events(
        self, chat: ChatRequest, answer: UpstreamReply | UpstreamAnswer, out: ChunkRenderer, request_id: str
    ) -> AsyncGenerator[bytes, None]:
        """The SSE events of one streamed answer, each sent as soon as the upstream's piece arrives."""
        yield out.role()
        reason, usage = "stop", None
        try:
            async for piece in self._pieces(chat, answer):
                if isinstance(piece, str):
                    yield out.content(piece)
                else:
                    reason, usage = piece
        except UpstreamError as exc:
            log.warning(
                "scoring request %s: the stream broke off: %s", request_id, exc, extra={"request_id": request_id}
            )
            error = {"message": str(exc), "type": "upstream_error", "param": None, "code": "upstream_error"}
            yield sse({"error": {**error, "request_id": request_id}})
            return
        yield out.finish(reason)
        if out.include_usage:
            yield out.usage(usage)
        yield DONE

    async def score(self, body: bytes, *, selector: str | None, request_id: str) -> Reply:
        arrived = time.monotonic()
        request = parse_score_request(
            self._decode(body), max_tokens_cap=self._cap, default_max_tokens=self._default_tokens
        )
        model = await self._model(request.model, selector)
        output = self._answer(await self._call(model, orjson.dumps(request.body), request_id, arrived))
        answer: dict[str, Any] = {
            "output": output.texts,
            "model": model.model_name,
            "model_version": model.model_version,
            "run_id": model.run_id,
            "request_id": request_id,
        }
        if output.usage is not None:
            answer["usage"] = output.usage
        return Reply(orjson.dumps(answer))

    async def aclose(self) -> None:
        """Shutdown: write pending usage counts and close pooled connections (the host's stop hook)."""
        flush = getattr(self.usage, "flush", None)
        if flush is not None:
            await flush()
        close = getattr(self.upstream, "aclose", None)
        if close is not None:
            await close()

    async def list_models(self) -> Reply:
        data = []
        named: set[str] = set()
        for m in await self.models.listing():
            model_id = m.model_name if m.model_name not in named else f"{m.model_name}:{m.model_version}"
            named.add(m.model_name)
            data.append(
                {
                    "id": model_id,
                    "object": "model",
                    "created": m.created,
                    "owned_by": "tunegrid",
                    "run_id": m.run_id,
                    "version": m.model_version,
                }
            )
        return Reply(orjson.dumps({"object": "list", "data": data}))


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise UpstreamError("no time left for the model endpoint to answer", timeout=True)
    return left


def _finish_reason(stopped: bool, reported: str | None, usage: dict[str, int] | None, chat: ChatRequest) -> str:
    """`stop` when the proxy cut at a stop sequence; else the upstream's own reason; else `length` when
    its reported completion tokens reached max_tokens; else `stop`."""
    if stopped:
        return "stop"
    if reported is not None:
        return reported
    if usage is not None and usage["completion_tokens"] >= chat.max_new_tokens:
        return "length"
    return "stop"


def _pick(body_model: str | None, selector: str | None) -> str | None:
    """The body's `model` wins; a default alias there lets the query or header choose."""
    if body_model and body_model.strip().lower() not in DEFAULT_ALIASES:
        return body_model
    return selector
