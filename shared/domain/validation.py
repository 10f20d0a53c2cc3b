"""Streaming validation of a chat fine-tuning dataset (JSONL, one conversation per line).

A malformed dataset must never reach a GPU cluster, so this runs before anything is submitted and
answers in seconds. It streams: memory stays flat whatever the file size (the only structures that
grow are bounded: see `DuplicateIndex` and the token histogram). The same code reads a local file
(`validate_path`) and a blob (`validate_chunks` over `BlobStore.chunks()`). A big local file is
validated in parts by forked worker processes and merged in file order into the same report
(`_validate_in_parts`).

Every row goes through one strict JSON parse (orjson: RFC 8259, so NaN/Infinity are rejected).
A row that is an object holding only `messages` of `{"role", "content"}` string pairs in a valid
order takes a fast path; any other row is examined by `_inspect_row`, which names every problem.
Both paths share the role-order rules (`_RolePattern`) and the per-row statistics, so they agree.
The error and warning codes are part of the interface: see docs/validation.md.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import queue
import re
import stat
import sys
import threading
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate, chain, compress, count, pairwise, repeat
from multiprocessing.connection import Connection
from operator import add, and_, attrgetter, eq, floordiv, gt, not_, sub
from pathlib import Path
from typing import Any, BinaryIO, Literal

import orjson

from shared.errors import ConfigError

ERROR_CODES: tuple[str, ...] = (
    "empty_file",
    "too_few_rows",
    "invalid_utf8",
    "invalid_json",
    "line_too_long",
    "not_object",
    "missing_messages",
    "messages_not_list",
    "too_few_messages",
    "message_not_object",
    "missing_role",
    "unknown_role",
    "missing_content",
    "content_not_string",
    "empty_content",
    "unknown_key",
    "system_not_first",
    "first_not_user",
    "roles_not_alternating",
    "no_user_message",
    "no_assistant_message",
)
WARNING_CODES: tuple[str, ...] = (
    "last_not_assistant",
    "blank_line",
    "duplicate_row",
    "too_long",
    "extra_fields",
    "invalid_weight",
)

ROLES = frozenset(("system", "user", "assistant"))
MESSAGE_KEYS = frozenset(("role", "content", "name", "weight"))
ROW_KEYS = frozenset(("messages", "prompt", "prompt_id", "tools"))
"""Row keys the Azure ML chat pipeline reads; it drops any other (hence `extra_fields`)."""

BOM = b"\xef\xbb\xbf"
READ_CHUNK_BYTES = 256 * 1024
SPLIT_BYTES = 256 * 1024
ESTIMATE_BYTES_PER_TOKEN = 4
DEFAULT_DUPLICATE_TRACKING_ROWS = 1_048_576
_PATTERN_CACHE_SIZE = 4096
_INDEXES_SHOWN = 3


@dataclass(frozen=True)
class ValidationOptions:
    max_line_bytes: int = 1_048_576
    max_seq_length: int = 2048
    tokenizer: str | None = None
    """Local path or HF id of a tokenizer for exact counts; None estimates (and says so in stats)."""
    max_listed_errors: int = 1000
    """Cap on the `errors` and `warnings` lists (each); the counts are never capped."""
    min_rows: int = 10
    duplicate_tracking_rows: int = DEFAULT_DUPLICATE_TRACKING_ROWS
    """Distinct valid rows remembered for `duplicate_row`; past it, new rows are no longer remembered
    (stats say so). Memory: about 80 bytes a remembered row (about 84 MB at the default)."""


@dataclass
class Issue:
    line: int | None
    code: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "message": self.message}


@dataclass
class ValidationReport:
    valid: bool
    rows: int
    valid_rows: int
    errors: list[Issue]
    error_counts: dict[str, int]
    warnings: list[Issue]
    warning_counts: dict[str, int]
    stats: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "rows": self.rows,
            "valid_rows": self.valid_rows,
            "errors": [i.to_dict() for i in self.errors],
            "error_counts": dict(self.error_counts),
            "warnings": [i.to_dict() for i in self.warnings],
            "warning_counts": dict(self.warning_counts),
            "stats": self.stats,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationReport:
        """The inverse of `to_dict` (reading a stored report back)."""
        return cls(
            valid=bool(data["valid"]),
            rows=int(data["rows"]),
            valid_rows=int(data["valid_rows"]),
            errors=[Issue(i["line"], i["code"], i["message"]) for i in data["errors"]],
            error_counts=dict(data["error_counts"]),
            warnings=[Issue(i["line"], i["code"], i["message"]) for i in data["warnings"]],
            warning_counts=dict(data["warning_counts"]),
            stats=dict(data["stats"]),
        )

    def to_markdown(self, *, title: str, max_issues: int = 20) -> str:
        """A short human-readable summary: verdict, counts per code, the first issues, stats."""
        verdict = "valid" if self.valid else "INVALID"
        out = [
            f"# {title}",
            "",
            f"**Verdict: {verdict}**: {self.rows} rows, {self.valid_rows} valid, "
            f"{sum(self.error_counts.values())} errors, {sum(self.warning_counts.values())} warnings.",
            "",
        ]
        for heading, counts, issues in (
            ("Errors", self.error_counts, self.errors),
            ("Warnings", self.warning_counts, self.warnings),
        ):
            if not counts:
                continue
            out += [f"## {heading}", "", "| code | count |", "|---|---:|"]
            out += [f"| `{code}` | {n} |" for code, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
            out.append("")
            shown = issues[:max_issues]
            more = sum(counts.values()) - len(shown)
            out.append(f"First {len(shown)}:" if more > 0 else "All:")
            out.append("")
            for issue in shown:
                where = f"line {issue.line}" if issue.line is not None else "file"
                out.append(f"- {where}: `{issue.code}`: {_md_escape(issue.message)}")
            if more > 0:
                out.append(f"- ... and {more} more")
            out.append("")
        out += ["## Stats", ""]
        out += _stats_markdown(self.stats)
        return "\n".join(out) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("\n", " ").replace("|", "\\|")


def _stats_markdown(stats: dict[str, Any]) -> list[str]:
    def dist(d: Any) -> str:
        if not isinstance(d, dict):
            return str(d)
        if all(v is None for v in d.values()):
            return "none (no valid rows)"
        return ", ".join(f"{k} {v if not isinstance(v, float) else round(v, 1)}" for k, v in d.items())

    lines = [
        f"- rows: {stats.get('rows')} ({stats.get('valid_rows')} valid, {stats.get('blank_lines')} blank lines)",
        f"- bytes: {stats.get('bytes')}, sha256 `{stats.get('sha256')}`",
        f"- messages per row: {dist(stats.get('messages_per_row'))}",
        f"- tokens per row ({stats.get('token_count_method')}): {dist(stats.get('tokens_per_row'))}",
        f"- total assistant tokens: {stats.get('total_assistant_tokens')}",
    ]
    dup = stats.get("duplicate_check")
    if isinstance(dup, dict) and not dup.get("complete", True):
        lines.append(f"- duplicate check stopped remembering rows after {dup.get('tracked_rows')} rows")
    return lines


# --------------------------------------------------------------------------------------------- lines


def iter_lines(chunks: Iterable[bytes], *, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Split a byte stream into `(line number, line)`; numbering is 1-based and counts blank lines.

    The line excludes its end (`\\n` or `\\r\\n`). A UTF-8 BOM at the very start is dropped. A last
    line without a newline is a line; nothing after the last newline is not. A line longer than
    `max_line_bytes` is yielded as None, and its bytes are dropped as they arrive, never buffered.
    Memory: one chunk plus at most `max_line_bytes + 1` bytes of an unfinished line.
    """
    for first, lines in line_batches(chunks, max_line_bytes=max_line_bytes):
        yield from zip(count(first), lines)


