"""`settings`: every app setting with its default and meaning (the README's table is made from it)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from shared.settings import SETTINGS, STORAGE_CONNECTION


def _settings(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([s.__dict__ for s in SETTINGS], indent=2))
        return 0
    print("| setting | default | meaning |")
    print("|---|---|---|")
    print(
        f"| `{STORAGE_CONNECTION}` | Azurite | Data storage connection: a connection string locally; in Azure `{STORAGE_CONNECTION}__blobServiceUri`, `__queueServiceUri`, `__tableServiceUri`, `__credential=managedidentity`, `__clientId`. Falls back to `AzureWebJobsStorage`. |"
    )
    print("| `AzureWebJobsStorage` | Azurite | The Functions host's own storage (identity form in Azure). |")
    for s in SETTINGS:
        default = f"`{s.default}`" if s.default else "(empty)"
        print(f"| `{s.name}` | {default} | {s.doc} |")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("settings", help="list every app setting with its default and meaning")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_settings)
