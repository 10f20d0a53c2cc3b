"""`ScoringService`: the per-process use case behind the chat, score and models functions."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import stamina

from shared.errors import UpstreamError
from shared.ports import Upstream, UpstreamReply, UsageSink
from shared.usecases.scoring.auth import ApiKeys
from shared.usecases.scoring.chat_request import DEFAULT_MAX_TOKENS, parse_chat_request, to_azureml_request
from shared.usecases.scoring.errors import InvalidRequest, PayloadTooLarge, UpstreamBusy, UpstreamRejected
from shared.usecases.scoring.live_models import DEFAULT_ALIASES, LiveModel, LiveModels
from shared.usecases.scoring.output import ModelOutput, apply_stop, normalise_output
from shared.usecases.scoring.render import render_completion, render_stream
from shared.usecases.scoring.score_request import parse_score_request

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({429, 503})
REJECTED_STATUS = frozenset({400, 413, 422})


@dataclass(slots=True)
class Reply:
    """A finished answer: serialized body and its media type."""

    body: bytes
    content_type: str = "application/json"


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
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    retry_attempts: int = 3
    retry_wait_initial_s: float = 0.5
    retry_wait_max_s: float = 10.0
    clock: Callable[[], float] = time.time
    keys: ApiKeys = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.keys = ApiKeys(self.settings.proxy_api_keys)
        self._max_body = self.settings.proxy_max_body_bytes
        self._cap = self.settings.proxy_max_tokens_cap
        self._timeout = float(self.settings.proxy_upstream_timeout_s)

    # --- request gates
    def authorize(self, authorization: str | None, functions_key: str | None) -> None:
        self.keys.check(authorization, functions_key)

    def check_size(self, declared_length: str | None, body: bytes) -> None:
        if len(body) > self._max_body:
            raise PayloadTooLarge(f"the request body is {len(body)} bytes; the limit is {self._max_body}")
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

    # --- upstream
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

    async def _call(self, model: LiveModel, payload: bytes, request_id: str) -> UpstreamReply:
        deadline = time.monotonic() + self._timeout
        reply = await self.upstream.post_json(
            model.endpoint, model.deployment, payload, request_id=request_id, timeout_s=self._timeout
        )
        self.usage.record(model.endpoint)
        if reply.status in RETRYABLE_STATUS and self.retry_attempts > 1:
            reply = await self._retry(model, payload, request_id, deadline, reply)
        if 200 <= reply.status < 300:
            return reply
        self._raise_for(reply, model, request_id)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _retry(
        self, model: LiveModel, payload: bytes, request_id: str, deadline: float, first: UpstreamReply
    ) -> UpstreamReply:
        pending = [first]
        try:
            async for attempt in stamina.retry_context(
                on=self._backoff(deadline),
                attempts=self.retry_attempts,
                timeout=max(0.0, deadline - time.monotonic()),
                wait_initial=self.retry_wait_initial_s,
                wait_max=self.retry_wait_max_s,
            ):
                with attempt:
                    if pending:
                        reply = pending.pop()
                    else:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise UpstreamError("no time left to retry", timeout=True)
                        reply = await self.upstream.post_json(
                            model.endpoint, model.deployment, payload, request_id=request_id, timeout_s=left
                        )
                    if reply.status in RETRYABLE_STATUS:
                        raise _RetryableReply(reply)
                    return reply
        except _RetryableReply as exc:
            return exc.reply
        raise AssertionError("unreachable")  # pragma: no cover

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

    # --- use cases
    async def chat(self, body: bytes, *, selector: str | None, request_id: str) -> Reply:
        chat = parse_chat_request(
            self._decode(body), max_tokens_cap=self._cap, default_max_tokens=self.default_max_tokens
        )
        wanted = _pick(chat.model, selector)
        model = self.models.cached(wanted) or await self.models.resolve(wanted)
        reply = await self._call(model, orjson.dumps(to_azureml_request(chat)), request_id)
        output = self._answer(reply)
        if len(output.texts) != chat.n:
            raise UpstreamError(f"the model endpoint returned {len(output.texts)} answers for {chat.n} conversations")
        choices = []
        for i, text in enumerate(output.texts):
            text, stopped = apply_stop(text, chat.stop)
            reason = "stop" if stopped else (output.finish_reasons[i] or "stop")
            choices.append((text, reason))
        if (
            output.usage is not None
            and chat.n == 1
            and output.finish_reasons[0] is None
            and output.usage["completion_tokens"] >= chat.max_new_tokens
        ):
            choices[0] = (choices[0][0], "length")
        completion_id = f"chatcmpl-{request_id}"
        created = int(self.clock())
        if chat.stream:
            return Reply(
                render_stream(completion_id, created, model, choices, output.usage, include_usage=chat.include_usage),
                "text/event-stream",
            )
        return Reply(orjson.dumps(render_completion(completion_id, created, model, choices, output.usage)))

    async def score(self, body: bytes, *, selector: str | None, request_id: str) -> Reply:
        request = parse_score_request(
            self._decode(body), max_tokens_cap=self._cap, default_max_tokens=self.default_max_tokens
        )
        wanted = _pick(request.model, selector)
        model = self.models.cached(wanted) or await self.models.resolve(wanted)
        reply = await self._call(model, orjson.dumps(request.body), request_id)
        output = self._answer(reply)
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
        close = getattr(self.upstream, "close", None)
        if close is not None:
            close()

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


def _pick(body_model: str | None, selector: str | None) -> str | None:
    """The body's `model` wins; a default alias there lets the query or header choose."""
    if body_model and body_model.strip().lower() not in DEFAULT_ALIASES:
        return body_model
    return selector