def line_batches(
    chunks: Iterable[bytes], *, max_line_bytes: int, bom: bool = True
) -> Iterator[tuple[int, list[bytes | None]]]:
    """The lines of `iter_lines`, a list per chunk: `(number of the first line, lines)`.

    `bom=False` keeps a leading BOM (for a stream that starts inside a file, not at its start).
    """
    lineno = 1  # number of the next line
    pending: list[bytes] = []  # pieces of the unfinished line that started in an earlier chunk
    pending_len = 0
    skipping = False  # the unfinished line is already over the limit: drop its bytes
    limit = max_line_bytes
    for chunk in _without_bom(chunks, strip=bom):
        pieces: list[bytes | None] = chunk.split(b"\n")  # type: ignore[assignment]
        tail: bytes = pieces.pop()  # type: ignore[assignment]
        if pieces:
            first: bytes | None
            if skipping:
                first = None
                skipping = False
            else:
                first = pieces[0]
                if pending:
                    pending.append(first)  # type: ignore[arg-type]
                    first = b"".join(pending)
                    pending = []
                    pending_len = 0
                if first[-1:] == b"\r":  # type: ignore[index]
                    first = first[:-1]  # type: ignore[index]
                if len(first) > limit:  # type: ignore[arg-type]
                    first = None
            if len(pieces) > 1:
                # pieces[0] is replaced below, so these passes may treat it like the others
                if b"\r" in chunk:
                    pieces = [p[:-1] if p[-1:] == b"\r" else p for p in pieces]  # type: ignore[index]
                if max(map(len, pieces)) > limit:  # type: ignore[arg-type]
                    pieces = [None if len(p) > limit else p for p in pieces]  # type: ignore[arg-type]
            pieces[0] = first
            yield lineno, pieces
            lineno += len(pieces)
        if tail and not skipping:
            pending_len += len(tail)
            if pending_len > limit + 1:  # +1: a CR before the LF is not part of the line
                skipping = True
                pending = []
                pending_len = 0
            else:
                pending.append(tail)
    if skipping:
        yield lineno, [None]
    elif pending:
        last = b"".join(pending)
        if last[-1:] == b"\r":
            last = last[:-1]
        yield lineno, [None if len(last) > limit else last]


def _without_bom(chunks: Iterable[bytes], *, strip: bool = True) -> Iterator[bytes]:
    """The stream without a leading BOM, in pieces of at most `SPLIT_BYTES` (splitting stays in cache)."""
    it = iter(chunks)
    head = b""
    for chunk in it:
        head += bytes(chunk)
        if len(head) >= len(BOM):
            break
    if strip and head.startswith(BOM):
        head = head[len(BOM) :]
    for chunk in chain((head,), it):
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        if len(chunk) <= SPLIT_BYTES:
            if chunk:
                yield chunk
        else:
            for start in range(0, len(chunk), SPLIT_BYTES):
                yield chunk[start : start + SPLIT_BYTES]


# ------------------------------------------------------------------------------------- row checking


