"""Issues (capped lists, exact counts), the texts both paths give them, and the p95 of the report."""

from __future__ import annotations

import math
import re

from shared.domain.validation.report import Issue


class _Tally:
    """Issues: the lists capped, the counts exact (and where each warning code first appeared)."""

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


def _last_not_assistant_message(roles: tuple[str, ...]) -> str:
    return f"the last message is from the {roles[-1]}, not the assistant"


def _too_long_message(tokens: int, max_seq: int) -> str:
    return f"about {tokens} tokens, over max_seq_length {max_seq}; the pipeline truncates it"
