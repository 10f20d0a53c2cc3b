"""What a validation is asked (`ValidationOptions`) and what it answers (`ValidationReport`).

The error and warning codes are part of the interface: see docs/validation.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.domain.validation.tokens import TokenCounter

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

DEFAULT_DUPLICATE_TRACKING_ROWS = 1_048_576


@dataclass(frozen=True)
class ValidationOptions:
    max_line_bytes: int = 1_048_576
    max_seq_length: int = 2048
    token_counter: TokenCounter | None = None
    """Exact token counts (the caller loads the tokenizer); None estimates (and says so in stats)."""
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