def _kind(value: object) -> str:
    """A JSON type name for messages; never the value itself (it may be huge or deeply nested)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(value: object, limit: int = 40) -> str:
    if isinstance(value, str):
        text = value if len(value) <= limit else value[:limit] + "..."
        return repr(text)
    return _kind(value)


def _scalar(value: object) -> str:
    """A short JSON spelling of a scalar (`2`, `true`, `"bob"`), else its kind."""
    if value is None or isinstance(value, (bool, int, float)):
        return orjson.dumps(value).decode()
    if isinstance(value, str):
        return orjson.dumps(value if len(value) <= 40 else value[:40] + "...").decode()
    return _kind(value)


def _indexes(indexes: Sequence[int]) -> str:
    shown = ", ".join(f"messages[{i}]" for i in indexes[:_INDEXES_SHOWN])
    more = len(indexes) - _INDEXES_SHOWN
    return shown + (f" (and {more} more)" if more > 0 else "")


@dataclass(frozen=True, eq=False)  # identity equality: `None in patterns` stays in C
class _RolePattern:
    """What the role sequence of a row says: order errors, the last-turn warning, assistant turns."""

    roles: tuple[str, ...]
    errors: tuple[tuple[str, str], ...]
    last_not_assistant: bool
    assistant_slice: slice  # the assistant turns, when the row is valid (they alternate)


def _role_pattern(roles: tuple[str, ...]) -> _RolePattern:
    """Order rules over a sequence of valid roles (system | user | assistant)."""
    errors: list[tuple[str, str]] = []
    late_system = [i for i, r in enumerate(roles) if r == "system" and i > 0]
    if late_system:
        errors.append(("system_not_first", f"{_indexes(late_system)}: a system message may only come first"))
    turns = [(i, r) for i, r in enumerate(roles) if r != "system"]
    if turns and turns[0][1] != "user":
        i, r = turns[0]
        errors.append(("first_not_user", f"the first non-system message, messages[{i}], is from the {r}, not the user"))
    for (i, a), (j, b) in pairwise(turns):
        if a == b:
            errors.append(
                (
                    "roles_not_alternating",
                    f"messages[{i}] and messages[{j}] are both from the {a}; user and assistant must alternate",
                )
            )
            break
    if "user" not in roles:
        errors.append(("no_user_message", "the conversation has no user message"))
    if "assistant" not in roles:
        errors.append(("no_assistant_message", "the conversation has no assistant message"))
    start = 1 if roles and roles[0] == "system" else 0
    return _RolePattern(
        roles=roles,
        errors=tuple(errors),
        last_not_assistant=bool(roles) and roles[-1] != "assistant",
        assistant_slice=slice(start + 1, None, 2),
    )


@dataclass
class _RowVerdict:
    errors: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    roles: tuple[str, ...] = ()
    contents: list[str] = field(default_factory=list)
    pattern: _RolePattern | None = None
    extras: tuple[tuple[object, object], ...] = ()  # (name, weight) per message when any is present


def _inspect_row(obj: object, patterns: Callable[[tuple[str, ...]], _RolePattern]) -> _RowVerdict:
    """Every problem of one parsed row, one issue per code (naming the messages concerned)."""
    verdict = _RowVerdict()
    errors, warnings = verdict.errors, verdict.warnings
    if type(obj) is not dict:
        errors.append(("not_object", f"the row is {_kind(obj)}, not an object"))
        return verdict
    extra = [k for k in obj if k not in ROW_KEYS]
    if extra:
        names = ", ".join(_short(k) for k in extra[:_INDEXES_SHOWN])
        more = f" (and {len(extra) - _INDEXES_SHOWN} more)" if len(extra) > _INDEXES_SHOWN else ""
        plural = len(extra) > 1
        warnings.append(
            (
                "extra_fields",
                f"row key{'s' if plural else ''} {names}{more} {'are' if plural else 'is'} dropped by the pipeline",
            )
        )
    if "messages" not in obj:
        errors.append(("missing_messages", "the row has no `messages` key"))
        return verdict
    messages = obj["messages"]
    if type(messages) is not list:
        errors.append(("messages_not_list", f"`messages` is {_kind(messages)}, not an array"))
        return verdict
    if len(messages) < 2:
        errors.append(("too_few_messages", f"the conversation has {len(messages)} message(s); at least 2 are needed"))

    found: dict[str, list[int]] = {}
    unknown_keys: list[str] = []
    bad_roles: list[str] = []
    bad_weights: list[str] = []
    roles: list[str] = []
    contents: list[str] = []
    extras: list[tuple[object, object]] = []
    has_extras = False
    for i, m in enumerate(messages):
        if type(m) is not dict:
            found.setdefault("message_not_object", []).append(i)
            continue
        if len(m) > 2 or "role" not in m or "content" not in m:
            for k in m:
                if k not in MESSAGE_KEYS:
                    found.setdefault("unknown_key", []).append(i)
                    if len(unknown_keys) < _INDEXES_SHOWN:
                        unknown_keys.append(_short(k))
        if "role" not in m:
            found.setdefault("missing_role", []).append(i)
        else:
            role = m["role"]
            if type(role) is str and role in ROLES:
                roles.append(role)
            else:
                found.setdefault("unknown_role", []).append(i)
                if len(bad_roles) < _INDEXES_SHOWN:
                    bad_roles.append(_short(role))
        content = m.get("content")
        if content is None:
            found.setdefault("missing_content", []).append(i)
        elif type(content) is not str:
            found.setdefault("content_not_string", []).append(i)
        elif not content or content.isspace():
            found.setdefault("empty_content", []).append(i)
        else:
            contents.append(content)
        name, weight = m.get("name"), m.get("weight")
        if "weight" in m and not (type(weight) is int and weight in (0, 1)):
            found.setdefault("_invalid_weight", []).append(i)
            if len(bad_weights) < _INDEXES_SHOWN:
                bad_weights.append(_scalar(weight))
        if name is not None or weight is not None:
            has_extras = True
        extras.append((name if type(name) is str else (_kind(name), _scalar(name)), (_kind(weight), _scalar(weight))))

    # One issue per code, in the order of the codes list (deterministic).
    details = {
        "message_not_object": "is not an object",
        "missing_role": "has no `role`",
        "unknown_role": f"has a role other than system, user, assistant ({', '.join(bad_roles)})",
        "missing_content": "has no `content` (absent or null)",
        "content_not_string": "has a `content` that is not a string",
        "empty_content": "has an empty or whitespace-only `content`",
        "unknown_key": f"has keys other than role, content, name, weight ({', '.join(unknown_keys)})",
    }
    for code, detail in details.items():
        if code in found:
            idx = sorted(set(found[code]))
            errors.append((code, f"{_indexes(idx)} {detail}"))
    if "_invalid_weight" in found:
        warnings.append(
            (
                "invalid_weight",
                f"{_indexes(found['_invalid_weight'])} has a `weight` other than 0 or 1 ({', '.join(bad_weights)})",
            )
        )
    structurally_sound = len(roles) == len(messages) >= 2
    if structurally_sound:
        pattern = patterns(tuple(roles))
        errors.extend(pattern.errors)
        if pattern.last_not_assistant:
            warnings.append(("last_not_assistant", f"the last message is from the {roles[-1]}, not the assistant"))
        verdict.pattern = pattern
    verdict.roles = tuple(roles)
    verdict.contents = contents
    verdict.extras = tuple(extras) if has_extras else ()
    return verdict


class DuplicateIndex:
    """Remembers the 64-bit hashes of the rows seen, to name the line a duplicate repeats.

    A Python set (batch membership tests run in C) plus the hashes and lines in arrival order (to
    find the earlier line of a listed duplicate). Memory: about 80 bytes a remembered row, and it
    stops remembering new rows after `max_rows` (it still finds duplicates of those it holds).
    """

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max(0, max_rows)
        self.full = False
        self._set: set[int] = set()
        self._keys = array("Q")
        self._lines = array("Q")

    @property
    def size(self) -> int:
        return len(self._set)

    def earlier_line(self, key: int) -> int:
        """The line that first had `key` (a linear scan in C: call it only for duplicates you list)."""
        return int(self._lines[self._keys.index(key)])

    def add_new(self, keys: list[int], first_line: int) -> bool:
        """Remember hashes of rows on consecutive lines if none was seen before (True), else change nothing."""
        seen = self._set
        before = len(seen)
        if before + len(keys) > self.max_rows or not seen.isdisjoint(keys):
            return False
        seen.update(keys)
        if len(seen) - before != len(keys):  # a repeat within the batch
            seen.difference_update(keys)
            return False
        self._keys.extend(keys)
        self._lines.extend(range(first_line, first_line + len(keys)))
        return True

    def add_many(self, keys: array[int], lines: array[int]) -> list[int]:
        """`add` each (key, line) in order; the positions of the keys seen before (bulk in C when there are none)."""
        seen = self._set
        if len(seen) + len(keys) <= self.max_rows and seen.isdisjoint(keys):
            before = len(seen)
            seen.update(keys)
            if len(seen) - before == len(keys):
                self._keys.extend(keys)
                self._lines.extend(lines)
                return []
            seen.difference_update(keys)  # a repeat among the new keys: none was there before
        return [i for i, (key, line) in enumerate(zip(keys, lines, strict=True)) if not self.add(key, line)]

    def add(self, key: int, line: int) -> bool:
        """Remember one hash; False if it was seen before."""
        if key in self._set:
            return False
        if len(self._set) < self.max_rows:
            self._set.add(key)
            self._keys.append(key)
            self._lines.append(line)
        else:
            self.full = True
        return True

    @property
    def memory_bytes(self) -> int:
        """Approximate: set slots and int objects, plus the two arrays."""
        return len(self._set) * 70 + (len(self._keys) + len(self._lines)) * 8


# ------------------------------------------------------------------------------------------ tokens


class _TokenizerCounter:
    """Exact token counts with a real tokenizer (transformers imported only when configured)."""

    def __init__(self, name: str) -> None:
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # any load failure is a configuration problem for the caller
            raise ConfigError(f"cannot load tokenizer {name!r}: {type(exc).__name__}: {exc}") from exc
        self.name = name
        self.templated = bool(getattr(self.tokenizer, "chat_template", None))
        self.template_failures = 0

    def _ids(self, encoded: Any) -> int:
        if hasattr(encoded, "keys") and "input_ids" in encoded:
            encoded = encoded["input_ids"]
        return len(encoded)

    def count(self, roles: Sequence[str], contents: Sequence[str], assistant: slice) -> tuple[int, int]:
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
        asst = sum(len(tok.encode(c, add_special_tokens=False)) for c in contents[assistant])
        return row, asst


# --------------------------------------------------------------------------------------- validation


class _Tally:
    """Issues (lists capped, counts exact) and per-row statistics over valid rows."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.errors: list[Issue] = []
        self.warnings: list[Issue] = []
        self.error_counts: dict[str, int] = {}
        self.warning_counts: dict[str, int] = {}
        self.first_warning_lines: dict[str, int | None] = {}  # (merging parts keeps the codes' order)

    def error(self, line: int | None, code: str, message: str) -> None:
        self.error_counts[code] = self.error_counts.get(code, 0) + 1
        if len(self.errors) < self.cap:
            self.errors.append(Issue(line, code, message))

    @property
    def listing_warnings(self) -> bool:
        """Whether the next warning still makes it into the (capped) list."""
        return len(self.warnings) < self.cap

    def warning(self, line: int | None, code: str, message: str) -> None:
        n = self.warning_counts.get(code)
        if n is None:
            self.first_warning_lines[code] = line
            n = 0
        self.warning_counts[code] = n + 1
        if len(self.warnings) < self.cap:
            self.warnings.append(Issue(line, code, message))


