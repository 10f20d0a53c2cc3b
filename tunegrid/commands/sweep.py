"""`python -m tunegrid sweep`: run the janitor once, now, and print its decisions."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tunegrid.render import sweep_table


def _minutes(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of minutes: {raw!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"minutes must be 0 or more, got {raw!r}")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="run the janitor once: delete idle owned endpoints and orphan 0 %% deployments",
        description=(
            "Decide on every endpoint of the backend with the janitor's rules and act on the decisions. "
            "Exit 0 when every action succeeded, 1 when a delete failed, 2 on a usage or setting error."
        ),
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print and audit the decisions, delete nothing (also JANITOR_DRY_RUN)"
    )
    parser.add_argument(
        "--idle-minutes", type=_minutes, default=None, metavar="N", help="idle window (default: IDLE_MINUTES)"
    )
    parser.add_argument(
        "--grace-minutes",
        type=_minutes,
        default=None,
        metavar="N",
        help="grace period for new endpoints and deployments (default: JANITOR_GRACE_MINUTES)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    from shared.bootstrap import app_context, sweep_from_context

    report = sweep_from_context(
        app_context(),
        dry_run=True if args.dry_run else None,
        idle_minutes=args.idle_minutes,
        grace_minutes=args.grace_minutes,
    )
    if args.json:
        print(json.dumps(report.public(), indent=2))
    else:
        print(sweep_table(report))
    return 1 if report.failures else 0
