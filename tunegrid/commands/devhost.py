"""`python -m tunegrid devhost`: run the function app locally, without Azure Functions Core Tools."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "devhost",
        help="host the function app locally (HTTP, Event Grid, blob and timer triggers) without Core Tools",
        description=(
            "Serve function_app.app as the Functions host would: HTTP routes under /api with function keys, "
            "the Event Grid webhook, blob triggers polled from Azurite, timer triggers. Ctrl-C stops it."
        ),
    )
    parser.add_argument("--app", default="function_app:app", help="module:attribute of the FunctionApp")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="port (default: Host.LocalHttpPort of the settings file, else 7071; 0 = any free port)",
    )
    parser.add_argument(
        "--settings",
        type=Path,
        default=None,
        help="settings file (default local.settings.json, else local.settings.sample.json)",
    )
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="keys, timer status, dead letters (default .tunegrid/devhost)"
    )
    parser.add_argument("--blob-poll-interval", type=float, default=1.0, help="seconds between blob container scans")
    parser.add_argument("--show-keys", action="store_true", help="print the local function keys and exit")
    # its own settings file (--settings) goes into the environment as the host starts; INFO logs each invocation
    parser.set_defaults(func=run, local_settings=False, log_level=logging.INFO)


def run(args: argparse.Namespace) -> int:
    from tunegrid.devhost import DevHost, HostTimings

    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    host = DevHost(
        args.app,
        settings=args.settings,
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        timings=HostTimings(blob_poll_interval_s=args.blob_poll_interval),
    )
    if args.show_keys:
        print(format_keys(host))
        return 0
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    host.start()
    print(host.describe())
    print(f"Dev host listening on {host.base_url} (keys: python -m tunegrid devhost --show-keys)", flush=True)
    try:
        while not stop.wait(0.5):
            if not host.running:
                print("the dev host stopped unexpectedly", file=sys.stderr)
                return 1
    finally:
        print("Stopping the dev host (finishing in-flight invocations)...", file=sys.stderr, flush=True)
        host.stop()
    if host.invoker.in_flight:
        # a plain function still running in a worker thread would hold the interpreter's exit forever
        print(
            f"{host.invoker.in_flight} invocations did not finish in time; exiting anyway", file=sys.stderr, flush=True
        )
        sys.stdout.flush()
        os._exit(0)
    return 0


def format_keys(host: Any) -> str:
    lines = [
        f"keys file: {host.keys.path}",
        f"master key (admin level; any function; /admin API): {host.master_key}",
    ]
    lines += [f"host key {name!r} (function level, any function): {key}" for name, key in host.keys.host_keys().items()]
    lines.append(f"system key eventgrid_extension (Event Grid webhook ?code=): {host.event_grid_system_key}")
    lines.append("function keys (x-functions-key header or ?code= query):")
    lines += [f"  {name}: {key}" for name, key in sorted(host.function_keys().items())]
    return "\n".join(lines)
