"""Azure ML scoring request: validated (conversation count, generation parameters), `max_new_tokens`
capped, otherwise passed through. Pure: no ports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.usecases.scoring.chat_request import DEFAULT_MAX_TOKENS, MAX_STOP, integer_field, number_field
from shared.usecases.scoring.errors import InvalidRequest

MAX_CONVERSATIONS = 16
"""Conversations in one /api/score request: each is a generation the deployment runs in turn."""
MAX_BEAMS = 4
"""Beam search multiplies the work of a generation; more beams than this are refused."""
NUMBER_PARAMETERS = {
    "temperature": (0.0, 2.0, False),
    "top_p": (0.0, 1.0, True),
    "repetition_penalty": (0.0, 5.0, True),
}
"""name: (low, high, low bound open)."""
INTEGER_PARAMETERS = {"top_k": (0, 1000), "num_beams": (1, MAX_BEAMS), "seed": (-(2**63), 2**63 - 1)}
BOOLEAN_PARAMETERS = frozenset({"do_sample", "return_full_text"})
PARAMETERS = frozenset(
    {*NUMBER_PARAMETERS, *INTEGER_PARAMETERS, *BOOLEAN_PARAMETERS, "max_new_tokens", "min_new_tokens", "stop"}
)
"""The generation parameters forwarded; any other is refused with 400 (not passed on unchecked)."""


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
        if conversations > MAX_CONVERSATIONS:
            raise InvalidRequest(
                f"at most {MAX_CONVERSATIONS} conversations per request; got {conversations}",
                param="input_data.input_string",
                code="too_many_conversations",
            )
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
    parameters = check_parameters(parameters, max_tokens_cap=max_tokens_cap, default_max_tokens=default_max_tokens)
    params = payload.get("params", {})
    if not isinstance(params, dict):
        raise InvalidRequest("'params' must be an object", param="params", code="invalid_type")
    if params:  # MLflow's inference params reach generate() too: the same rules apply
        params = check_parameters(params, max_tokens_cap=max_tokens_cap, default_max_tokens=None, where="params")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", param="model", code="invalid_type")
    body = {"input_data": {**input_data, "parameters": parameters}, "params": params}
    return ScoreRequest(body=body, model=model, conversations=conversations)


def check_parameters(
    raw: dict[str, Any], *, max_tokens_cap: int, default_max_tokens: int | None, where: str = "input_data.parameters"
) -> dict[str, Any]:
    """The generation parameters, each checked for type and range; `max_new_tokens` capped (and set to
    `default_max_tokens` when absent and a default is given)."""
    unknown = sorted(set(raw) - PARAMETERS)
    if unknown:
        raise InvalidRequest(
            f"unsupported generation parameter {unknown[0]!r}; supported: {', '.join(sorted(PARAMETERS))}",
            param=f"{where}.{unknown[0]}",
            code="unsupported_parameter",
        )
    parameters = dict(raw)
    try:
        for name, (low, high, low_open) in NUMBER_PARAMETERS.items():
            number_field(parameters, name, low, low, high, low_open=low_open)
        for name, (low_int, high_int) in INTEGER_PARAMETERS.items():
            value = integer_field(parameters, name)
            if value is not None and not low_int <= value <= high_int:
                raise InvalidRequest(
                    f"'{name}' must be between {low_int} and {high_int}, got {value}", param=name, code="invalid_value"
                )
    except InvalidRequest as exc:
        raise InvalidRequest(str(exc), param=f"{where}.{exc.param}", code=exc.code) from None
    for name in BOOLEAN_PARAMETERS:
        if name in parameters and not isinstance(parameters[name], bool):
            raise InvalidRequest(f"'{name}' must be a boolean", param=f"{where}.{name}", code="invalid_type")
    stop = parameters.get("stop")
    if stop is not None and not (
        isinstance(stop, str)
        or (isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) for s in stop))
    ):
        raise InvalidRequest(
            f"'stop' must be a string or at most {MAX_STOP} strings", param=f"{where}.stop", code="invalid_value"
        )
    wanted = integer_field(parameters, "max_new_tokens")
    if wanted is not None and wanted < 1:
        raise InvalidRequest(
            "'max_new_tokens' must be at least 1", param=f"{where}.max_new_tokens", code="invalid_value"
        )
    if wanted is not None or default_max_tokens is not None:
        parameters["max_new_tokens"] = min(wanted if wanted is not None else default_max_tokens, max_tokens_cap)  # type: ignore[type-var]
    least = integer_field(parameters, "min_new_tokens")
    most = parameters.get("max_new_tokens", max_tokens_cap)
    if least is not None and not 0 <= least <= most:
        raise InvalidRequest(
            f"'min_new_tokens' must be between 0 and max_new_tokens ({most}), got {least}",
            param=f"{where}.min_new_tokens",
            code="invalid_value",
        )
    return parameters
