"""Token counts: the port for exact counts (`TokenCounter`) and the estimate used without one.

The domain never loads a tokenizer. Whoever builds `ValidationOptions` chooses the counter: the
deployed app the `tokenizers` adapter (`shared.adapters.tokenizer`, wired in `shared.bootstrap`),
the local kit its own, with the tokenizer's chat template (`tunegrid.tokenizer`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

ESTIMATE_BYTES_PER_TOKEN = 4
ESTIMATE_NOTE = (
    f"estimate (no tokenizer): a row is ceil(bytes of its JSON line, less its prompt and prompt_id, "
    f"/ {ESTIMATE_BYTES_PER_TOKEN}); assistant tokens are ceil(UTF-8 bytes of all assistant contents "
    f"/ {ESTIMATE_BYTES_PER_TOKEN})"
)


class TokenCounter(Protocol):
    """Exact token counts of valid rows, with a real tokenizer."""

    @property
    def name(self) -> str:
        """The tokenizer's path or id: the report says `tokenizer:<name>`."""
        ...

    @property
    def note(self) -> str:
        """How the counts are made (the report's `token_count_note`)."""
        ...

    @property
    def template_failures(self) -> int:
        """Rows whose chat template failed, counted as plain text instead, so far (0 without a template).

        A running total: a validation reports how much it grew while it ran."""
        ...

    def count(self, roles: Sequence[str], contents: Sequence[str], assistant_slice: slice) -> tuple[int, int]:
        """(tokens of the row, tokens of its assistant contents `contents[assistant_slice]`)."""
        ...


TokenCounterFactory = Callable[[str], TokenCounter]
"""Loads the counter of a tokenizer path or id; raises ConfigError when it cannot be loaded."""


def _estimate_row_tokens(line: bytes, prompt: object, prompt_id: object) -> int:
    """ceil(bytes / 4) of the row's JSON less its `prompt` and `prompt_id` (the pipeline drops them)."""
    size = len(line)
    if type(prompt) is str:
        size -= len(prompt)
    if type(prompt_id) is str:
        size -= len(prompt_id)
    return -(-size // ESTIMATE_BYTES_PER_TOKEN)
