"""The dataset validator: every error and warning code, tolerated input, line reading, stats, caps."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from shared.adapters.storage import BlobStore
from shared.adapters.tables import TableRunLedger
from shared.adapters.tokenizer import TokenizersCounter
from shared.bootstrap import build_token_counter
from shared.domain.validation import (
    ERROR_CODES,
    WARNING_CODES,
    ValidationOptions,
    ValidationReport,
    fastpath,
    iter_lines,
    validate_chunks,
)
from shared.errors import ConfigError
from shared.settings import LEDGER_TABLE, REPORTS_CONTAINER, Settings
from tests.fakes import FakeBackend
from tests.support import upload_and_ingest
from tunegrid.tokenizer import TransformersTokenCounter
from tunegrid.validate_files import validate_path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


def conversation(i: int, *, system: bool = False) -> dict:
    messages = [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    if system:
        messages.insert(0, {"role": "system", "content": "be brief"})
    return {"messages": messages}


def good_lines(n: int = 10, *, start: int = 1000) -> list[bytes]:
    """n distinct valid rows (enough to pass too_few_rows)."""
    return [orjson.dumps(conversation(start + i)) for i in range(n)]


def msgs(*pairs: tuple[str, str]) -> bytes:
    return orjson.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]})


def run(data: bytes, options: ValidationOptions = ValidationOptions()) -> ValidationReport:
    return validate_chunks([data], options)


def run_both_paths(data: bytes, options: ValidationOptions = ValidationOptions()) -> ValidationReport:
    """The report, after checking the slow path alone gives exactly the same one."""
    fast = run(data, options)
    fastpath._use_fast_path = False
    try:
        slow = run(data, options)
    finally:
        fastpath._use_fast_path = True
    assert fast.to_dict() == slow.to_dict()
    return fast


UA = (("user", "hi"), ("assistant", "hello"))

# (case id, the bad line, expected error codes on it)
LINE_ERRORS: list[tuple[str, bytes, set[str]]] = [
    ("invalid_utf8", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', {"invalid_utf8"}),
    ("invalid_utf8_surrogate_bytes", b'{"messages": "\xed\xa0\x80"}', {"invalid_utf8"}),
    ("invalid_json_syntax", b'{"messages": [}', {"invalid_json"}),
    ("invalid_json_nan", msgs(*UA)[:-1] + b', "x": NaN}', {"invalid_json"}),
    ("invalid_json_infinity", msgs(*UA)[:-1] + b', "x": -Infinity}', {"invalid_json"}),
    ("invalid_json_overflow", msgs(*UA)[:-1] + b', "x": 1e400}', {"invalid_json"}),
    ("invalid_json_trailing_comma", b'{"messages": [],}', {"invalid_json"}),
    ("invalid_json_single_quotes", b"{'messages': []}", {"invalid_json"}),
    ("invalid_json_two_values", msgs(*UA) + b" " + msgs(*UA), {"invalid_json"}),
    ("invalid_json_control_char", b'{"messages": "a\x01b"}', {"invalid_json"}),
    ("invalid_json_lone_surrogate_escape", msgs(("user", "x"), ("assistant", "y")).replace(b'"x"', b'"\\ud800"'), {"invalid_json"}),
    ("invalid_json_deep_nesting", b"[" * 100_000 + b"]" * 100_000, {"invalid_json"}),
    ("not_object_array", b"[1, 2]", {"not_object"}),
    ("not_object_string", b'"messages"', {"not_object"}),
    ("not_object_null", b"null", {"not_object"}),
    ("missing_messages", b'{"prompt": "hi"}', {"missing_messages"}),
    ("messages_not_list", b'{"messages": {"role": "user", "content": "hi"}}', {"messages_not_list"}),
    ("messages_null", b'{"messages": null}', {"messages_not_list"}),
    ("too_few_messages_one", msgs(("user", "hi")), {"too_few_messages"}),
    ("too_few_messages_none", b'{"messages": []}', {"too_few_messages"}),
    ("message_not_object", b'{"messages": ["hi", {"role": "assistant", "content": "hello"}]}', {"message_not_object"}),
    ("missing_role", b'{"messages": [{"content": "hi"}, {"role": "assistant", "content": "hello"}]}', {"missing_role"}),
    ("unknown_role_tool", msgs(("user", "hi"), ("tool", "x")), {"unknown_role"}),
    ("unknown_role_case", msgs(("User", "hi"), ("assistant", "x")), {"unknown_role"}),
    ("unknown_role_not_string", b'{"messages": [{"role": 1, "content": "hi"}, {"role": "assistant", "content": "x"}]}', {"unknown_role"}),
    ("missing_content_absent", b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', {"missing_content"}),
    ("missing_content_null", b'{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "x"}]}', {"missing_content"}),
    ("content_not_string_number", b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}', {"content_not_string"}),
    ("content_not_string_parts", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "x"}]}', {"content_not_string"}),
    ("empty_content", msgs(("user", ""), ("assistant", "x")), {"empty_content"}),
    ("empty_content_whitespace", msgs(("user", "hi"), ("assistant", " \n\t ")), {"empty_content"}),
    ("unknown_key", b'{"messages": [{"role": "user", "content": "hi", "foo": 1}, {"role": "assistant", "content": "x"}]}', {"unknown_key"}),
    ("system_not_first", msgs(("user", "hi"), ("system", "be brief"), ("assistant", "x")), {"system_not_first"}),
    ("first_not_user", msgs(("system", "s"), ("assistant", "a"), ("user", "u"), ("assistant", "b")), {"first_not_user"}),
    ("roles_not_alternating", msgs(("user", "a"), ("user", "b"), ("assistant", "c")), {"roles_not_alternating"}),
    ("no_user_message", msgs(("system", "s"), ("assistant", "a")), {"first_not_user", "no_user_message"}),
    ("no_assistant_message", msgs(("system", "s"), ("user", "u")), {"no_assistant_message"}),
    ("several_at_once", b'{"messages": [{"role": "bot", "content": ""}, {"content": 3, "x": 1}]}', {"unknown_role", "empty_content", "missing_role", "content_not_string", "unknown_key"}),
]  # fmt: skip


@pytest.mark.parametrize(("case", "bad", "codes"), LINE_ERRORS, ids=[c[0] for c in LINE_ERRORS])
def test_line_errors(case: str, bad: bytes, codes: set[str]) -> None:
    """Each bad row yields exactly its codes on its line, and the other rows stay valid."""
    lines = [*good_lines(5), bad, *good_lines(10, start=0)]
    report = run_both_paths(b"\n".join(lines) + b"\n")
    assert not report.valid
    assert {i.code for i in report.errors} == codes
    assert all(i.line == 6 for i in report.errors)
    assert report.error_counts == dict.fromkeys(codes, 1)
    assert report.rows == 16
    assert report.valid_rows == 15
    assert all(i.message for i in report.errors)


def test_every_error_code_is_covered() -> None:
    """The tables above and the file-level tests below exercise every error code."""
    covered = set().union(*(codes for _, _, codes in LINE_ERRORS)) | {"line_too_long", "empty_file", "too_few_rows"}
    assert covered == set(ERROR_CODES)


def test_line_too_long_is_checked_before_parsing() -> None:
    """A line over the byte limit is an error without being parsed; the next line is read normally."""
    long_row = msgs(("user", "x" * 500), ("assistant", "y"))
    data = b"\n".join([*good_lines(3), long_row, *good_lines(10, start=0)])
    report = run_both_paths(data, ValidationOptions(max_line_bytes=200))
    assert report.error_counts == {"line_too_long": 1}
    assert report.errors[0].line == 4
    assert report.rows == 14
    assert report.valid_rows == 13


@pytest.mark.parametrize(
    ("data", "codes", "warnings"),
    [
        (b"", {"empty_file": 1}, {}),
        (b"\n\n  \n", {"empty_file": 1}, {"blank_line": 3}),
        (b"\xef\xbb\xbf", {"empty_file": 1}, {}),
        (b"\n".join(good_lines(9)), {"too_few_rows": 1}, {}),
        (b"\n".join([*good_lines(9), b"{"]), {"too_few_rows": 1, "invalid_json": 1}, {}),
    ],
    ids=["empty", "only_blank_lines", "only_bom", "nine_rows", "nine_valid_of_ten"],
)
def test_file_level_errors(data: bytes, codes: dict[str, int], warnings: dict[str, int]) -> None:
    """empty_file when there are no rows, too_few_rows under 10 valid rows; both have no line."""
    report = run_both_paths(data)
    assert report.error_counts == codes
    assert report.warning_counts == warnings
    file_level = [i for i in report.errors if i.code in ("empty_file", "too_few_rows")]
    assert [i.line for i in file_level] == [None]


def test_min_rows_is_configurable() -> None:
    """too_few_rows follows options.min_rows."""
    assert run(b"\n".join(good_lines(3)), ValidationOptions(min_rows=3)).valid
    assert not run(b"\n".join(good_lines(3)), ValidationOptions(min_rows=4)).valid


# (case id, extra lines mixed into ten good rows, expected warning counts)
WARNING_CASES: list[tuple[str, list[bytes], dict[str, int], ValidationOptions]] = [
    ("last_not_assistant", [msgs(("user", "a"), ("assistant", "b"), ("user", "c"))], {"last_not_assistant": 1}, ValidationOptions()),
    ("blank_line", [b"", b"   ", b"\t"], {"blank_line": 3}, ValidationOptions()),
    ("duplicate_row", [orjson.dumps(conversation(1003))], {"duplicate_row": 1}, ValidationOptions()),
    ("duplicate_row_canonical", [b'{ "messages" : [ {"content": "question 1004", "role": "user"}, {"content": "answer 1004", "role": "assistant"} ] }'], {"duplicate_row": 1}, ValidationOptions()),
    ("too_long", [msgs(("user", "w " * 400), ("assistant", "ok"))], {"too_long": 1}, ValidationOptions(max_seq_length=100)),
    ("extra_fields", [orjson.dumps({**conversation(1), "id": 7, "meta": {}})], {"extra_fields": 1}, ValidationOptions()),
    ("allowed_row_keys", [orjson.dumps({**conversation(1), "prompt": "p", "prompt_id": "x", "tools": []})], {}, ValidationOptions()),
    ("invalid_weight", [b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}'], {"invalid_weight": 1}, ValidationOptions()),
    ("invalid_weight_bool", [b'{"messages": [{"role": "user", "content": "a", "weight": true}, {"role": "assistant", "content": "b"}]}'], {"invalid_weight": 1}, ValidationOptions()),
    ("valid_weight_and_name", [b'{"messages": [{"role": "user", "content": "a", "name": "bob"}, {"role": "assistant", "content": "b", "weight": 0}]}'], {}, ValidationOptions()),
]  # fmt: skip


@pytest.mark.parametrize(("case", "extra", "warnings", "options"), WARNING_CASES, ids=[c[0] for c in WARNING_CASES])
def test_warnings(case: str, extra: list[bytes], warnings: dict[str, int], options: ValidationOptions) -> None:
    """Warnings are counted and listed on their line but never change the verdict."""
    lines = [*good_lines(5), *extra, *good_lines(5, start=1005)]
    report = run_both_paths(b"\n".join(lines), options)
    assert report.valid, report.errors
    assert report.warning_counts == warnings
    assert all(i.line is not None and 6 <= i.line <= 5 + len(extra) for i in report.warnings)


def test_every_warning_code_is_covered() -> None:
    """The warning table exercises every warning code."""
    assert set().union(*(w for _, _, w, _ in WARNING_CASES)) == set(WARNING_CODES)


def test_duplicate_names_the_first_line() -> None:
    """A duplicate's message names the line it repeats."""
    lines = good_lines(10)
    report = run_both_paths(b"\n".join([*lines, lines[2], lines[2]]))
    assert [(i.line, i.message) for i in report.warnings] == [
        (11, "the same conversation as line 3"),
        (12, "the same conversation as line 3"),
    ]


