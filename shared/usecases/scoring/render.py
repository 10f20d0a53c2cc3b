"""A finished answer as an OpenAI `chat.completion` object or as a server-sent event stream of chunks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from shared.usecases.scoring.live_models import LiveModel


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
