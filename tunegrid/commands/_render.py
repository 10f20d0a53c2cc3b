"""Plain-text layout shared by the commands: columns and label/value lines sized to their content."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

GAP = "  "


def table(rows: Iterable[Sequence[str]], *, indent: str = "") -> list[str]:
    """Rows as aligned columns, each as wide as its widest cell, two spaces apart.

    A header is just the first row; label/value lines are two-column rows."""
    cells = [[str(cell) for cell in row] for row in rows]
    if not cells:
        return []
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(max(map(len, cells)))]
    return [indent + GAP.join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
