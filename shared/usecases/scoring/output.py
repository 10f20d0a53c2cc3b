"""The serving images' answers, whatever their shape, as one list of texts; stop sequences. Pure: no ports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from shared.errors import UpstreamError


@dataclass(slots=True)
class ModelOutput:
    """One answer per conversation, whatever shape the serving image used."""

    texts: list[str]
    finish_reasons: list[str | None]
    usage: dict[str, int] | None = None


FINISH_REASONS = frozenset({"stop", "length"})


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
    if isinstance(payload, dict) and "output" in payload and len(texts) == 1:
        # the local server's one-conversation answer carries its finish reason and token counts beside it
        reason = payload.get("finish_reason")
        return ModelOutput(texts, [reason if reason in FINISH_REASONS else None], _usage(payload.get("usage")))
    return ModelOutput(texts, [None] * len(texts), None)


@dataclass(slots=True)
class StreamEvent:
    """One line of a streamed answer (NDJSON): a piece of text, or the end with its reason and usage."""

    delta: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


def parse_stream_event(line: bytes) -> StreamEvent:
    """`{"delta": "..."}`, then `{"finish_reason": "stop"|"length", "usage": {...}}`; `{"error": "..."}`
    when the upstream failed mid-stream (an UpstreamError here)."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise UpstreamError("the model endpoint streamed a line that is not JSON") from None
    if not isinstance(doc, dict):
        raise UpstreamError("the model endpoint streamed a line that is not a JSON object")
    if "error" in doc:
        raise UpstreamError(f"the model endpoint failed while streaming: {str(doc['error'])[:200]}")
    delta = doc.get("delta", "")
    reason = doc.get("finish_reason")
    if not isinstance(delta, str) or (reason is not None and reason not in FINISH_REASONS):
        raise UpstreamError("the model endpoint streamed an event in an unrecognised shape")
    return StreamEvent(delta, reason, _usage(doc.get("usage")))


def apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut the text at the first stop sequence (images that ignore `stop` still honour it this way)."""
    cut = -1
    for seq in stop:
        i = text.find(seq)
        if i >= 0 and (cut < 0 or i < cut):
            cut = i
    return (text[:cut], True) if cut >= 0 else (text, False)


class StopScanner:
    """`apply_stop` for a stream: text is passed on as it comes, except a tail that could still be the
    start of a stop sequence, which is held back until the next piece says which it is."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that can be sent now; after a stop sequence, `stopped` is True and nothing more comes."""
        if self.stopped:
            return ""
        if not self._stop:
            return piece
        text, stopped = apply_stop(self._pending + piece, self._stop)
        if stopped:
            self.stopped = True
            self._pending = ""
            return text
        cut = max(0, len(text) - self._hold)
        self._pending = text[cut:]
        return text[:cut]

    def flush(self) -> str:
        """What is still held back, once the stream has ended."""
        rest, self._pending = self._pending, ""
        return "" if self.stopped else rest


def split_for_stream(text: str, *, size: int = 24) -> list[str]:
    """A whole answer cut into pieces of about `size` characters at word ends, for an upstream that
    cannot stream (the pieces joined give the text back exactly)."""
    pieces: list[str] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            space = text.find(" ", end)
            end = len(text) if space < 0 else space + 1
        pieces.append(text[start:end])
        start = end
    return pieces