def _p95(histogram: dict[int, int], total: int) -> int | None:
    if not total:
        return None
    rank = math.ceil(0.95 * total)  # nearest-rank percentile
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return value
    return max(histogram)


def _parse_error(line: bytes, exc: ValueError) -> tuple[str, str]:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return "invalid_utf8", f"the line is not valid UTF-8 (byte {bad.start + 1}: {bad.reason})"
    detail = re.sub(r": line \d+ column (\d+) \(char \d+\)$", r" (column \1)", str(exc))
    doc, pos = getattr(exc, "doc", None), getattr(exc, "pos", None)
    if isinstance(doc, str) and isinstance(pos, int) and doc[pos : pos + 9].lstrip("-").startswith(("NaN", "Infinity")):
        detail += "; NaN and Infinity are not JSON (RFC 8259)"
    return "invalid_json", f"the line is not valid JSON: {detail}"


# The fast path: msgspec decodes and type-checks the common well-formed row in C (known roles, string
# contents, no unknown keys), and the checks and statistics of a whole batch of such rows run as
# C-level passes over flat lists, so almost no Python runs per row. A batch with anything else in it
# (a blank line, a row msgspec refuses, a bad order, an empty content) goes to the slow path, which
# alone decides what is wrong. Without msgspec every row takes the slow path: same reports, slower.
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
_HASH_ON_A_THREAD = len(os.sched_getaffinity(0)) > 1 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) > 1
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


