"""The local kit's token counter: transformers, with the tokenizer's chat template (`validate --tokenizer`).

The deployed app cannot use it (it must not import transformers): it counts with the `tokenizers`
adapter instead (`shared.adapters.tokenizer`), which has no chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.errors import ConfigError


class TransformersTokenCounter:
    """Exact token counts with `AutoTokenizer`: each row through its chat template when it has one.

    A `TokenCounter` (shared.domain.validation). transformers is imported only when one is built.
    """

    def __init__(self, name: str) -> None:
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # any load failure is a configuration problem for the caller
            raise ConfigError(f"cannot load tokenizer {name!r}: {type(exc).__name__}: {exc}") from exc
        self.name = name
        self.templated = bool(getattr(self.tokenizer, "chat_template", None))
        self.template_failures = 0

    @property
    def note(self) -> str:
        how = (
            "the tokenizer's chat template over each row"
            if self.templated
            else "the contents joined by newlines (no chat template)"
        )
        return f"exact: {how}; assistant tokens are the assistant contents alone"

    def _ids(self, encoded: Any) -> int:
        if hasattr(encoded, "keys") and "input_ids" in encoded:
            encoded = encoded["input_ids"]
        return len(encoded)

    def count(self, roles: Sequence[str], contents: Sequence[str], assistant_slice: slice) -> tuple[int, int]:
        tok = self.tokenizer
        row: int | None = None
        if self.templated:
            try:
                row = self._ids(
                    tok.apply_chat_template(
                        [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)], tokenize=True
                    )
                )
            except Exception:  # a template that refuses a valid conversation: fall back to plain text
                self.template_failures += 1
        if row is None:
            row = len(tok.encode("\n".join(contents)))
        asst = sum(len(tok.encode(c, add_special_tokens=False)) for c in contents[assistant_slice])
        return row, asst