def test_duplicate_tracking_is_capped() -> None:
    """Past duplicate_tracking_rows new rows are no longer remembered, and stats say so."""
    lines = good_lines(20)
    report = run_both_paths(b"\n".join([*lines, lines[0], lines[15]]), ValidationOptions(duplicate_tracking_rows=10))
    assert report.warning_counts == {"duplicate_row": 1}  # line 16's row was never remembered
    assert report.stats["duplicate_check"]["complete"] is False
    assert report.stats["duplicate_check"]["tracked_rows"] == 10


@pytest.mark.parametrize(
    "transform",
    [
        lambda d: b"\xef\xbb\xbf" + d,
        lambda d: d.replace(b"\n", b"\r\n"),
        lambda d: d.rstrip(b"\n"),
        lambda d: d.replace(b"\n", b"\n\n"),
        lambda d: b"\xef\xbb\xbf" + d.replace(b"\n", b"\r\n").rstrip(b"\r\n"),
    ],
    ids=["bom", "crlf", "no_final_newline", "blank_lines", "all_together"],
)
def test_tolerated_input(transform: object) -> None:
    """A BOM, CRLF endings, no final newline and blank lines keep a valid file valid."""
    data = b"\n".join(good_lines(12)) + b"\n"
    report = run_both_paths(transform(data))  # type: ignore[operator]
    assert report.valid
    assert report.valid_rows == 12
    assert set(report.warning_counts) <= {"blank_line"}


