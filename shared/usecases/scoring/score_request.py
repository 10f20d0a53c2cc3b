"""Azure ML scoring request: validated, `max_new_tokens` capped, otherwise passed through. Pure: no ports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.usecases.scoring.chat_request import DEFAULT_MAX_TOKENS, integer_field, number_field
from shared.usecases.scoring.errors import InvalidRequest


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
        number_field(parameters, name, 0.0, low, high)
    if "do_sample" in parameters and not isinstance(parameters["do_sample"], bool):
        raise InvalidRequest(
            "'do_sample' must be a boolean", param="input_data.parameters.do_sample", code="invalid_type"
        )
    wanted = integer_field(parameters, "max_new_tokens")
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
