"""The deployed app's token counter: a `tokenizer.json` run by the `tokenizers` library (Rust, no torch).

The Function App ships without torch and its Python tokenizer stack, so there is no chat template
here (templates are Jinja, applied by that stack): a row is its contents joined by newlines, counted
exactly, and the report's note says that the template's overhead is not included. The local kit
counts with the template (`tunegrid.tokenizer`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import ConfigError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
NOTE = (
    "exact: the contents joined by newlines (no chat template: the tokenizers library has none, so the "
    "template's overhead is not included); assistant tokens are the assistant contents alone"
)


def _looks_like_a_path(name: str) -> bool:
    """An HF id is `name` or `org/name`; anything else that names no file is a missing local path."""
    return name.startswith(("/", ".", "~")) or name.endswith(".json") or name.count("/") > 1


class TokenizersCounter:
    """A `TokenCounter` (shared.domain.validation) over a `tokenizers.Tokenizer`."""

    template_failures = 0  # no template, so it never fails

    def __init__(self, name: str, tokenizer: Tokenizer) -> None:
        self.name = name
        self.note = NOTE
        # Counts must be exact: a tokenizer.json may ask for truncation or padding, which would change them.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer

    @classmethod
    def load(cls, name: str) -> TokenizersCounter:
        """From a `tokenizer.json` file, a folder holding one, or an HF id (fetched from the hub).

        Raises ConfigError when it cannot be loaded."""
        path = Path(name).expanduser()
        try:
            from tokenizers import Tokenizer

            if path.is_dir():
                tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
            elif path.is_file():
                tokenizer = Tokenizer.from_file(str(path))
            elif _looks_like_a_path(name):
                raise FileNotFoundError(f"no such file or folder: {path}")
            else:
                tokenizer = Tokenizer.from_pretrained(name)
        except Exception as exc:  # any load failure is a configuration problem for the caller
            raise ConfigError(f"cannot load tokenizer {name!r}: {type(exc).__name__}: {exc}") from exc
        log.info("token counts with tokenizer %s (tokenizers, no chat template)", name)
        return cls(name, tokenizer)

    def count(self, roles: Sequence[str], contents: Sequence[str], assistant_slice: slice) -> tuple[int, int]:
        encode = self._tokenizer.encode
        row = len(encode("\n".join(contents)).ids)
        assistant = sum(len(encode(c, add_special_tokens=False).ids) for c in contents[assistant_slice])
        return row, assistant