def _estimate_row_tokens(line: bytes, prompt: object, prompt_id: object) -> int:
    """ceil(bytes / 4) of the row's JSON less its `prompt` and `prompt_id` (the pipeline drops them)."""
    size = len(line)
    if type(prompt) is str:
        size -= len(prompt)
    if type(prompt_id) is str:
        size -= len(prompt_id)
    return -(-size // ESTIMATE_BYTES_PER_TOKEN)


class _Digest:
    """SHA-256 of the raw stream, computed on a second thread when the stream is big and a second core exists.

    hashlib releases the GIL on large updates, so on a machine with a spare core the digest costs
    the validation nothing; chunks go over in lists of about 1 MiB, through a bounded queue.
    """

    PIECE = 1 << 20

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._queue: queue.Queue[list[bytes] | None] | None = None
        self._thread: threading.Thread | None = None

    def update(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._pending_len += len(chunk)
        if self._pending_len >= self.PIECE:
            self._send(self._pending)
            self._pending, self._pending_len = [], 0

    def _send(self, pieces: list[bytes]) -> None:
        if not _HASH_ON_A_THREAD:
            for piece in pieces:
                self._sha.update(piece)
            return
        if self._queue is None:
            self._queue = queue.Queue(maxsize=8)
            self._thread = threading.Thread(target=self._work, name="validation-sha256", daemon=True)
            self._thread.start()
        self._queue.put(pieces)

    def _work(self) -> None:
        assert self._queue is not None
        while (pieces := self._queue.get()) is not None:
            for piece in pieces:
                self._sha.update(piece)

    def close(self) -> None:
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None

    def hexdigest(self) -> str:
        self.close()
        for piece in self._pending:
            self._sha.update(piece)
        self._pending = []
        return self._sha.hexdigest()


@dataclass
class _Part:
    """The outcome of validating a part of a file on its own (lines numbered from 1), for `_Run.merge`."""

    lines: int
    sums: tuple[int, int, int, int, int, int]  # rows, valid rows, blank lines, messages, tokens, assistant tokens
    extremes: tuple[int, int, int, int]  # min and max messages, min and max tokens
    tok_hist: dict[int, int]
    errors: list[Issue]
    error_counts: dict[str, int]
    warnings: list[Issue]  # the first ones (capped), duplicates left out
    warning_counts: dict[str, int]  # duplicates left out
    first_warning_lines: dict[str, int | None]
    keys: array[int]  # duplicate keys of the valid rows, in line order
    key_lines: array[int]


class _Run:
    """One validation: issues, statistics over valid rows, the duplicate index."""

    def __init__(
        self,
        options: ValidationOptions,
        *,
        defer_duplicates: bool = False,
        patterns: dict[tuple[str, ...], _RolePattern] | None = None,
    ) -> None:
        self.options = options
        self.counter = _TokenizerCounter(options.tokenizer) if options.tokenizer else None
        self.tally = _Tally(max(0, options.max_listed_errors))
        self.dup = DuplicateIndex(options.duplicate_tracking_rows)
        self.fast = _decode_row is not None and _use_fast_path
        self.rows = self.valid_rows = self.blank = 0
        self.msg_min = self.tok_min = 1 << 62
        self.msg_max = self.msg_sum = self.tok_max = self.tok_sum = self.asst_sum = 0
        self.tok_hist: Counter[int] = Counter()
        self._patterns: dict[tuple[str, ...], _RolePattern] = {} if patterns is None else patterns
        # A part of a file validated on its own (`_validate_part`) cannot know the rows before it: it
        # keeps the duplicate keys of its valid rows, in line order, for `merge` to check in order.
        self.deferred_keys: array[int] | None = array("Q") if defer_duplicates else None
        self.deferred_lines: array[int] = array("Q")

    def patterns(self, roles: tuple[str, ...]) -> _RolePattern:
        found = self._patterns.get(roles)
        if found is None:
            found = _role_pattern(roles)
            if len(self._patterns) < _PATTERN_CACHE_SIZE:
                self._patterns[roles] = found
        return found

    def feed(self, first: int, lines: list[bytes | None]) -> None:
        if not self.fast:
            self._slow(first, lines)
            return
        for start in range(0, len(lines), _BATCH_ROWS):
            batch = lines[start : start + _BATCH_ROWS]
            if not self._fast_batch(first + start, batch):
                self._slow(first + start, batch)

    def _fast_batch(self, first: int, lines: list[bytes | None]) -> bool:
        """Take the batch if every row in it is valid (else change nothing and return False)."""
        assert _decode_row is not None
        try:
            decoded = list(map(_decode_row, lines))
        except Exception:  # any refusal (even a RecursionError): the slow path names the problem
            return False
        message_lists = list(map(_messages_of, decoded))
        counts = list(map(len, message_lists))
        role_tuples = list(map(tuple, map(map, repeat(_role_of), message_lists)))
        found = list(map(self._patterns.get, role_tuples))
        patterns: list[_RolePattern] = list(map(self.patterns, role_tuples)) if None in found else found  # type: ignore[assignment]
        if any(map(_errors_of, patterns)):
            return False
        flat = list(chain.from_iterable(message_lists))
        roles = list(chain.from_iterable(role_tuples))
        contents = list(map(_content_of, flat))
        if not all(contents) or any(map(str.isspace, contents)):
            return False

        # Every row of the batch is valid.
        n_rows = len(lines)
        if self.counter is None:
            row_bytes = map(
                sub,
                map(sub, map(len, lines), map(len, map(_prompt_of, decoded))),  # type: ignore[arg-type]
                map(len, map(_prompt_id_of, decoded)),
            )
            per_token = ESTIMATE_BYTES_PER_TOKEN
            row_tokens = list(map(floordiv, map(add, row_bytes, repeat(per_token - 1)), repeat(per_token)))
            answers = list(compress(contents, map(eq, roles, repeat("assistant"))))
            asst_tokens = sum(map(len, answers))  # UTF-8 bytes (tokens at the report): characters, plus
            if not all(map(str.isascii, answers)):  # the extra bytes of the non-ASCII answers
                wide = "".join(compress(answers, map(not_, map(str.isascii, answers))))
                asst_tokens += len(wide.encode()) - len(wide)
        else:
            row_tokens, asst_tokens = [], 0
            ends = list(accumulate(counts))
            for pattern, s, e in zip(patterns, [0, *ends[:-1]], ends, strict=True):
                row, answer = self.counter.count(pattern.roles, contents[s:e], pattern.assistant_slice)
                row_tokens.append(row)
                asst_tokens += answer
        self.rows += n_rows
        self.valid_rows += n_rows
        self.msg_sum += sum(counts)
        self.msg_min = min(self.msg_min, min(counts))
        self.msg_max = max(self.msg_max, max(counts))
        self.tok_sum += sum(row_tokens)
        self.asst_sum += asst_tokens
        self.tok_min = min(self.tok_min, min(row_tokens))
        longest = max(row_tokens)
        self.tok_max = max(self.tok_max, longest)
        self.tok_hist.update(row_tokens)

        keys = list(map(and_, map(hash, message_lists), repeat(_HASH_MASK)))
        notes: list[tuple[int, int, str, int]] = []  # (row, order, code, detail), in the slow path's order
        if any(map(_last_not_assistant_of, patterns)):
            for i in compress(range(n_rows), map(_last_not_assistant_of, patterns)):
                notes.append((i, 0, "last_not_assistant", 0))
        max_seq = self.options.max_seq_length
        if longest > max_seq:
            for i in compress(range(n_rows), map(gt, row_tokens, repeat(max_seq))):
                notes.append((i, 1, "too_long", row_tokens[i]))
        if self.deferred_keys is not None:
            self.deferred_keys.extend(keys)
            self.deferred_lines.extend(range(first, first + n_rows))
        elif not self.dup.add_new(keys, first):
            for i, key in enumerate(keys):
                if not self.dup.add(key, first + i):
                    notes.append((i, 2, "duplicate_row", key))
        for i, _, code, detail in sorted(notes):
            if code == "last_not_assistant":
                self.tally.warning(first + i, code, _last_not_assistant_message(patterns[i].roles))
            elif code == "too_long":
                self.tally.warning(first + i, code, _too_long_message(detail, max_seq))
            else:
                self._duplicate(first + i, detail)
        return True

    def _duplicate(self, lineno: int, key: int) -> None:
        tally = self.tally
        if tally.listing_warnings:
            tally.warning(lineno, "duplicate_row", f"the same conversation as line {self.dup.earlier_line(key)}")
        else:
            tally.warning(lineno, "duplicate_row", "the same conversation as an earlier line")

    def _slow(self, first: int, lines: list[bytes | None]) -> None:
        tally = self.tally
        for lineno, line in zip(count(first), lines):
            if line is None:
                self.rows += 1
                tally.error(
                    lineno, "line_too_long", f"the line is longer than {self.options.max_line_bytes} bytes; not parsed"
                )
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                if not line.strip(b" \t\r"):
                    self.blank += 1
                    tally.warning(lineno, "blank_line", "blank line skipped")
                else:
                    self.rows += 1
                    tally.error(lineno, *_parse_error(line, exc))
                continue
            self.rows += 1
            verdict = _inspect_row(obj, self.patterns)
            for code, message in verdict.warnings:
                tally.warning(lineno, code, message)
            if verdict.errors:
                for code, message in verdict.errors:
                    tally.error(lineno, code, message)
                continue
            assert verdict.pattern is not None
            self._accept(lineno, line, obj, verdict)

    def _accept(self, lineno: int, line: bytes, obj: dict[str, Any], verdict: _RowVerdict) -> None:
        """Statistics, length and duplicate checks of one valid row (the slow path's side)."""
        pattern, contents = verdict.pattern, verdict.contents
        assert pattern is not None
        n = len(contents)
        if self.counter is None:
            row_tokens = _estimate_row_tokens(line, obj.get("prompt"), obj.get("prompt_id"))
            asst_tokens = sum(len(c.encode()) for c in contents[pattern.assistant_slice])  # bytes, until the report
        else:
            row_tokens, asst_tokens = self.counter.count(pattern.roles, contents, pattern.assistant_slice)
        self.valid_rows += 1
        self.msg_sum += n
        self.msg_min = min(self.msg_min, n)
        self.msg_max = max(self.msg_max, n)
        self.tok_sum += row_tokens
        self.asst_sum += asst_tokens
        self.tok_min = min(self.tok_min, row_tokens)
        self.tok_max = max(self.tok_max, row_tokens)
        self.tok_hist[row_tokens] += 1
        max_seq = self.options.max_seq_length
        if row_tokens > max_seq:
            self.tally.warning(lineno, "too_long", _too_long_message(row_tokens, max_seq))
        key = _row_key(pattern.roles, contents, verdict.extras)
        if self.deferred_keys is not None:
            self.deferred_keys.append(key)
            self.deferred_lines.append(lineno)
        elif not self.dup.add(key, lineno):
            self._duplicate(lineno, key)

    def part(self, lines: int) -> _Part:
        """What `merge` needs of this run over a part of `lines` lines (numbered from 1)."""
        assert self.deferred_keys is not None
        tally = self.tally
        return _Part(
            lines=lines,
            sums=(self.rows, self.valid_rows, self.blank, self.msg_sum, self.tok_sum, self.asst_sum),
            extremes=(self.msg_min, self.msg_max, self.tok_min, self.tok_max),
            tok_hist=dict(self.tok_hist),
            errors=tally.errors,
            error_counts=tally.error_counts,
            warnings=tally.warnings,
            warning_counts=tally.warning_counts,
            first_warning_lines=tally.first_warning_lines,
            keys=self.deferred_keys,
            key_lines=self.deferred_lines,
        )

    def merge(self, part: _Part, offset: int) -> None:
        """Add a part validated on its own whose line 1 is line `offset + 1` here, as if its rows came now.

        Its duplicates are checked here, in line order, and their warnings take the place in the
        list (and the counts' order) that the one-pass validation gives them: after the other
        warnings of their line.
        """
        rows, valid_rows, blank, msg_sum, tok_sum, asst_sum = part.sums
        msg_min, msg_max, tok_min, tok_max = part.extremes
        self.rows += rows
        self.valid_rows += valid_rows
        self.blank += blank
        self.msg_sum += msg_sum
        self.tok_sum += tok_sum
        self.asst_sum += asst_sum
        self.msg_min = min(self.msg_min, msg_min)
        self.msg_max = max(self.msg_max, msg_max)
        self.tok_min = min(self.tok_min, tok_min)
        self.tok_max = max(self.tok_max, tok_max)
        self.tok_hist.update(part.tok_hist)
        tally = self.tally
        for code, n in part.error_counts.items():
            tally.error_counts[code] = tally.error_counts.get(code, 0) + n
        room = tally.cap - len(tally.errors)
        if room > 0:
            tally.errors.extend(Issue(i.line + offset, i.code, i.message) for i in part.errors[:room])  # type: ignore[operator]

        key_lines = part.key_lines
        duplicates = self.dup.add_many(part.keys, array("Q", map(add, key_lines, repeat(offset))))
        new_codes = [code for code in part.warning_counts if code not in tally.warning_counts]
        first_lines = {code: part.first_warning_lines[code] or 0 for code in new_codes}  # warnings have lines
        if duplicates and "duplicate_row" not in tally.warning_counts:
            first_dup = key_lines[duplicates[0]]  # a duplicate comes last among the warnings of its line
            at = sum(1 for code in new_codes if first_lines[code] <= first_dup)
            new_codes.insert(at, "duplicate_row")
            first_lines["duplicate_row"] = first_dup
        for code in new_codes:
            tally.warning_counts[code] = 0
            tally.first_warning_lines[code] = first_lines[code] + offset
        for code, n in part.warning_counts.items():
            tally.warning_counts[code] += n
        listed, shown, cap = part.warnings, 0, tally.cap
        for i in duplicates:
            line = key_lines[i]
            while shown < len(listed) and listed[shown].line <= line:  # type: ignore[operator]
                if len(tally.warnings) < cap:
                    w = listed[shown]
                    tally.warnings.append(Issue(w.line + offset, w.code, w.message))  # type: ignore[operator]
                shown += 1
            self._duplicate(line + offset, part.keys[i])
        room = cap - len(tally.warnings)
        if room > 0:
            tally.warnings.extend(Issue(w.line + offset, w.code, w.message) for w in listed[shown : shown + room])  # type: ignore[operator]

    def report(self, *, size: int, sha256: str) -> ValidationReport:
        options, tally, valid_rows = self.options, self.tally, self.valid_rows
        if self.rows == 0:
            tally.error(None, "empty_file", "the file has no rows")
        elif valid_rows < options.min_rows:
            tally.error(
                None,
                "too_few_rows",
                f"{valid_rows} valid rows; at least {options.min_rows} are needed (the pipeline's minimum)",
            )
        have = valid_rows > 0
        stats: dict[str, Any] = {
            "rows": self.rows,
            "valid_rows": valid_rows,
            "blank_lines": self.blank,
            "bytes": size,
            "sha256": sha256,
            "messages_per_row": {
                "min": self.msg_min if have else None,
                "mean": round(self.msg_sum / valid_rows, 3) if have else None,
                "max": self.msg_max if have else None,
            },
            "tokens_per_row": {
                "min": self.tok_min if have else None,
                "mean": round(self.tok_sum / valid_rows, 3) if have else None,
                "p95": _p95(self.tok_hist, valid_rows),
                "max": self.tok_max if have else None,
            },
            "total_tokens": self.tok_sum,
            "total_assistant_tokens": self.asst_sum if self.counter else -(-self.asst_sum // ESTIMATE_BYTES_PER_TOKEN),
            "token_count_method": f"tokenizer:{options.tokenizer}" if self.counter else "estimate",
            "token_count_note": _token_note(self.counter),
            "p95_method": "exact (nearest rank) over a histogram of per-row token counts, one entry per distinct count",
            "duplicate_check": {
                "method": "64-bit hash of the conversation (roles, contents, names, weights) in a bounded set",
                "tracked_rows": self.dup.size,
                "max_tracked_rows": self.dup.max_rows,
                "complete": not self.dup.full,
                "memory_bytes": self.dup.memory_bytes,
            },
        }
        if self.counter is not None and self.counter.template_failures:
            stats["chat_template_failures"] = self.counter.template_failures
        return ValidationReport(
            valid=not tally.error_counts,
            rows=self.rows,
            valid_rows=valid_rows,
            errors=tally.errors,
            error_counts=tally.error_counts,
            warnings=tally.warnings,
            warning_counts=tally.warning_counts,
            stats=stats,
        )


def _last_not_assistant_message(roles: tuple[str, ...]) -> str:
    return f"the last message is from the {roles[-1]}, not the assistant"


def _too_long_message(tokens: int, max_seq: int) -> str:
    return f"about {tokens} tokens, over max_seq_length {max_seq}; the pipeline truncates it"


def _token_note(counter: _TokenizerCounter | None) -> str:
    if counter is None:
        return (
            f"estimate (no tokenizer): a row is ceil(bytes of its JSON line, less its prompt and prompt_id, "
            f"/ {ESTIMATE_BYTES_PER_TOKEN}); assistant tokens are ceil(UTF-8 bytes of all assistant contents "
            f"/ {ESTIMATE_BYTES_PER_TOKEN})"
        )
    how = (
        "the tokenizer's chat template over each row"
        if counter.templated
        else "the contents joined by newlines (no chat template)"
    )
    return f"exact: {how}; assistant tokens are the assistant contents alone"


def validate_chunks(chunks: Iterable[bytes], options: ValidationOptions = ValidationOptions()) -> ValidationReport:
    """Validate a JSONL stream given as byte chunks of any size (chunking never changes the report)."""
    run = _Run(options)
    digest = _Digest()
    size = 0

    def metered() -> Iterator[bytes]:
        nonlocal size
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
            yield chunk

    try:
        for first, lines in line_batches(metered(), max_line_bytes=options.max_line_bytes):
            run.feed(first, lines)
    finally:
        digest.close()
    return run.report(size=size, sha256=digest.hexdigest())


def validate_path(
    path: str | Path, options: ValidationOptions = ValidationOptions(), *, processes: int | None = None
) -> ValidationReport:
    """Validate a local file, read in chunks. Raises OSError when it cannot be read.

    With `processes` > 1 (None: `planned_processes`), a regular file is validated in parts by that
    many forked worker processes while this one reads, hashes and merges; 1 is one pass here. The
    report is the same whatever the processes.
    """
    with Path(path).open("rb") as f:
        n = planned_processes(f, options) if processes is None else max(1, processes)
        if n > 1 and not options.tokenizer and _is_regular(f):
            return _validate_in_parts(f, options, processes=n)
        return validate_chunks(iter(partial(f.read, READ_CHUNK_BYTES), b""), options)


# ------------------------------------------------------------------------------- parallel (a file)
#
# A regular file can be cut into parts at line starts and the parts validated on their own, each
# numbering its lines from 1 and keeping its valid rows' duplicate keys instead of checking them
# (`_Run(defer_duplicates=True)`). This process merges the parts in file order (`_Run.merge`): it
# adds the counts, renumbers the issues, checks the duplicate keys against all earlier rows and puts
# each duplicate warning where one pass puts it, so the report is the one `validate_chunks` gives.
# It also reads the whole file once, in order, for the size and the SHA-256. Parts go round-robin to
# worker processes forked at the start (each reads its parts from the inherited file descriptor; a
# fork shares this process's str hash secret, so the duplicate keys agree); a worker is at most about
# one part ahead (a part's result does not fit in the pipe until this process takes it), so memory
# stays bounded. A worker that fails costs speed, not the report: this process redoes its part.

PART_BYTES = 4 * 1024 * 1024
PARALLEL_MIN_BYTES = 32 * 1024 * 1024
MAX_PROCESSES = 4


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover


def _is_regular(f: BinaryIO) -> bool:
    try:
        return stat.S_ISREG(os.fstat(f.fileno()).st_mode)
    except (OSError, ValueError):  # pragma: no cover - not a real file
        return False


def planned_processes(f: BinaryIO | str | Path, options: ValidationOptions = ValidationOptions()) -> int:
    """How many processes validate this file in `validate_path`: one (this one), unless the file is big
    (>= 32 MiB), no tokenizer is configured, workers can be forked (Linux, no other thread running
    here) and more than one CPU is usable; then one worker per usable CPU, at most 4 (this process
    then reads the file for the digest and merges)."""
    if options.tokenizer or not _use_fast_path or _decode_row is None:
        return 1
    if "fork" not in multiprocessing.get_all_start_methods() or threading.active_count() > 1:
        return 1
    try:
        size = Path(f).stat().st_size if isinstance(f, (str, Path)) else os.fstat(f.fileno()).st_size
    except (OSError, ValueError):
        return 1
    if size < PARALLEL_MIN_BYTES:
        return 1
    return max(1, min(_usable_cpus(), MAX_PROCESSES))


def _part_bounds(fd: int, size: int, part_bytes: int) -> list[tuple[int, int]]:
    """Cut [0, size) into ranges of about `part_bytes` that start at a line start (just after a newline)."""
    starts = [0]
    nominal = part_bytes
    while nominal < size:
        pos = nominal - 1
        found = -1
        while found < 0:
            block = os.pread(fd, READ_CHUNK_BYTES, pos)
            if not block:
                break
            at = block.find(b"\n")
            if at >= 0:
                found = pos + at
            pos += len(block)
        if found < 0 or found + 1 >= size:
            break
        starts.append(found + 1)
        nominal = found + 1 + part_bytes
    return list(pairwise([*starts, size]))


def _read_range(fd: int, start: int, end: int) -> Iterator[bytes]:
    """The bytes [start, end) of an open file, in chunks (`pread`: the file's offset is left alone)."""
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(READ_CHUNK_BYTES, end - pos), pos)
        if not chunk:
            return
        pos += len(chunk)
        yield chunk


def _validate_part(
    chunks: Iterable[bytes],
    options: ValidationOptions,
    *,
    at_start: bool,
    patterns: dict[tuple[str, ...], _RolePattern],
) -> _Part:
    run = _Run(options, defer_duplicates=True, patterns=patterns)
    lines = 0
    for first, batch in line_batches(chunks, max_line_bytes=options.max_line_bytes, bom=at_start):
        run.feed(first, batch)
        lines = first + len(batch) - 1
    return run.part(lines)


def _work_on_parts(fd: int, bounds: list[tuple[int, int]], options: ValidationOptions, conn: Connection) -> None:
    """A worker: validate these parts of the file (open as `fd`, inherited) in order and send each outcome."""
    patterns: dict[tuple[str, ...], _RolePattern] = {}
    try:
        for start, end in bounds:
            conn.send(_validate_part(_read_range(fd, start, end), options, at_start=start == 0, patterns=patterns))
    except Exception:  # any failure (a read error, a broken pipe): the parent redoes what it did not get
        return
    finally:
        conn.close()


def _validate_in_parts(
    f: BinaryIO, options: ValidationOptions, *, processes: int, part_bytes: int = PART_BYTES
) -> ValidationReport:
    """Validate an open regular file in parts, by `processes` forked workers (1: all here, still in parts).

    With workers, this process only reads the file for the digest and merges what they send.
    """
    fd = f.fileno()
    size = os.fstat(fd).st_size
    bounds = _part_bounds(fd, size, max(1, part_bytes))
    n = max(1, min(processes, len(bounds)))
    if "fork" not in multiprocessing.get_all_start_methods():  # pragma: no cover - Windows
        n = 1
    owners = [0] * len(bounds) if n == 1 else [1 + k % n for k in range(len(bounds))]  # 0: this process
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    alive = [True] * (n + 1)
    if n > 1:
        for stream in (sys.stdout, sys.stderr):  # a forked worker flushes its copy of what is pending
            if stream is not None:
                stream.flush()
        context = multiprocessing.get_context("fork")
        for w in range(1, n + 1):
            receive, send = context.Pipe(duplex=False)
            mine = [b for b, owner in zip(bounds, owners, strict=True) if owner == w]
            proc = context.Process(
                target=_work_on_parts, args=(fd, mine, options, send), name=f"validation-part-{w}", daemon=True
            )
            proc.start()
            send.close()
            workers.append((proc, receive))
    run = _Run(options)
    sha = hashlib.sha256()
    patterns: dict[tuple[str, ...], _RolePattern] = {}
    offset = 0
    read = 0

    def digested(chunks: Iterator[bytes]) -> Iterator[bytes]:
        nonlocal read
        for chunk in chunks:
            sha.update(chunk)
            read += len(chunk)
            yield chunk

    try:
        for (start, end), owner in zip(bounds, owners, strict=True):
            part: _Part | None = None
            if owner == 0:
                part = _validate_part(
                    digested(_read_range(fd, start, end)), options, at_start=start == 0, patterns=patterns
                )
            else:
                for _ in digested(_read_range(fd, start, end)):  # while the worker validates it
                    pass
                if alive[owner]:
                    try:
                        part = workers[owner - 1][1].recv()
                    except (EOFError, OSError):
                        alive[owner] = False
                if part is None:
                    part = _validate_part(_read_range(fd, start, end), options, at_start=start == 0, patterns=patterns)
            run.merge(part, offset)
            offset += part.lines
    finally:
        for worker, conn in workers:
            conn.close()
            worker.join(timeout=5)
            if worker.is_alive():  # pragma: no cover - it was blocked on a pipe nobody reads
                worker.terminate()
                worker.join()
    return run.report(size=read, sha256=sha.hexdigest())
