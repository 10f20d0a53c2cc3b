"""`tunegrid doctor`: preflight a real workspace and its app, right after `azd up`.

Checks, as you (DefaultAzureCredential: `az login`, `azd auth login`, the environment) and, where it can
be found, as the app's identity: the workspace is reachable; the roles allow submitting a job,
registering a model, managing online endpoints (and listing their keys) and reading endpoint metrics;
the base model exists and is not retired, and the VM sizes are on its lists; there is vCPU quota for
them in the region; the pipeline component resolves; the storage account and the workspace deliver
their events to the app. Prints a pass / warn / fail table (`--json`: the same as JSON).

Settings, highest first: the flags; the environment; the azd environment (`.azure/<env>/.env`: the
default one, `AZURE_ENV_NAME`, or --azd-env); local.settings.json. Reads only; changes nothing.
Exit codes: 0 nothing failed (warnings allowed), 1 a check failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from azure.core.credentials import TokenCredential
from azure.core.pipeline.transport import HttpTransport

from shared.domain.clock import utcnow


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="preflight the Azure workspace and app: roles, model, VM sizes, quota, component, Event Grid",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--subscription", help="subscription id of the workspace (AZURE_SUBSCRIPTION_ID)")
    parser.add_argument("--resource-group", help="resource group of the workspace (AZURE_RESOURCE_GROUP)")
    parser.add_argument("--workspace", help="Azure ML workspace name (AZUREML_WORKSPACE_NAME)")
    parser.add_argument("--azd-env", metavar="NAME", help="azd environment to read (default: azd's default one)")
    parser.add_argument(
        "--principal-id",
        metavar="OBJECT_ID",
        default="",
        help="object id of the app's identity to check its roles (default: read from the Function App)",
    )
    # The doctor layers local.settings.json under the azd environment itself (tunegrid.doctor.target).
    parser.set_defaults(func=run, local_settings=False)


def open_connection() -> tuple[TokenCredential, HttpTransport | None]:
    """The caller's credential and azure-core's default transport. Tests replace this one function to
    serve captured HTTP (tests/test_doctor_cli.py)."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(exclude_interactive_browser_credential=True), None


def run(args: argparse.Namespace) -> int:
    from tunegrid.doctor.diagnose import diagnose
    from tunegrid.doctor.reads import AzureReads
    from tunegrid.doctor.target import resolve_target

    target = resolve_target(
        root=Path.cwd(),
        environ=os.environ,
        azd_env=args.azd_env,
        flags={"subscription": args.subscription, "resource_group": args.resource_group, "workspace": args.workspace},
        principal_id=args.principal_id.strip(),
    )
    credential, transport = open_connection()
    report = diagnose(target, AzureReads(credential, transport=transport), now=utcnow())
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.to_text())
    return report.exit_code
