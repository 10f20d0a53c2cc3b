"""What `tunegrid doctor` found: one row per check (pass, warn or fail), as a table or as JSON.

Warnings never fail the run: the exit code is 1 only when a check failed. Nothing here holds a token,
a key or a full webhook URL; the checks only ever see the parts of an answer they judge.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.domain.resources import Finding
from tunegrid.render import table


class Status(enum.StrEnum):
    PASS = "pass"  # noqa: S105 (a check status, not a password)
    WARN = "warn"
    FAIL = "fail"


_RANK = {Status.PASS: 0, Status.WARN: 1, Status.FAIL: 2}


def worst(statuses: Iterable[Status]) -> Status:
    return max(statuses, key=_RANK.__getitem__, default=Status.PASS)


@dataclass(frozen=True)
class CheckResult:
    """One row. `area` groups rows (workspace, roles, model, quota, component, event grid); `fix` says
    what to run or set when the row is not a pass."""

    area: str
    check: str
    status: Status
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        out = {"area": self.area, "check": self.check, "status": self.status.value, "detail": self.detail}
        if self.fix:
            out["fix"] = self.fix
        return out


def from_findings(area: str, check: str, findings: Sequence[Finding], *, ok: str, fix: str = "") -> CheckResult:
    """A row from `model_lifecycle` findings: an error fails it, a warning warns, none passes with `ok`."""
    errors = [f.message for f in findings if f.is_error]
    warnings = [f.message for f in findings if not f.is_error]
    if errors:
        return CheckResult(area, check, Status.FAIL, "; ".join(errors + warnings), fix)
    if warnings:
        return CheckResult(area, check, Status.WARN, "; ".join([ok, *warnings]), fix)
    return CheckResult(area, check, Status.PASS, ok)


@dataclass(frozen=True)
class Report:
    """Every row, and what was checked (names and ids only)."""

    results: tuple[CheckResult, ...]
    target: Mapping[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(r.status is Status.FAIL for r in self.results)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def counts(self) -> dict[str, int]:
        return {s.value: sum(1 for r in self.results if r.status is s) for s in Status}

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.failed,
            "counts": self.counts(),
            "target": dict(self.target),
            "checks": [r.to_dict() for r in self.results],
        }

    def to_text(self) -> str:
        lines: list[str] = []
        where = self.target.get("workspace_id") or "(no workspace)"
        region = self.target.get("region") or "unknown region"
        lines.append(f"tunegrid doctor: {where} ({region})")
        sources = self.target.get("sources") or []
        if sources:
            lines.append(f"settings from: {', '.join(sources)}")
        lines.append("")
        rows = [("STATUS", "AREA", "CHECK", "DETAIL")]
        rows += [(r.status.value.upper(), r.area, r.check, r.detail) for r in self.results]
        lines += table(rows)
        fixes: dict[str, list[str]] = {}
        for r in self.results:
            if r.fix and r.status is not Status.PASS:
                fixes.setdefault(r.fix, []).append(f"{r.area} / {r.check}")
        if fixes:
            lines.append("")
            lines.append("to fix:")
            lines += [f"- {'; '.join(checks)}: {fix}" for fix, checks in fixes.items()]
        counts = self.counts()
        warnings = "warning" if counts["warn"] == 1 else "warnings"
        lines.append("")
        lines.append(f"{counts['pass']} passed, {counts['warn']} {warnings}, {counts['fail']} failed")
        return "\n".join(lines)
