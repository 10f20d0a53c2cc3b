"""Answers in OpenAI's formats: a `chat.completion` object, or `chat.completion.chunk` server-sent events
rendered one at a time as the upstream's pieces arrive. Pure: no ports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from shared.usecases.scoring.live_models import LiveModel

DONE = b"data: [DONE]\n\n"


def render_completion(
    completion_id: str, created: int, model: LiveModel, text: str, reason: str, usage: dict[str, int] | None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model.model_name,
        "system_fingerprint": model.run_id,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
        ],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def sse(doc: Any) -> bytes:
    """One server-sent event carrying a JSON document."""
    return b"data: " + orjson.dumps(doc) + b"\n\n"


class ChunkRenderer:
    """The events of one streamed completion: the role first, content deltas, the finish reason, the
    usage chunk (only with `stream_options.include_usage`), then `[DONE]`."""

    def __init__(self, completion_id: str, created: int, model: LiveModel, *, include_usage: bool) -> None:
        self._base: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model.model_name,
            "system_fingerprint": model.run_id,
        }
        if include_usage:
            self._base["usage"] = None
        self.include_usage = include_usage

    def _choice(self, delta: dict[str, str], reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return sse({**self._base, "choices": [choice]})

    def role(self) -> bytes:
        return self._choice({"role": "assistant", "content": ""}, None)

    def content(self, text: str) -> bytes:
        return self._choice({"content": text}, None)

    def finish(self, reason: str) -> bytes:
        return self._choice({}, reason)

    def usage(self, usage: dict[str, int] | None) -> bytes:
        return sse({**self._base, "choices": [], "usage": usage})
