"""Plain-text layout shared by the commands: columns and label/value lines sized to their content."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.usecases.janitor import SweepReport

GAP = "  "


def table(rows: Iterable[Sequence[str]], *, indent: str = "") -> list[str]:
    """Rows as aligned columns, each as wide as its widest cell, two spaces apart.

    A header is just the first row; label/value lines are two-column rows."""
    cells = [[str(cell) for cell in row] for row in rows]
    if not cells:
        return []
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(max(map(len, cells)))]
    return [indent + GAP.join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]


def sweep_table(report: SweepReport) -> str:
    """Decisions as an aligned text table, with a one-line summary."""
    headers = ("KIND", "TARGET", "ACTION", "RULE", "LAST USE", "OUTCOME", "REASON")
    rows = [
        (
            d.kind,
            d.target,
            d.action,
            d.rule.value,
            d.last_use.strftime("%Y-%m-%d %H:%M:%S") if d.last_use else "-",
            d.outcome,
            d.reason,
        )
        for d in report.decisions
    ]
    lines = table([headers, *rows])
    mode = "dry run, nothing changed" if report.dry_run else "live"
    idle = report.policy.idle.total_seconds() / 60
    grace = report.policy.grace.total_seconds() / 60
    lines.append(
        f"sweep {report.sweep_id} ({mode}): {len(report.decisions)} decisions, {len(report.deletes)} deletes, "
        f"{len(report.failures)} failed; idle {idle:g} min, grace {grace:g} min, instance {report.policy.instance}"
    )
    if not rows:
        lines.insert(1, "(no endpoints)")
    return "\n".join(lines)
