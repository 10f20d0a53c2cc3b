"""The loss curve of a run as a PNG (matplotlib is a local-kit package, never deployed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss_curve(status: dict[str, Any], path: Path) -> Path | None:
    """Train and eval loss against step, as a PNG; None when there is nothing to plot."""
    series = status.get("metrics_series") or {}
    curves = {k: v for k, v in series.items() if k in ("loss", "train_loss", "eval_loss") and v}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, points in sorted(curves.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"run {status['run_id']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
