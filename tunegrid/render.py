"""Plain-text layout shared by the commands: columns and label/value lines sized to their content."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

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
    saved = savings_line(report)
    if saved:
        lines.append(saved)
    if not rows:
        lines.insert(1, "(no endpoints)")
    return "\n".join(lines)


def savings_line(report: SweepReport) -> str:
    """The total saved by the sweep's endpoint deletes: billing stopped per hour, and what they cost idle."""
    s = report.savings
    if not s.endpoints:
        return ""
    verb = "would save" if report.dry_run else "saved"
    unpriced = s.endpoints - s.priced
    if not s.priced:
        return (
            f"total {verb}: unknown, no price is known for the {s.endpoints} idle endpoint(s) deleted (the local "
            f"backend, or no price for their size and region); they had run idle {s.idle_hours:,.1f} h"
        )
    tail = f"; {unpriced} more without a known price" if unpriced else ""
    return (
        f"total {verb}: ${s.usd_per_hour:,.2f} per hour from now on by deleting {s.endpoints} idle endpoint(s) "
        f"(they had run idle {s.idle_hours:,.1f} h, ${s.idle_usd:,.2f}){tail}"
    )


def gate_line(gate: Mapping[str, Any]) -> str:
    """The evaluation gate in one line: verdict, both scores, the rows used."""
    if not gate:
        return ""
    new, live = gate.get("new") or {}, gate.get("live") or {}
    if not new:
        return f"{gate.get('verdict')}: {'; '.join(gate.get('reasons') or [])}"
    scores = f"new ROUGE-L {new.get('rouge_l')}"
    scores += f" vs live {live.get('rouge_l')}" if live else " (first model on the endpoint: no live model)"
    losses = ""
    if new.get("eval_loss") is not None or live.get("eval_loss") is not None:
        losses = f", eval_loss {_loss(new.get('eval_loss'))}" + (f" vs {_loss(live.get('eval_loss'))}" if live else "")
    why = f": {'; '.join(gate['reasons'])}" if gate.get("reasons") else ""
    return f"{gate.get('verdict')}: {scores}{losses} over {gate.get('rows')} test rows{why}"


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def gate_samples(gate: Mapping[str, Any], *, width: int = 70, indent: str = "    ") -> list[str]:
    """A few answers side by side (new, live, reference), each cut to `width` characters."""

    def cut(text: Any) -> str:
        flat = " ".join(str(text or "").split())
        return flat if len(flat) <= width else flat[: width - 1] + "…"

    out = []
    for s in gate.get("samples") or []:
        out.append(f"{indent}row {s.get('row')}: {cut(s.get('prompt'))}")
        out.append(f"{indent}  new  ({s.get('new_rouge_l')}): {cut(s.get('new'))}")
        if "live" in s:
            out.append(f"{indent}  live ({s.get('live_rouge_l')}): {cut(s.get('live'))}")
        out.append(f"{indent}  reference: {cut(s.get('reference'))}")
    return out
