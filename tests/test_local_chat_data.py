"""Assistant-only loss: chat template patching, the assistant mask and the labels it produces."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_model import SAMPLES, model_cache
from tunegrid.local.chat_data import (
    IGNORE_INDEX,
    ChatCollator,
    MaskError,
    has_generation_markers,
    patch_chat_template,
    read_rows,
    tokenize_conversation,
    tokenize_rows,
)

# SmolLM2-135M-Instruct's template, exactly as its GGUF ships it (real newlines inside the quotes).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Phi-3-mini-4k-instruct's template (escaped newlines, as in its tokenizer_config.json).
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The tiny model's BPE tokenizer (trained on the sample rows, cached for the session)."""
    from transformers import AutoTokenizer

    from tunegrid.local.base_models import prepare_tiny_phi3

    return AutoTokenizer.from_pretrained(prepare_tiny_phi3(model_cache(tmp_path_factory)))


def _with_template(tokenizer, template: str):
    clone = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    clone.chat_template = template
    return clone


@pytest.mark.parametrize(
    ("template", "end"),
    [(SMOLLM2_TEMPLATE, "<|im_end|>"), (PHI3_TEMPLATE, "<|end|>")],
    ids=["chatml-smollm2", "phi3"],
)
def test_patched_template_renders_the_same_text_with_markers(tokenizer, template: str, end: str) -> None:
    """Patching adds {% generation %} around assistant content and changes nothing in the rendered text."""
    patched = patch_chat_template(template)
    assert not has_generation_markers(template)
    assert has_generation_markers(patched)
    before = _with_template(tokenizer, template).apply_chat_template(CONVERSATION, tokenize=False)
    after = _with_template(tokenizer, patched).apply_chat_template(CONVERSATION, tokenize=False)
    assert before == after
    assert patch_chat_template(patched) == patched


def test_unknown_template_without_markers_is_refused() -> None:
    """A layout the patcher does not know is an error, not a silent all-zero mask."""
    with pytest.raises(ValueError, match="generation"):
        patch_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")


@pytest.mark.parametrize(
    ("template", "end"),
    [
        (None, "<|end|>"),
        (patch_chat_template(SMOLLM2_TEMPLATE), "<|im_end|>"),
        (patch_chat_template(PHI3_TEMPLATE), "<|end|>"),
    ],
    ids=["tiny-template", "patched-chatml", "patched-phi3"],
)
def test_only_assistant_tokens_carry_labels(tokenizer, template: str | None, end: str) -> None:
    """The mask is non-empty, labels equal the input ids on assistant tokens and are -100 everywhere else."""
    tok = tokenizer if template is None else _with_template(tokenizer, template)
    example = tokenize_conversation(tok, CONVERSATION, max_length=512)
    ids, labels = example["input_ids"], example["labels"]
    learned = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert learned, "the assistant mask is empty"
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(ids, labels, strict=True))
    assert tok.decode(learned) == f"Paris.{end}Rome, since 1871.{end}"
    prompt_part = tok.decode([t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX])
    assert "capital of France" in prompt_part and "Paris" not in prompt_part


def test_template_without_markers_fails_loudly(tokenizer) -> None:
    """Without {% generation %} the mask is all zeros: tokenize_rows raises instead of training on nothing."""
    tok = _with_template(tokenizer, SMOLLM2_TEMPLATE)
    with pytest.raises(MaskError, match="assistant mask is empty in all 3"):
        tokenize_rows(tok, [CONVERSATION] * 3, max_length=512)


def test_rows_truncated_before_the_answer_are_dropped_and_all_dropped_fails(tokenizer) -> None:
    """Rows with no assistant token left after truncation are dropped; if none is left, it is an error."""
    rows = list(read_rows(SAMPLES / "ultrachat_small.jsonl"))[:20]
    kept = tokenize_rows(tokenizer, rows, max_length=128)
    assert 0 < len(kept.examples) < kept.rows
    assert kept.dropped == kept.rows - len(kept.examples)
    assert all(any(label != IGNORE_INDEX for label in e["labels"]) for e in kept.examples)
    assert kept.assistant_tokens == sum(sum(1 for label in e["labels"] if label != IGNORE_INDEX) for e in kept.examples)
    with pytest.raises(MaskError):
        tokenize_rows(tokenizer, rows, max_length=4)


def test_collator_pads_labels_with_ignore_index() -> None:
    """Padding never becomes a label: pad id in input_ids, 0 in attention_mask, -100 in labels."""
    batch = ChatCollator(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [8]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_rows_without_messages_are_reported(tmp_path: Path) -> None:
    """A row without a messages list is a clear error naming the line."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        list(read_rows(path))
