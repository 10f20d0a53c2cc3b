"""OpenAI chat-completions request -> validated `ChatRequest` -> Azure ML scoring body. Pure: no ports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.usecases.scoring.errors import InvalidRequest

DEFAULT_MAX_TOKENS = 256
"""max_new_tokens sent when the caller gives none (PROXY_DEFAULT_MAX_TOKENS; always capped by PROXY_MAX_TOKENS_CAP)."""
MAX_STOP = 4
MAX_MESSAGES = 1024

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


@dataclass(slots=True)
class ChatRequest:
    messages: list[dict[str, str]]
    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = DEFAULT_MAX_TOKENS
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def number_field(
    payload: Mapping[str, Any], name: str, default: float, low: float, high: float, *, low_open: bool = False
) -> float:
    """A numeric field within its bounds, or `default`; shared with the score request's parameters."""
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"'{name}' must be a number", param=name, code="invalid_type")
    if value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise InvalidRequest(f"'{name}' must be in {bound}, got {value}", param=name, code="invalid_value")
    return float(value)


def integer_field(payload: Mapping[str, Any], name: str) -> int | None:
    """An integer field or None; booleans are refused (JSON `true` is not 1 to a caller)."""
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
        if number_field(payload, name, 0.0, -2.0, 2.0) != 0.0:
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

    temperature = number_field(payload, "temperature", 1.0, 0.0, 2.0)
    top_p = number_field(payload, "top_p", 1.0, 0.0, 1.0, low_open=True)
    wanted = integer_field(payload, "max_tokens")
    if "max_completion_tokens" in payload:
        max_completion = integer_field(payload, "max_completion_tokens")
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

    n = integer_field(payload, "n")
    if n is not None and n != 1:
        raise InvalidRequest(
            "'n' other than 1 is not supported: the deployed model answers one choice per call; send n requests",
            param="n",
            code="unsupported_parameter",
        )
    seed = integer_field(payload, "seed")

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
        seed=seed,
        stream=stream,
        include_usage=include_usage,
    )


def to_azureml_request(chat: ChatRequest) -> dict[str, Any]:
    """The Azure ML scoring body for a chat request (list-of-conversations form, one conversation).

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
    return {"input_data": {"input_string": [chat.messages], "parameters": parameters}, "params": {}}
