"""`runs`, `status RUN_ID`, `cancel RUN_ID`: where a run is and how training went, without logs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from shared.bootstrap import app_context
from shared.domain.runs import NEVER_LIVE
from tunegrid.render import gate_line, gate_samples, table


def _runs(args: argparse.Namespace) -> int:
    from shared.usecases.runs import list_runs

    rows = list_runs(app_context().ledger, limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ("run_id", "state", "dataset", "created_at", "updated_at", "model", "endpoint")
    widths = {"created_at": 19, "updated_at": 19}
    print("\n".join(table([cols, *([str(r[c])[: widths.get(c, 40)] for c in cols] for r in rows)])))
    if not rows:
        print("(no runs yet: upload a .jsonl to the training-data container)", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    from shared.usecases.runs import run_status
    from tunegrid.loss_curve import plot_loss_curve

    ctx = app_context()
    doc = run_status(ctx.ledger, ctx.backend, args.run_id)
    png = plot_loss_curve(doc, Path(args.plot_dir) / f"{args.run_id}-loss.png") if args.plot_dir else None
    if png is not None:
        ctx.blobs.upload("run-reports", f"{args.run_id}/loss.png", png.read_bytes(), content_type="image/png")
        doc["loss_curve"] = {"file": str(png), "blob": ctx.blobs.url("run-reports", f"{args.run_id}/loss.png")}
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
        return 0
    print(render_status(doc))
    return 1 if doc["state"] in {s.value for s in NEVER_LIVE} else 0


STATUS_FIELDS = (
    ("job", "job_name"),
    ("job link", "job_url"),
    ("model", "model_id"),
    ("endpoint", "endpoint"),
    ("deployment", "deployment"),
    ("report", "report_url"),
    ("run report", "run_report_url"),
    ("reason", "error"),
)


def render_status(doc: dict[str, Any]) -> str:
    """One run for people: label/value lines with the values in one column, then the timeline."""
    pairs = [("dataset", f"{doc['container']}/{doc['blob']}")]
    pairs += [(label, str(doc[key])) for label, key in STATUS_FIELDS if doc.get(key)]
    metrics = doc.get("metrics") or {}
    last = {k: v.get("last") for k, v in sorted(metrics.items()) if isinstance(v, dict)}
    if metrics:
        pairs.append(("metrics", ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, int | float))))
    if doc.get("smoke"):
        pairs.append(("smoke", f"passed={doc['smoke'].get('passed')} p50={doc['smoke'].get('p50_ms')} ms"))
    if doc.get("gate"):
        pairs.append(("gate", gate_line(doc["gate"])))
    if doc.get("estimate"):
        pairs.append(("estimate", str(doc["estimate"].get("summary") or doc["estimate"].get("error"))))
    if doc.get("loss_curve"):
        pairs.append(("loss PNG", doc["loss_curve"]["file"]))
    lines = [f"run {doc['run_id']}: {doc['state']}", *table(pairs, indent="  ")]
    if (doc.get("gate") or {}).get("samples"):
        lines += ["  gate answers", *gate_samples(doc["gate"])]
    lines.append("  timeline")
    lines += table(([step["at"][:23], step["state"]] for step in doc["timeline"]), indent="    ")
    return "\n".join(lines)


def _cancel(args: argparse.Namespace) -> int:
    from shared.usecases.runs import cancel_run

    ctx = app_context()
    status = cancel_run(ctx.ledger, ctx.backend, args.run_id, blobs=ctx.blobs, settings=ctx.settings)
    print(f"run {args.run_id}: {status}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("runs", help="table of runs with state and times")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_runs)
    p = sub.add_parser("status", help="one run: timeline, metrics, endpoint, report; writes a loss-curve PNG")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot-dir", default=".tunegrid/reports", help="where the loss-curve PNG goes ('' to skip)")
    p.set_defaults(func=_status)
    p = sub.add_parser("cancel", help="cancel a run in any state before live (its job, its 0 % deployment)")
    p.add_argument("run_id")
    p.set_defaults(func=_cancel)
