"""`python -m tunegrid local-model | local-jobs | local-endpoints`: the embedded local backend by hand.

- `local-model prepare`: convert SmolLM2's GGUF (or build the tiny model) into the model cache and
  create the workspace's MLflow database, so the first job starts training at once.
- `local-jobs [JOB]`: the jobs in LOCAL_WORKSPACE_DIR, or one job's status, progress and log tail.
- `local-endpoints [list|stop|deliver-events]`: endpoints with deployments, states and traffic
  (never keys); `stop` stops every process the workspace started; `deliver-events` sends the outbox.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from tunegrid.render import table


def register(subparsers: Any) -> None:
    model = subparsers.add_parser("local-model", help="prepare the local backend's base model ahead of the first job")
    model_sub = model.add_subparsers(dest="local_model_action", metavar="ACTION")
    prepare = model_sub.add_parser("prepare", help="convert/build and cache the base model; create the MLflow database")
    prepare.add_argument("--model", default=None, help="smollm2, tiny-phi3, an HF folder (default: LOCAL_BASE_MODEL)")
    prepare.add_argument(
        "--cache-dir", default=None, help="model cache (default: $TUNEGRID_CACHE_DIR or ~/.cache/tunegrid)"
    )
    prepare.add_argument(
        "--workspace", default=None, help="workspace whose MLflow database to create (default: LOCAL_WORKSPACE_DIR)"
    )
    prepare.set_defaults(func=run_prepare)
    model.set_defaults(func=lambda args: (model.print_help(), 2)[1])

    jobs = subparsers.add_parser("local-jobs", help="list local fine-tune jobs, or show one with its progress and log")
    jobs.add_argument("job", nargs="?", help="a job name")
    jobs.add_argument("--lines", type=int, default=20, help="log lines to show for one job")
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(func=run_jobs)

    endpoints = subparsers.add_parser(
        "local-endpoints", help="list local endpoints, stop their processes, deliver events"
    )
    endpoints.add_argument("action", nargs="?", default="list", choices=("list", "stop", "deliver-events"))
    endpoints.add_argument("--json", action="store_true")
    endpoints.set_defaults(func=run_endpoints)


def _backend() -> Any:
    from shared.settings import Settings
    from tunegrid.local import LocalBackend

    return LocalBackend.from_settings(Settings.from_env())


def run_prepare(args: argparse.Namespace) -> int:
    from shared.settings import Settings
    from tunegrid.local.base_models import resolve_base_model
    from tunegrid.local.tracking import Tracking

    settings = Settings.from_env()
    spec = args.model or settings.local_base_model
    started = time.monotonic()
    base = resolve_base_model(spec, cache=Path(args.cache_dir) if args.cache_dir else None)
    print(f"base model {base.label}: {base.source} ({time.monotonic() - started:.1f} s)")
    workspace = Path(args.workspace).expanduser().resolve() if args.workspace else settings.local_workspace_dir
    started = time.monotonic()
    tracking = Tracking.for_workspace(workspace)
    tracking.client()
    print(f"MLflow database: {tracking.db} ({time.monotonic() - started:.1f} s)")
    return 0


def run_jobs(args: argparse.Namespace) -> int:
    backend = _backend()
    if args.job:
        status = backend.get_job(args.job)
        if status is None:
            print(f"no job {args.job} in {backend.workspace}")
            return 1
        doc = {
            "name": status.name,
            "status": status.raw_status,
            "error": status.error,
            "tags": dict(status.tags),
            "progress": backend.job_progress(args.job),
            "log": backend.job_log(args.job, lines=args.lines),
        }
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            print(f"{doc['name']}: {doc['status']}" + (f" ({doc['error']})" if doc["error"] else ""))
            progress = doc["progress"] or {}
            if progress:
                print(
                    f"step {progress.get('step')}/{progress.get('total')} loss {progress.get('loss')} eta {progress.get('eta_s', 0):.0f} s"
                )
            print("\n".join(doc["log"]))
        return 1 if status.raw_status == "Failed" else 0
    rows = [{"name": s.name, "status": s.raw_status, "error": s.error} for s in backend.list_jobs()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for line in table([row["name"], row["status"], row["error"] or ""] for row in rows):
            print(line)
    return 0


def run_endpoints(args: argparse.Namespace) -> int:
    backend = _backend()
    if args.action == "stop":
        backend.stop_processes()
        print(f"stopped the processes of {backend.workspace}")
        return 0
    if args.action == "deliver-events":
        result = backend.deliver_events()
        print(
            f"delivered {result.sent}, pending {result.pending}, dead-lettered {result.dead}"
            + (f" ({result.error})" if result.error else "")
        )
        return 0 if not result.pending else 1
    rows = []
    for endpoint in backend.list_endpoints():
        rows.append(
            {
                "name": endpoint.name,
                "state": endpoint.provisioning_state.value,
                "scoring_uri": endpoint.scoring_uri,
                "created_at": endpoint.created_at.isoformat() if endpoint.created_at else None,
                "tags": dict(endpoint.tags),
                "traffic": dict(endpoint.traffic),
                "mirror_traffic": dict(endpoint.mirror_traffic),
                "deployments": [
                    {"name": d.name, "state": d.provisioning_state.value, "model": d.model_id, "error": d.error}
                    for d in endpoint.deployments
                ],
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(
                f"{row['name']} [{row['state']}] {row['scoring_uri']} traffic {row['traffic']} mirror {row['mirror_traffic']}"
            )
            for dep in row["deployments"]:
                print(
                    f"  {dep['name']} [{dep['state']}] {dep['model']}" + (f" ({dep['error']})" if dep["error"] else "")
                )
    return 0