def test_bom_only_at_start() -> None:
    """A BOM anywhere but the start of the file is an invalid line."""
    lines = good_lines(12)
    lines[3] = b"\xef\xbb\xbf" + lines[3]
    report = run(b"\n".join(lines))
    assert report.error_counts == {"invalid_json": 1}
    assert report.errors[0].line == 4


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.jsonl")), ids=lambda p: p.name)
def test_samples_are_valid(path: Path) -> None:
    """The real sample datasets validate with no errors and no warnings."""
    report = validate_path(path)
    assert report.valid, report.errors[:5]
    assert report.error_counts == {}
    assert report.warning_counts == {}
    assert report.rows == report.valid_rows == len(path.read_bytes().splitlines())
    data = path.read_bytes()
    assert report.stats["sha256"] == hashlib.sha256(data).hexdigest()
    assert report.stats["bytes"] == len(data)


def test_error_list_is_capped_but_counts_are_not() -> None:
    """With more issues than max_listed_errors the lists stop growing; the counts keep exact totals."""
    data = b"\n".join([b"{"] * 1500 + [b""] * 30 + good_lines(10))
    report = run(data, ValidationOptions(max_listed_errors=1000))
    assert report.error_counts == {"invalid_json": 1500}
    assert len(report.errors) == 1000
    assert [i.line for i in report.errors[:3]] == [1, 2, 3]
    assert report.warning_counts == {"blank_line": 30}
    capped = run(data, ValidationOptions(max_listed_errors=10))
    assert len(capped.errors) == len(capped.warnings) == 10
    assert capped.error_counts == {"invalid_json": 1500}
    assert capped.warning_counts == {"blank_line": 30}


