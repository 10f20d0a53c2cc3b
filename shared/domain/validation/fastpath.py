"""The fast path's decoder and the duplicate-check hash of a row.

msgspec decodes and type-checks the common well-formed row in C (known roles, string contents, no
unknown keys), and the checks and statistics of a whole batch of such rows run as C-level passes
over flat lists (`_Run._fast_batch`), so almost no Python runs per row. A batch with anything else
in it (a blank line, a row msgspec refuses, a bad order, an empty content) goes to the slow path,
which alone decides what is wrong. Without msgspec every row takes the slow path: same reports, slower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any, Literal

try:
    import msgspec
except ImportError:  # pragma: no cover - msgspec is pinned in requirements.txt
    msgspec = None  # type: ignore[assignment]

_decode_row: Callable[[bytes | None], Any] | None = None
_message_type: Callable[[str, str], object] | None = None
if msgspec is not None:

    class _Message(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
        role: Literal["system", "user", "assistant"]
        content: str

    class _Row(msgspec.Struct, forbid_unknown_fields=True, gc=False):
        messages: tuple[_Message, ...]  # a tuple: hashed as it is for the duplicate check
        prompt: str = ""  # a prompt that is not a string takes the slow path
        prompt_id: str = ""
        tools: Any = msgspec.UNSET

    _decode_row = msgspec.json.Decoder(_Row).decode  # type: ignore[assignment]  # None raises, as wanted
    _message_type = _Message  # type: ignore[assignment]

_use_fast_path = True  # tests turn it off to check that both paths give the same reports
_BATCH_ROWS = 128
_HASH_MASK = 0xFFFF_FFFF_FFFF_FFFF
_messages_of = attrgetter("messages")
_prompt_of = attrgetter("prompt")
_prompt_id_of = attrgetter("prompt_id")
_role_of = attrgetter("role")
_content_of = attrgetter("content")
_errors_of = attrgetter("errors")
_last_not_assistant_of = attrgetter("last_not_assistant")


def _row_key(roles: Sequence[str], contents: Sequence[str], extras: tuple[tuple[object, object], ...]) -> int:
    """The duplicate-check hash of a conversation: the batch path hashes the same message tuples."""
    if _message_type is not None:
        messages = tuple(map(_message_type, roles, contents))
    else:  # pragma: no cover
        messages = tuple(zip(roles, contents, strict=True))
    return hash((messages, extras) if extras else messages) & _HASH_MASK
