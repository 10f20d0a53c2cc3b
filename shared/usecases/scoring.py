"""The scoring proxy's use case: authorise, validate, pick the live model, translate OpenAI <-> Azure ML,
call the endpoint through the `Upstream` port, normalise the answer.

The HTTP functions (`functions/chat.py`) only turn a request into bytes and header values, call
`ScoringService` and map its errors to status codes. Everything here is per process: the service is
built once and serves every invocation (settings, key digests, the live-model table, retries).

Translation (OpenAI chat request -> Azure ML scoring request), as documented in docs/scoring.md:

| OpenAI field | accepted | Azure ML `input_data` |
|---|---|---|
| messages | roles system/developer/user/assistant, text content | `input_string`: `[messages] * n` |
| temperature | 0..2, default 1 | `parameters.temperature`, `do_sample = temperature > 0` |
| top_p | (0, 1], default 1 | `parameters.top_p` (sampling only) |
| max_tokens / max_completion_tokens | int >= 1, default 256 | `parameters.max_new_tokens`, capped |
| stop | string or up to 4 strings | `parameters.stop`; the proxy also cuts the answer there |
| n | 1..16 | n conversations in one request |
| seed | integer | `parameters.seed` |
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
import stamina

from shared.domain.clock import parse_time
from shared.domain.keys import KeySet
from shared.errors import InvalidInput, NotFound, TransientError, TunegridError, UpstreamError
from shared.ports import Upstream, UpstreamReply, UsageSink

if TYPE_CHECKING:
    from shared.domain.runs import RunRecord
    from shared.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
"""max_new_tokens sent when the caller gives none (always further capped by PROXY_MAX_TOKENS_CAP)."""
MAX_N = 16
MAX_STOP = 4
MAX_MESSAGES = 1024
RETRYABLE_STATUS = frozenset({429, 503})
REJECTED_STATUS = frozenset({400, 413, 422})
DEFAULT_ALIASES = frozenset({"", "default", "latest"})

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED_FIELDS = {
    "tools": "tool calling is not supported by the deployed model",
    "functions": "function calling is not supported by the deployed model",
    "tool_choice": "tool calling is not supported by the deployed model",
    "function_call": "function calling is not supported by the deployed model",
    "logit_bias": "logit_bias is not supported by the Azure ML scoring schema",
    "top_logprobs": "logprobs are not supported by the Azure ML scoring schema",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
}
"""Fields we cannot honour. Refused with 400 rather than silently ignored, unless given a neutral value."""
NEUTRAL_VALUES: Mapping[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "top_logprobs": (None, 0),
    "audio": (None,),
    "prediction": (None,),
}


# ---------------------------------------------------------------------------------------------- errors


class InvalidRequest(InvalidInput):
    """A request we refuse with 400; `param` names the offending field (OpenAI's error.param)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class PayloadTooLarge(InvalidInput):
    """The body is larger than PROXY_MAX_BODY_BYTES (413)."""


class Unauthorized(TunegridError):
    """Missing or wrong API key (401). The message never repeats what was sent."""


class ModelNotFound(NotFound):
    """The requested model or run is not live (404)."""


class NoLiveModel(TransientError):
    """Nothing is deployed yet, or the ledger cannot be read (503)."""


class UpstreamRejected(UpstreamError):
    """The endpoint refused the translated request as invalid (mapped to 400: the caller can fix it)."""


class UpstreamBusy(UpstreamError):
    """The endpoint still answered 429 after the retries (passed on as 429 with its Retry-After)."""

    def __init__(self, message: str, *, retry_after: float | None) -> None:
        super().__init__(message, status=429)
        self.retry_after = retry_after


# ---------------------------------------------------------------------------------------------- ports


@dataclass(slots=True)
class Reply:
    """A finished answer: serialized body and its media type."""

    body: bytes
    content_type: str = "application/json"


# ---------------------------------------------------------------------------------------------- auth


class ApiKeys:
    """The proxy's API keys, compared in constant time (`shared.domain.keys.KeySet`)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = KeySet(keys)

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._keys)} keys>)"

    def check(self, authorization: str | None, functions_key: str | None) -> None:
        if not self._keys:
            raise Unauthorized("the proxy has no API keys configured (PROXY_API_KEYS); every request is refused")
        presented: list[str] = []
        if authorization:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                presented.append(token.strip())
        if functions_key:
            presented.append(functions_key.strip())
        if not presented:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'x-functions-key: <key>'")
        ok = False
        for value in presented:
            ok |= self._keys.matches(value)
        if not ok:
            raise Unauthorized("invalid API key")


# ---------------------------------------------------------------------------------------------- chat request


@dataclass(slots=True)
class ChatRequest:
    messages: list[dict[str, str]]
    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = DEFAULT_MAX_TOKENS
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def _number(
    payload: Mapping[str, Any], name: str, default: float, low: float, high: float, *, low_open: bool = False
) -> float:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"'{name}' must be a number", param=name, code="invalid_type")
    if value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise InvalidRequest(f"'{name}' must be in {bound}, got {value}", param=name, code="invalid_value")
    return float(value)


def _integer(payload: Mapping[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer", param=name, code="invalid_type")
    return value


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text parts can be forwarded
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(
                    f"messages[{index}].content: only text content parts are supported",
                    param=f"messages[{index}].content",
                    code="unsupported_content",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequest(
        f"messages[{index}].content must be a string", param=f"messages[{index}].content", code="invalid_type"
    )


def parse_messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages", code="invalid_type")
    if len(raw) > MAX_MESSAGES:
        raise InvalidRequest(
            f"at most {MAX_MESSAGES} messages are accepted", param="messages", code="too_many_messages"
        )
    out: list[dict[str, str]] = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages[{i}]", code="invalid_type")
        role = CHAT_ROLES.get(msg.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise InvalidRequest(
                f"messages[{i}].role must be one of system, developer, user, assistant; got {msg.get('role')!r}",
                param=f"messages[{i}].role",
                code="invalid_value",
            )
        if msg.get("tool_calls") or msg.get("function_call"):
            raise InvalidRequest(
                "tool calls are not supported", param=f"messages[{i}].tool_calls", code="unsupported_parameter"
            )
        out.append({"role": role, "content": _message_text(msg.get("content"), i)})
    return out


_RARE_FIELDS = frozenset(UNSUPPORTED_FIELDS) | {"presence_penalty", "frequency_penalty", "logprobs", "response_format"}


def _refuse_unsupported(payload: Mapping[str, Any]) -> None:
    for name, why in UNSUPPORTED_FIELDS.items():
        if name in payload and payload[name] not in NEUTRAL_VALUES[name]:
            raise InvalidRequest(why, param=name, code="unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(payload, name, 0.0, -2.0, 2.0) != 0.0:
            raise InvalidRequest(
                f"'{name}' is not supported by the Azure ML scoring schema", param=name, code="unsupported_parameter"
            )
    if payload.get("logprobs") not in (None, False):
        raise InvalidRequest(
            "logprobs are not supported by the Azure ML scoring schema", param="logprobs", code="unsupported_parameter"
        )
    response_format = payload.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise InvalidRequest(
            "only response_format {'type': 'text'} is supported", param="response_format", code="unsupported_parameter"
        )


def parse_chat_request(
    payload: Any, *, max_tokens_cap: int, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> ChatRequest:
    """Validate an OpenAI chat-completions body. Unknown fields are ignored; fields we cannot honour are refused."""
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_body")
    messages = parse_messages(payload.get("messages"))
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", param="model", code="invalid_type")
    if not payload.keys().isdisjoint(_RARE_FIELDS):
        _refuse_unsupported(payload)

    temperature = _number(payload, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(payload, "top_p", 1.0, 0.0, 1.0, low_open=True)
    wanted = _integer(payload, "max_tokens")
    if "max_completion_tokens" in payload:
        max_completion = _integer(payload, "max_completion_tokens")
        if wanted is not None and max_completion is not None and wanted != max_completion:
            raise InvalidRequest(
                "give either 'max_tokens' or 'max_completion_tokens', not two different values",
                param="max_tokens",
                code="invalid_value",
            )
        wanted = wanted if wanted is not None else max_completion
    if wanted is not None and wanted < 1:
        raise InvalidRequest("'max_tokens' must be at least 1", param="max_tokens", code="invalid_value")
    max_new_tokens = min(wanted if wanted is not None else default_max_tokens, max_tokens_cap)

    stop_raw = payload.get("stop")
    stop: tuple[str, ...]
    if stop_raw is None:
        stop = ()
    elif isinstance(stop_raw, str):
        stop = (stop_raw,) if stop_raw else ()
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
        if len(stop_raw) > MAX_STOP:
            raise InvalidRequest(f"'stop' takes at most {MAX_STOP} sequences", param="stop", code="invalid_value")
        stop = tuple(s for s in stop_raw if s)
    else:
        raise InvalidRequest("'stop' must be a string or an array of strings", param="stop", code="invalid_type")

    n = _integer(payload, "n")
    if n is None:
        n = 1
    if not 1 <= n <= MAX_N:
        raise InvalidRequest(f"'n' must be between 1 and {MAX_N}", param="n", code="invalid_value")
    seed = _integer(payload, "seed")

    stream = payload.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream", code="invalid_type")
    include_usage = False
    stream_options = payload.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise InvalidRequest(
                "'stream_options' is only allowed when 'stream' is true", param="stream_options", code="invalid_value"
            )
        if not isinstance(stream_options, dict):
            raise InvalidRequest("'stream_options' must be an object", param="stream_options", code="invalid_type")
        include_usage = bool(stream_options.get("include_usage", False))
    return ChatRequest(
        messages=messages,
        model=model,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        stop=stop,
        n=n,
        seed=seed,
        stream=stream,
        include_usage=include_usage,
    )


def to_azureml_request(chat: ChatRequest) -> dict[str, Any]:
    """The Azure ML scoring body for a chat request (list-of-conversations form, one per choice).

    Greedy decoding (temperature 0) sends `do_sample: false` without temperature/top_p, which the
    Hugging Face generate() of the serving images would otherwise reject or warn about.
    """
    parameters: dict[str, Any] = {"max_new_tokens": chat.max_new_tokens, "do_sample": chat.temperature > 0}
    if chat.temperature > 0:
        parameters["temperature"] = chat.temperature
        parameters["top_p"] = chat.top_p
    if chat.stop:
        parameters["stop"] = list(chat.stop)
    if chat.seed is not None:
        parameters["seed"] = chat.seed
    return {"input_data": {"input_string": [chat.messages] * chat.n, "parameters": parameters}, "params": {}}


# ---------------------------------------------------------------------------------------------- score request


@dataclass(slots=True)
class ScoreRequest:
    body: dict[str, Any]
    model: str | None
    conversations: int


def _check_conversation(conv: Any, where: str) -> None:
    if not isinstance(conv, list) or not conv:
        raise InvalidRequest(f"{where} must be a non-empty array of messages", param=where, code="invalid_type")
    for j, msg in enumerate(conv):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise InvalidRequest(
                f"{where}[{j}] must be an object with string 'role' and 'content'",
                param=f"{where}[{j}]",
                code="invalid_type",
            )


def parse_score_request(
    payload: Any, *, max_tokens_cap: int, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> ScoreRequest:
    """Validate an Azure ML scoring body and cap `max_new_tokens`; the rest passes through unchanged.

    `input_string` may be a list of conversations (`[[{role, content}, ...], ...]`, the seed notebook's
    form) or one flat list of messages (`[{role, content}, ...]`, the vLLM images' form); it is sent on
    in the form it came in.
    """
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_body")
    input_data = payload.get("input_data")
    if not isinstance(input_data, dict):
        raise InvalidRequest("'input_data' must be an object", param="input_data", code="invalid_type")
    items = input_data.get("input_string")
    if not isinstance(items, list) or not items:
        raise InvalidRequest(
            "'input_data.input_string' must be a non-empty array", param="input_data.input_string", code="invalid_type"
        )
    if all(isinstance(item, dict) for item in items):
        _check_conversation(items, "input_data.input_string")
        conversations = 1
    elif all(isinstance(item, list) for item in items):
        for i, conv in enumerate(items):
            _check_conversation(conv, f"input_data.input_string[{i}]")
        conversations = len(items)
    else:
        raise InvalidRequest(
            "'input_data.input_string' must be a list of messages or a list of conversations, not a mix",
            param="input_data.input_string",
            code="invalid_value",
        )
    parameters = input_data.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise InvalidRequest(
            "'input_data.parameters' must be an object", param="input_data.parameters", code="invalid_type"
        )
    parameters = dict(parameters)
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        _number(parameters, name, 0.0, low, high)
    if "do_sample" in parameters and not isinstance(parameters["do_sample"], bool):
        raise InvalidRequest(
            "'do_sample' must be a boolean", param="input_data.parameters.do_sample", code="invalid_type"
        )
    wanted = _integer(parameters, "max_new_tokens")
    if wanted is not None and wanted < 1:
        raise InvalidRequest(
            "'max_new_tokens' must be at least 1", param="input_data.parameters.max_new_tokens", code="invalid_value"
        )
    parameters["max_new_tokens"] = min(wanted if wanted is not None else default_max_tokens, max_tokens_cap)
    params = payload.get("params", {})
    if not isinstance(params, dict):
        raise InvalidRequest("'params' must be an object", param="params", code="invalid_type")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", param="model", code="invalid_type")
    body = {"input_data": {**input_data, "parameters": parameters}, "params": params}
    return ScoreRequest(body=body, model=model, conversations=conversations)


# ---------------------------------------------------------------------------------------------- answers


@dataclass(slots=True)
class ModelOutput:
    """One answer per conversation, whatever shape the serving image used."""

    texts: list[str]
    finish_reasons: list[str | None]
    usage: dict[str, int] | None = None


class _UnknownShape(Exception):
    pass


def _is_message(item: Any) -> bool:
    return isinstance(item, dict) and "role" in item and "content" in item


def _texts_of(item: Any, depth: int = 0) -> list[str]:
    """Texts of one output value. A list of messages is one conversation: its last assistant turn."""
    if depth > 6:
        raise _UnknownShape("nested too deeply")
    if isinstance(item, str):
        return [item]
    if isinstance(item, dict):
        if "generated_text" in item:
            return _texts_of(item["generated_text"], depth + 1)
        if _is_message(item):
            if not isinstance(item["content"], str):
                raise _UnknownShape("message content is not text")
            return [item["content"]]
        if isinstance(item.get("text"), str):
            return [item["text"]]
        for key in ("output", "outputs", "predictions", "result"):
            if key in item:
                return _texts_of(item[key], depth + 1)
        if item and all(isinstance(k, str) and k.isdigit() for k in item):  # {"0": "...", "1": "..."}
            out: list[str] = []
            for key in sorted(item, key=int):
                out.extend(_texts_of(item[key], depth + 1))
            return out
        raise _UnknownShape(f"object with keys {sorted(item)[:5]}")
    if isinstance(item, list):
        if not item:
            raise _UnknownShape("empty list")
        if all(_is_message(m) for m in item) and any(m.get("role") != "assistant" for m in item):
            # a whole conversation (prompt echoed back): the answer is its last assistant turn
            assistant = [m for m in item if m.get("role") == "assistant"]
            if not assistant:
                raise _UnknownShape("conversation without an assistant message")
            return _texts_of(assistant[-1], depth + 1)
        out = []
        for sub in item:
            out.extend(_texts_of(sub, depth + 1))
        return out
    raise _UnknownShape(type(item).__name__)


def _usage(raw: Any) -> dict[str, int] | None:
    if not isinstance(raw, dict):
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    if type(prompt) is not int or type(completion) is not int:
        return None
    total = raw.get("total_tokens")
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total if type(total) is int else prompt + completion,
    }


def normalise_output(payload: Any) -> ModelOutput:
    """Map the serving images' answer shapes to one list of texts.

    Seen shapes: `{"output": "..."}`, `[{"0": "..."}]`, `["..."]`, `[{"generated_text": ...}]`
    (text or the whole conversation), MLflow's `{"predictions": ...}`, and OpenAI-style
    `{"choices": [...], "usage": {...}}` from newer images.
    """
    try:
        if isinstance(payload, dict) and isinstance(payload.get("choices"), list):
            texts: list[str] = []
            reasons: list[str | None] = []
            choices = payload["choices"]
            if len(choices) > 1:
                choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
            for choice in choices:
                if not isinstance(choice, dict):
                    raise _UnknownShape("choice is not an object")
                message = choice.get("message")
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    texts.append(message["content"])
                elif isinstance(choice.get("text"), str):
                    texts.append(choice["text"])
                else:
                    raise _UnknownShape("choice without text content")
                reason = choice.get("finish_reason")
                reasons.append(reason if isinstance(reason, str) else None)
            if not texts:
                raise _UnknownShape("no choices")
            return ModelOutput(texts, reasons, _usage(payload.get("usage")))
        texts = _texts_of(payload)
    except _UnknownShape as exc:
        raise UpstreamError(f"the endpoint answered in an unrecognised shape ({exc})") from None
    return ModelOutput(texts, [None] * len(texts), None)


def apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut the text at the first stop sequence (images that ignore `stop` still honour it this way)."""
    cut = -1
    for seq in stop:
        i = text.find(seq)
        if i >= 0 and (cut < 0 or i < cut):
            cut = i
    return (text[:cut], True) if cut >= 0 else (text, False)


# ---------------------------------------------------------------------------------------------- live models


@dataclass(frozen=True, slots=True)
class LiveModel:
    run_id: str
    model_name: str
    model_version: str
    endpoint: str
    deployment: str
    live_since: datetime

    @property
    def created(self) -> int:
        return int(self.live_since.timestamp())


@dataclass
class _ModelTable:
    live: list[LiveModel]
    index: dict[str, LiveModel]
    other: dict[str, str]
    loaded_at: float


def _live_since(record: RunRecord) -> datetime:
    for state, at in reversed(record.timeline):
        if state == "live":
            return parse_time(at) or record.updated_at
    return record.updated_at


def build_model_table(records: Iterable[RunRecord], *, loaded_at: float = 0.0) -> _ModelTable:
    live: list[LiveModel] = []
    other: dict[str, str] = {}
    for r in records:
        state = r.state.value if hasattr(r.state, "value") else str(r.state)
        if state == "live" and r.endpoint and r.model_name:
            live.append(LiveModel(r.run_id, r.model_name, r.model_version, r.endpoint, r.deployment, _live_since(r)))
        else:
            other.setdefault(r.run_id, state)
            if r.model_name:
                other.setdefault(r.model_name, state)
    live.sort(key=lambda m: m.live_since, reverse=True)
    index: dict[str, LiveModel] = {}
    for m in live:  # newest first: a model name maps to its newest live run
        index.setdefault(m.model_name, m)
        index.setdefault(f"{m.model_name}:{m.model_version}", m)
        index[m.run_id] = m
    return _ModelTable(live, index, other, loaded_at)


class LiveModels:
    """The live runs of the ledger, held in memory and re-read at most every `ttl_s` seconds.

    A stale table is served while a background task re-reads it, so no request ever waits on
    storage except the very first one of the process.
    """

    def __init__(
        self,
        list_runs: Callable[[], Iterable[RunRecord]],
        *,
        ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._list_runs = list_runs
        self._ttl = ttl_s
        self._clock = clock
        self._table: _ModelTable | None = None
        self._task: asyncio.Task[_ModelTable] | None = None

    async def _load(self) -> _ModelTable:
        try:
            records = await asyncio.to_thread(lambda: list(self._list_runs()))
        except Exception as exc:
            log.warning("cannot read the run ledger: %s", type(exc).__name__)
            if self._table is not None:  # keep serving the last good table, try again later
                self._table.loaded_at = self._clock()
                return self._table
            raise NoLiveModel("the run ledger cannot be read right now") from None
        self._table = build_model_table(records, loaded_at=self._clock())
        return self._table

    def _refresh(self) -> asyncio.Task[_ModelTable]:
        task = self._task
        loop = asyncio.get_running_loop()
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._task = loop.create_task(self._load())
            task.add_done_callback(_consume_exception)
        return task

    async def table(self, *, max_age_s: float | None = None) -> _ModelTable:
        table = self._table
        if table is None:
            return await self._refresh()
        age = self._clock() - table.loaded_at
        if max_age_s is not None and age > max_age_s:
            return await self._refresh()
        if age > self._ttl:
            self._refresh()
        return table

    def cached(self, selector: str | None) -> LiveModel | None:
        """Synchronous fast path of `resolve`: the answer from a fresh table, or None (then await resolve)."""
        table = self._table
        if table is None or self._clock() - table.loaded_at > self._ttl:
            return None
        if not selector or selector.lower() in DEFAULT_ALIASES:
            return table.live[0] if table.live else None
        return table.index.get(selector)

    async def resolve(self, selector: str | None) -> LiveModel:
        key = (selector or "").strip()
        table = await self.table()
        if key.lower() in DEFAULT_ALIASES:
            if not table.live:
                table = await self.table(max_age_s=1.0)
            if not table.live:
                raise NoLiveModel("no model is live yet: nothing to answer with")
            return table.live[0]
        model = table.index.get(key)
        if model is None:
            table = await self.table(max_age_s=1.0)  # it may have gone live a moment ago
            model = table.index.get(key)
        if model is None:
            state = table.other.get(key)
            why = f" (its run is {state})" if state else ""
            raise ModelNotFound(f"the model '{key}' does not exist or is not live{why}")
        return model

    async def listing(self) -> list[LiveModel]:
        return list((await self.table()).live)


def _consume_exception(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


# ---------------------------------------------------------------------------------------------- service


class _RetryableReply(Exception):
    def __init__(self, reply: UpstreamReply) -> None:
        super().__init__(f"upstream answered {reply.status}")
        self.reply = reply


@dataclass
class ScoringService:
    """Per-process scoring use case. Built once (see `shared.upstream.build_scoring_service`)."""

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


def render_completion(
    completion_id: str, created: int, model: LiveModel, choices: list[tuple[str, str]], usage: dict[str, int] | None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model.model_name,
        "system_fingerprint": model.run_id,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(choices)
        ],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def render_stream(
    completion_id: str,
    created: int,
    model: LiveModel,
    choices: list[tuple[str, str]],
    usage: dict[str, int] | None,
    *,
    include_usage: bool,
) -> bytes:
    """The whole answer as server-sent events in OpenAI's chunk format: per choice a role chunk, one
    content chunk and a finish chunk, then (if asked) a usage chunk, then `[DONE]`."""
    base = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model.model_name,
        "system_fingerprint": model.run_id,
    }
    if include_usage:
        base["usage"] = None
    events: list[bytes] = []

    def emit(choice: dict[str, Any] | None, **extra: Any) -> None:
        chunk = {**base, "choices": [choice] if choice is not None else [], **extra}
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")

    for i, (text, reason) in enumerate(choices):
        emit({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
        if text:
            emit({"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None})
        emit({"index": i, "delta": {}, "logprobs": None, "finish_reason": reason})
    if include_usage:
        emit(None, usage=usage)
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)