def test_stats_over_valid_rows() -> None:
    """Messages and token statistics describe the valid rows; the estimate is labelled as such."""
    rows = [conversation(i) for i in range(10)] + [conversation(99, system=True)]
    lines = [orjson.dumps(r) for r in rows]
    data = b"\n".join([*lines, b"{broken"]) + b"\n"
    report = run_both_paths(data)
    stats = report.stats
    assert stats["rows"] == 12
    assert stats["valid_rows"] == 11
    assert stats["messages_per_row"] == {"min": 2, "mean": round(23 / 11, 3), "max": 3}
    tokens = sorted(math.ceil(len(line) / 4) for line in lines)
    assert stats["tokens_per_row"]["min"] == tokens[0]
    assert stats["tokens_per_row"]["max"] == tokens[-1]
    assert stats["tokens_per_row"]["p95"] == tokens[math.ceil(0.95 * len(tokens)) - 1]
    assert stats["tokens_per_row"]["mean"] == round(sum(tokens) / 11, 3)
    answers = sum(len(m["content"].encode()) for r in rows for m in r["messages"] if m["role"] == "assistant")
    assert stats["total_assistant_tokens"] == math.ceil(answers / 4)
    assert stats["token_count_method"] == "estimate"
    assert "estimate" in stats["token_count_note"]
    assert stats["bytes"] == len(data)
    assert stats["sha256"] == hashlib.sha256(data).hexdigest()


def test_token_estimate_leaves_out_prompt_fields_and_counts_utf8_bytes() -> None:
    """prompt and prompt_id (dropped by the pipeline) do not count; non-ASCII text counts its UTF-8 bytes."""
    plain = orjson.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "日本語"}]})
    with_prompt = orjson.dumps({"prompt": "p" * 400, "prompt_id": "f" * 64, **orjson.loads(plain)})
    report = run_both_paths(b"\n".join([plain, with_prompt, *good_lines(10)]), ValidationOptions(max_seq_length=60))
    assert report.warning_counts.get("too_long") is None
    assert report.stats["tokens_per_row"]["max"] < 60


