"""One validation (`_Run`): issues, statistics over valid rows, the duplicate index.

Every row goes through one strict JSON parse (orjson: RFC 8259, so NaN/Infinity are rejected).
A batch of rows that all decode into the fast path's structs and are valid is taken whole
(`_fast_batch`); any other batch is examined row by row by `_inspect_row`, which names every
problem. Both paths share the role-order rules and the per-row statistics, so they agree.

A run over a part of a file validated on its own (`defer_duplicates`) gives a `_Part`, and `merge`
adds parts in file order into the report one pass gives (the local kit's parallel path uses it).
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate, chain, compress, count, repeat
from operator import add, and_, eq, floordiv, gt, not_, sub
from typing import Any

import orjson

from shared.domain.validation import fastpath
from shared.domain.validation.fastpath import (
    _BATCH_ROWS,
    _HASH_MASK,
    _content_of,
    _decode_row,
    _errors_of,
    _last_not_assistant_of,
    _messages_of,
    _prompt_id_of,
    _prompt_of,
    _role_of,
    _row_key,
)
from shared.domain.validation.report import Issue, ValidationOptions, ValidationReport
from shared.domain.validation.rows import DuplicateIndex, _inspect_row, _role_pattern, _RolePattern, _RowVerdict
from shared.domain.validation.tally import _last_not_assistant_message, _p95, _parse_error, _Tally, _too_long_message
from shared.domain.validation.tokens import ESTIMATE_BYTES_PER_TOKEN, ESTIMATE_NOTE, _estimate_row_tokens

_PATTERN_CACHE_SIZE = 4096


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
        self.counter = options.token_counter
        self._template_failures_before = 0 if self.counter is None else self.counter.template_failures
        self.tally = _Tally(max(0, options.max_listed_errors))
        self.dup = DuplicateIndex(options.duplicate_tracking_rows)
        self.fast = _decode_row is not None and fastpath._use_fast_path
        self.rows = self.valid_rows = self.blank = 0
        self.msg_min = self.tok_min = 1 << 62
        self.msg_max = self.msg_sum = self.tok_max = self.tok_sum = self.asst_sum = 0
        self.tok_hist: Counter[int] = Counter()
        self._patterns: dict[tuple[str, ...], _RolePattern] = {} if patterns is None else patterns
        # A part of a file validated on its own (`tunegrid.validate_files`) cannot know the rows before it: it
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
        options, tally, valid_rows, counter = self.options, self.tally, self.valid_rows, self.counter
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
            "total_assistant_tokens": self.asst_sum if counter else -(-self.asst_sum // ESTIMATE_BYTES_PER_TOKEN),
            "token_count_method": f"tokenizer:{counter.name}" if counter else "estimate",
            "token_count_note": counter.note if counter else ESTIMATE_NOTE,
            "p95_method": "exact (nearest rank) over a histogram of per-row token counts, one entry per distinct count",
            "duplicate_check": {
                "method": "64-bit hash of the conversation (roles, contents, names, weights) in a bounded set",
                "tracked_rows": self.dup.size,
                "max_tracked_rows": self.dup.max_rows,
                "complete": not self.dup.full,
                "memory_bytes": self.dup.memory_bytes,
            },
        }
        failures = 0 if counter is None else counter.template_failures - self._template_failures_before
        if failures:
            stats["chat_template_failures"] = failures
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
