"""Chat rows into training examples with the loss on assistant tokens only.

`apply_chat_template(..., return_assistant_tokens_mask=True)` marks the assistant tokens, but only
when the template wraps assistant content in `{% generation %}` markers; without them the mask is
silently all zeros and nothing is learned. `ensure_generation_markers` patches the templates we
know (ChatML as in SmolLM2, Phi-3) and refuses others; `tokenize_rows` fails loudly when no row
keeps an assistant token.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_NL = r"(\n|\\n)"
_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")

# ChatML, one expression for every role (SmolLM2, Qwen-style):
#   {{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}
_CHATML = re.compile(
    r"\{\{-?\s*'<\|im_start\|>'\s*\+\s*message\['role'\]\s*\+\s*'" + _NL + r"'\s*\+\s*message\['content'\]"
    r"\s*\+\s*'<\|im_end\|>'\s*\+\s*'(?:\n|\\n)'\s*-?\}\}"
)
# Phi-3, a branch per role: {{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}
_PHI3 = re.compile(
    r"\{\{-?\s*'<\|assistant\|>" + _NL + r"'\s*\+\s*message\['content'\]\s*\+\s*'<\|end\|>(?:\n|\\n)'\s*-?\}\}"
)


class MaskError(ValueError):
    """The assistant mask is empty: training would learn nothing."""


def has_generation_markers(template: str | None) -> bool:
    return bool(template and _MARKER.search(template))


def patch_chat_template(template: str) -> str:
    """The same template with `{% generation %}` around assistant content (and its end token).

    Renders exactly the same text as the original; raises ValueError for an unknown layout."""
    if has_generation_markers(template):
        return template
    match = _CHATML.search(template)
    if match:
        nl = match.group(1)
        replacement = (
            "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant" + nl + "' }}"
            "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '" + nl + "' }}"
            "{% else %}" + match.group(0) + "{% endif %}"
        )
        return template[: match.start()] + replacement + template[match.end() :]
    match = _PHI3.search(template)
    if match:
        nl = match.group(1)
        replacement = (
            "{{ '<|assistant|>" + nl + "' }}{% generation %}{{ message['content'] + '<|end|>' }}"
            "{% endgeneration %}{{ '" + nl + "' }}"
        )
        return template[: match.start()] + replacement + template[match.end() :]
    raise ValueError(
        "the chat template has no {% generation %} markers and is not a layout this trainer can patch "
        "(ChatML or Phi-3); add the markers around the assistant content to the model's template"
    )


def ensure_generation_markers(tokenizer: Any) -> bool:
    """Patch the tokenizer's template in place when needed; True when it was patched."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise ValueError("the tokenizer has no chat template; cannot find the assistant tokens")
    if has_generation_markers(template):
        return False
    tokenizer.chat_template = patch_chat_template(template)
    log.info("chat template patched with %s markers", "{% generation %}")
    return True


def read_rows(path: Path) -> Iterator[list[dict[str, str]]]:
    """The `messages` of each JSONL row (other columns such as `prompt` are ignored)."""
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path.name} line {number}: not JSON ({exc})") from exc
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not messages:
                raise ValueError(f"{path.name} line {number}: no `messages` list")
            yield [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


@dataclass
class TokenizedSplit:
    examples: list[dict[str, list[int]]] = field(default_factory=list)
    rows: int = 0
    dropped: int = 0
    tokens: int = 0
    assistant_tokens: int = 0


def tokenize_conversation(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], *, max_length: int
) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels (-100 everywhere except assistant tokens)."""
    out = tokenizer.apply_chat_template(
        list(messages),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        truncation=True,
        max_length=max_length,
    )
    ids = list(out["input_ids"])
    mask = list(out["assistant_masks"])
    labels = [tok if m else IGNORE_INDEX for tok, m in zip(ids, mask, strict=True)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_rows(
    tokenizer: Any,
    rows: Iterable[Sequence[Mapping[str, str]]],
    *,
    max_length: int,
    limit: int | None = None,
    split: str = "train",
) -> TokenizedSplit:
    """Tokenize rows, dropping those left with no assistant token after truncation.

    Raises MaskError when every row is dropped: the template or the data cannot teach anything."""
    result = TokenizedSplit()
    for messages in rows:
        if limit is not None and len(result.examples) >= limit:
            break
        result.rows += 1
        example = tokenize_conversation(tokenizer, messages, max_length=max_length)
        assistant = sum(1 for label in example["labels"] if label != IGNORE_INDEX)
        if assistant == 0:
            result.dropped += 1
            continue
        result.examples.append(example)
        result.tokens += len(example["input_ids"])
        result.assistant_tokens += assistant
    if result.rows and not result.examples:
        raise MaskError(
            f"the assistant mask is empty in all {result.rows} {split} rows (max_seq_length {max_length}): "
            "no assistant token to learn from; check the chat template's {% generation %} markers or raise max_seq_length"
        )
    if result.dropped:
        log.warning(
            "%s: dropped %d of %d rows with no assistant token after truncation", split, result.dropped, result.rows
        )
    return result


@dataclass
class ChatCollator:
    """Right-pads a batch: input_ids with the pad id, labels with -100, attention_mask with 0."""

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids, masks, labels = [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            masks.append(list(f["attention_mask"]) + [0] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(masks, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