def test_no_valid_rows_gives_null_stats() -> None:
    """With no valid row the distributions are null rather than made up."""
    report = run(b"{\n[]\n")
    assert report.stats["messages_per_row"] == {"min": None, "mean": None, "max": None}
    assert report.stats["tokens_per_row"] == {"min": None, "mean": None, "p95": None, "max": None}


def test_report_json_shape_and_markdown() -> None:
    """to_dict has exactly the issue's keys and round-trips; the markdown names the verdict, codes and lines."""
    report = run(b"\n".join([b"{", b"", *good_lines(10)]))
    doc = json.loads(json.dumps(report.to_dict()))
    assert list(doc) == ["valid", "rows", "valid_rows", "errors", "error_counts", "warnings", "warning_counts", "stats"]
    assert doc["errors"][0] == {"line": 1, "code": "invalid_json", "message": doc["errors"][0]["message"]}
    assert ValidationReport.from_dict(doc).to_dict() == doc
    md = report.to_markdown(title="Validation of x.jsonl")
    assert md.startswith("# Validation of x.jsonl")
    assert "INVALID" in md
    assert "`invalid_json`" in md
    assert "line 1:" in md
    assert "`blank_line`" in md
    assert "Verdict: valid" in run(b"\n".join(good_lines(10))).to_markdown(title="t")


LINE_CASES: list[tuple[str, bytes, list[tuple[int, bytes | None]]]] = [
    ("plain", b"a\nb\n", [(1, b"a"), (2, b"b")]),
    ("no_final_newline", b"a\nb", [(1, b"a"), (2, b"b")]),
    ("crlf", b"a\r\nb\r\n", [(1, b"a"), (2, b"b")]),
    ("bom", b"\xef\xbb\xbfa\nb", [(1, b"a"), (2, b"b")]),
    ("blank_lines_count", b"\n\na\n\n", [(1, b""), (2, b""), (3, b"a"), (4, b"")]),
    ("lone_cr_kept", b"a\rb\n", [(1, b"a\rb")]),
    ("final_cr", b"a\r", [(1, b"a")]),
    ("too_long", b"abcdef\nab\nabcde\r\n", [(1, None), (2, b"ab"), (3, b"abcde")]),
    ("too_long_last", b"ab\nabcdefgh", [(1, b"ab"), (2, None)]),
    ("empty", b"", []),
    ("only_bom", b"\xef\xbb\xbf", []),
]


@pytest.mark.parametrize(("case", "data", "expected"), LINE_CASES, ids=[c[0] for c in LINE_CASES])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_iter_lines(case: str, data: bytes, expected: list[tuple[int, bytes | None]], chunk: int) -> None:
    """Numbering, BOM, CRLF and over-long lines do not depend on where chunks break."""
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    assert list(iter_lines(chunks, max_line_bytes=5)) == expected


def test_iter_lines_skips_long_line_bytes_without_buffering() -> None:
    """A 50 MB line arriving in small chunks is yielded as None with no chunk kept beyond the limit."""
    held: list[int] = []

    def chunks():
        yield b"ok\n"
        for _ in range(50 * 16):
            yield b"x" * 65536
            held.append(1)
        yield b"\nlast"

    assert list(iter_lines(chunks(), max_line_bytes=1000)) == [(1, b"ok"), (2, None), (3, b"last")]
    assert len(held) == 800


def test_iter_lines_matches_the_report_numbering() -> None:
    """The lines iter_lines yields carry the numbers the report uses (the ingest split relies on it)."""
    data = b"\xef\xbb\xbf\n" + b"\r\n".join([b"{", *good_lines(10), b"", b"[]"])
    report = run(data)
    lines = dict(iter_lines([data], max_line_bytes=1 << 20))
    assert {i.line for i in report.errors if i.line} == {n for n, line in lines.items() if line in (b"{", b"[]")}
    assert {i.line for i in report.warnings} == {n for n, line in lines.items() if line == b""}


def test_pathological_rows_never_crash() -> None:
    """Deep nesting inside an allowed field, huge numbers and odd keys give codes or pass, never an exception."""
    deep_ok = orjson.dumps({**conversation(1), "tools": [[[[[[[[[[[]]]]]]]]]]]})
    deeper = msgs(*UA)[:-1] + b', "tools": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    deepest = msgs(*UA)[:-1] + b', "tools": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    big_int = msgs(*UA)[:-1] + b', "tools": 123456789012345678901234567890}'
    nested_name = (
        b'{"messages": [{"role": "user", "content": "a", "name": '
        + b"[" * 900
        + b"]" * 900
        + b'}, {"role": "assistant", "content": "b"}]}'
    )
    report = run_both_paths(b"\n".join([*good_lines(10), deep_ok, deeper, deepest, big_int, nested_name]))
    assert report.error_counts == {"invalid_json": 1}
    assert report.errors[0].line == 13
    assert report.valid_rows == 14


@pytest.mark.slow
def test_tokenizer_counts_exactly(tmp_path: Path) -> None:
    """With a tokenizer, tokens are counted with its chat template, and stats name the tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = sorted({w for i in range(12) for w in f"question {i} answer {i} be brief".split()})
    vocab = {w: n for n, w in enumerate(["[UNK]", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    fast.save_pretrained(tmp_path / "tok")

    rows = [conversation(i, system=i == 0) for i in range(12)]
    data = b"\n".join(orjson.dumps(r) for r in rows)
    report = run_both_paths(data, ValidationOptions(token_counter=TransformersTokenCounter(str(tmp_path / "tok"))))
    assert report.stats["token_count_method"] == f"tokenizer:{tmp_path / 'tok'}"
    reference = AutoTokenizer.from_pretrained(tmp_path / "tok")
    per_row = []
    for r in rows:
        ids = reference.apply_chat_template(r["messages"], tokenize=True)
        per_row.append(len(ids["input_ids"] if hasattr(ids, "keys") else ids))  # type: ignore[index,call-overload]
    assert report.stats["tokens_per_row"]["min"] == min(per_row)
    assert report.stats["tokens_per_row"]["max"] == max(per_row)
    assert report.stats["total_tokens"] == sum(per_row)
    assert report.stats["total_assistant_tokens"] == 2 * 12  # "answer N": two words a row


def test_unloadable_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    """A tokenizer that cannot be loaded fails fast with a clear ConfigError."""
    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        TransformersTokenCounter(str(tmp_path / "missing"))


class SystemRefusingCounter:
    """A hand-written `TokenCounter` whose "template" refuses rows with a system message."""

    name = "fake"
    note = "exact: one token a message"

    def __init__(self) -> None:
        self.template_failures = 0

    def count(self, roles: Sequence[str], contents: Sequence[str], assistant_slice: slice) -> tuple[int, int]:
        if roles[0] == "system":
            self.template_failures += 1
        return len(contents), len(contents[assistant_slice])


def test_a_counter_reaches_the_report_and_each_run_reports_its_own_failures() -> None:
    """The counter's name, note and counts make the stats; a reused counter's failures are counted per run."""
    counter = SystemRefusingCounter()
    data = b"\n".join(orjson.dumps(conversation(i, system=i % 4 == 0)) for i in range(12))
    report = run_both_paths(data, ValidationOptions(token_counter=counter))  # the same counter, twice
    assert counter.template_failures == 6
    assert report.stats["chat_template_failures"] == 3
    assert report.stats["token_count_method"] == "tokenizer:fake"
    assert report.stats["token_count_note"] == "exact: one token a message"
    assert report.stats["total_tokens"] == 12 * 2 + 3
    assert report.stats["total_assistant_tokens"] == 12


def word_tokenizer(folder: Path, *, truncate: bool = True) -> Path:
    """A WordLevel tokenizer.json over the words of `conversation` rows, built offline; it adds [BOS]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for i in range(1000, 1012) for w in f"question {i} answer {i} be brief".split()})
    vocab = {w: n for n, w in enumerate(["[UNK]", "[BOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    if truncate:
        tok.enable_truncation(max_length=3)  # saved in the file: exact counts must ignore it
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_tokenizers_adapter_counts_contents_exactly(tmp_path: Path) -> None:
    """The deployed counter: a tokenizer.json (file or folder) counts joined contents, and says the template is left out."""
    file = word_tokenizer(tmp_path / "tok")
    data = b"\n".join(orjson.dumps(conversation(1000 + i, system=i == 0)) for i in range(12))
    for name in (str(file), str(file.parent)):
        report = run_both_paths(data, ValidationOptions(token_counter=TokenizersCounter.load(name)))
        stats = report.stats
        assert stats["token_count_method"] == f"tokenizer:{name}"
        assert "no chat template" in stats["token_count_note"] and "not included" in stats["token_count_note"]
        # [BOS] + "question N" + "answer N"; the system row adds "be brief"; answers alone have no [BOS]
        assert (stats["tokens_per_row"]["min"], stats["tokens_per_row"]["max"]) == (5, 7)
        assert stats["total_tokens"] == 11 * 5 + 7
        assert stats["total_assistant_tokens"] == 12 * 2
        assert "chat_template_failures" not in stats


@pytest.mark.parametrize("case", ["missing", "folder_without_file", "not_a_tokenizer", "missing_json"])
def test_tokenizers_adapter_unloadable_is_a_config_error(tmp_path: Path, case: str) -> None:
    """A tokenizer the adapter cannot load is a ConfigError naming it (a path never goes to the hub)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    name = {
        "missing": str(tmp_path / "missing"),
        "folder_without_file": str(tmp_path / "empty"),
        "not_a_tokenizer": str(tmp_path / "bad.json"),
        "missing_json": "./nowhere/tokenizer.json",
    }[case]
    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        TokenizersCounter.load(name)


@pytest.mark.slow
def test_tokenizers_adapter_counts_as_the_kit_does_without_a_template(tmp_path: Path) -> None:
    """On a tokenizer with no chat template, the deployed adapter and the kit's counter give the same counts."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    file = word_tokenizer(tmp_path / "src", truncate=False)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(file)), unk_token="[UNK]").save_pretrained(
        tmp_path / "tok"
    )
    data = b"\n".join(orjson.dumps(conversation(1000 + i, system=i % 3 == 0)) for i in range(12))
    name = str(tmp_path / "tok")
    kit = run(data, ValidationOptions(token_counter=TransformersTokenCounter(name))).to_dict()
    deployed = run(data, ValidationOptions(token_counter=TokenizersCounter.load(name))).to_dict()
    assert kit["stats"].pop("token_count_note") != deployed["stats"].pop("token_count_note")
    assert kit == deployed


def test_the_deployed_counter_never_imports_transformers(tmp_path: Path) -> None:
    """The composition root's counter loads and counts without importing transformers or torch."""
    file = word_tokenizer(tmp_path / "tok")
    code = (
        "import sys\n"
        "import shared.usecases.ingest\n"
        "from shared.bootstrap import build_token_counter\n"
        "counter = build_token_counter(sys.argv[1])\n"
        "assert counter.count(('user', 'assistant'), ('question 1000', 'answer 1000'), slice(1, None, 2)) == (5, 2)\n"
        "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(file)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.azurite
def test_ingest_counts_with_the_counter_the_composition_root_wires(
    storage: Any, storage_conn: str, unique: str, tmp_path: Path
) -> None:
    """VALIDATION_TOKENIZER: ingest counts with the wired factory; unwired or unloadable, the run is an error."""
    file = word_tokenizer(tmp_path / "tok")
    blobs = BlobStore(storage.blobs)
    ledger = TableRunLedger(storage.tables.get_table_client(LEDGER_TABLE))
    data = b"\n".join(orjson.dumps(conversation(1000 + i)) for i in range(12)) + b"\n"

    def ingest(tokenizer: str, name: str, **kwargs: Any) -> Any:
        settings = Settings.from_env(
            {"DataStorage": storage_conn, "FINETUNE_BACKEND": "local", "VALIDATION_TOKENIZER": tokenizer}
        )
        ports = {"blobs": blobs, "ledger": ledger, "backend": FakeBackend(), "settings": settings}
        return upload_and_ingest(ports, f"t{unique}/{name}", data, **kwargs)

    outcome = ingest(str(file), "wired.jsonl", token_counter=build_token_counter)
    assert outcome.action == "submitted", outcome
    stored = json.loads(blobs.read_bytes(REPORTS_CONTAINER, f"t{unique}/wired.jsonl/{outcome.run_id}.report.json"))
    assert stored["stats"]["token_count_method"] == f"tokenizer:{file}"
    assert stored["stats"]["total_tokens"] == 12 * 5
    unwired = ingest(str(file), "unwired.jsonl")
    assert unwired.action == "error" and "no token counter" in unwired.reason
    missing = ingest(str(tmp_path / "missing"), "missing.jsonl", token_counter=build_token_counter)
    assert missing.action == "error" and "cannot load tokenizer" in missing.reason
