"""`tunegrid upload FILE [--config F] [--test F] [--follow]`: start a run from the command line.

Uploads the companions (the sidecar `NAME.config.json`, the test split `NAME.test.jsonl`) first and the
dataset last into the `training-data` container, as ingest expects them: the dataset's arrival starts
the run. Storage: the `DataStorage` connection of the app settings (Azurite from local.settings.json),
or `--account-url` with your own Azure sign-in (`DefaultAzureCredential`).

`--follow` then reads the run as `tunegrid status` does (the ledger and the backend, through the app's
use cases) and prints each stage as it happens: the validation verdict with the first errors, training
steps with the loss, the roll-out. Exit code 0 once the run is live; 1 when it ends invalid, failed,
canceled, rolled back or in error (or --timeout passes); 2 on usage errors.

The run id is known at once: it is derived from the uploaded blob's ETag, as ingest derives it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.domain.runs import NEVER_LIVE, run_id_for
from shared.domain.sidecar import parse_sidecar
from shared.errors import ConfigError, InvalidInput, TransientError, UsageError
from shared.settings import TRAINING_CONTAINER, Settings
from tunegrid.render import gate_line

SIDECAR_SUFFIX = ".config.json"
TEST_SUFFIX = ".test.jsonl"
COMPANION_SUFFIXES = (".test.jsonl", ".validation.jsonl")
BLOCK = 4 * 1024 * 1024
"""Upload block size: the progress bar moves once per block."""
PROGRESS_FROM = 1024 * 1024
"""Files at least this big get a progress bar (on a terminal)."""
FAILED_STATES = frozenset(s.value for s in NEVER_LIVE)
"""Ends of a run that will never go live (`superseded`: a newer version of the dataset took its place)."""
DONE_STATES = ("live", "retired")
"""A run seen retired went live first and was then replaced by a newer one: it did go live."""
SHOWN_ISSUES = 10
HINT_AFTER_S = 20.0


# ----------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Upload:
    path: Path
    blob: str
    role: str
    """sidecar | test | dataset"""
    content_type: str


def plan_uploads(path: Path, *, name: str | None, config: Path | None, test: Path | None) -> list[Upload]:
    """What goes where, companions first: the dataset must arrive last, it starts the run.

    Without --config / --test, `STEM.config.json` and `STEM.test.jsonl` next to FILE are taken (as
    `tunegrid submit` does). Raises UsageError for anything that ingest would ignore or refuse."""
    if not path.is_file():
        raise UsageError(f"{path} is not a file")
    blob = name or path.name
    if not blob.endswith(".jsonl"):
        raise UsageError(f"the dataset's blob name must end in .jsonl (got {blob!r}); pass --name NAME.jsonl")
    if blob.endswith(COMPANION_SUFFIXES):
        raise UsageError(f"{blob!r} is a companion file name (*.test.jsonl, *.validation.jsonl), not a dataset")
    if blob.startswith("/") or "//" in blob or len(blob) > 1024:
        raise UsageError(f"{blob!r} is not a usable blob name")
    local_stem = path.name.removesuffix(".jsonl")
    stem = blob.removesuffix(".jsonl")
    for flag, given in (("--config", config), ("--test", test)):
        if given is not None and not given.is_file():
            raise UsageError(f"{flag} {given} is not a file")
    config = config or _beside(path, local_stem + SIDECAR_SUFFIX)
    test = test or _beside(path, local_stem + TEST_SUFFIX)
    uploads = []
    if config is not None:
        try:
            parse_sidecar(config.read_bytes())
        except InvalidInput as exc:
            raise UsageError(f"sidecar {config}: {exc}") from None
        uploads.append(Upload(config, stem + SIDECAR_SUFFIX, "sidecar", "application/json"))
    if test is not None:
        uploads.append(Upload(test, stem + TEST_SUFFIX, "test", "application/jsonl"))
    uploads.append(Upload(path, blob, "dataset", "application/jsonl"))
    return uploads


def _beside(path: Path, name: str) -> Path | None:
    candidate = path.with_name(name)
    return candidate if candidate != path and candidate.is_file() else None


# ------------------------------------------------------------------------------------------ storage
def _credential() -> Any:
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(exclude_interactive_browser_credential=True)


def blob_service(connection: Mapping[str, str], *, account_url: str | None) -> Any:
    """A BlobServiceClient that uploads in `BLOCK`-sized blocks (so progress can be shown)."""
    from azure.storage.blob import BlobServiceClient

    if account_url:
        return BlobServiceClient(account_url, credential=_credential(), max_single_put_size=BLOCK, max_block_size=BLOCK)
    if connection.get(""):
        return BlobServiceClient.from_connection_string(connection[""], max_single_put_size=BLOCK, max_block_size=BLOCK)
    url = connection.get("blobServiceUri") or connection.get("serviceUri")
    if url:
        return BlobServiceClient(url, credential=_credential(), max_single_put_size=BLOCK, max_block_size=BLOCK)
    raise ConfigError("no storage connection: set DataStorage in local.settings.json, or pass --account-url")


def ledger_connection(connection: Mapping[str, str], *, account_url: str | None) -> dict[str, str]:
    """The connection the ledger is read through: the settings', or the account's table endpoint."""
    if not account_url:
        return dict(connection)
    base = account_url.rstrip("/")
    if ".blob." not in base:
        raise UsageError(f"--account-url {account_url}: expected https://ACCOUNT.blob.core.windows.net")
    return {"blobServiceUri": base, "tableServiceUri": base.replace(".blob.", ".table.", 1)}


def _progress(upload: Upload, size: int) -> Any:
    """A tqdm bar on stderr for a big file on a terminal; None otherwise (pipes and CI logs stay clean)."""
    if size < PROGRESS_FROM or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=upload.blob, file=sys.stderr)


def upload_one(service: Any, upload: Upload) -> str:
    """Upload one file (streamed, in blocks); returns the blob's new ETag."""
    from azure.storage.blob import ContentSettings

    size = upload.path.stat().st_size
    bar = _progress(upload, size)

    def hook(current: int, total: int | None) -> None:
        if bar is not None:
            bar.update(current - bar.n)

    client = service.get_blob_client(TRAINING_CONTAINER, upload.blob)
    try:
        with upload.path.open("rb") as data:
            result = client.upload_blob(
                data,
                length=size,
                overwrite=True,
                content_settings=ContentSettings(content_type=upload.content_type),
                max_concurrency=2,
                progress_hook=hook,
            )
    finally:
        if bar is not None:
            bar.close()
    return str(result["etag"]).strip('"')


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


# ------------------------------------------------------------------------------------------- follow
@dataclass
class Follower:
    """Turns successive status documents of one run into the lines a person wants to see, each once."""

    started: float = field(default_factory=time.monotonic)
    clock: Callable[[], float] = time.monotonic
    seen_states: int = 0
    validation_shown: bool = False
    last_step: float = float("-inf")
    eval_steps: set[float] = field(default_factory=set)

    def _at(self, text: str) -> str:
        return f"[{self.clock() - self.started:7.1f}s] {text}"

    def lines(self, doc: Mapping[str, Any]) -> list[str]:
        out: list[str] = []
        timeline = doc.get("timeline") or []
        for step in timeline[self.seen_states :]:
            state = str(step.get("state"))
            if state in ("succeeded", "failed", "canceled"):
                out += self._training(doc)  # a late look still reads in order: the steps, then the outcome
            out.append(self._at(f"{state:<16} {_stage_detail(state, doc)}".rstrip()))
            if state in ("submitting", "invalid", "error"):
                out += self._validation(doc)
        self.seen_states = len(timeline)
        out += self._validation(doc)
        out += self._training(doc)
        return out

    def _validation(self, doc: Mapping[str, Any]) -> list[str]:
        if self.validation_shown or not doc.get("validation"):
            return []
        self.validation_shown = True
        return validation_lines(doc["validation"])

    def _training(self, doc: Mapping[str, Any]) -> list[str]:
        series = doc.get("metrics_series") or {}
        train = series.get("loss") or series.get("train_loss") or []
        evals = {p[0]: p[1] for p in series.get("eval_loss") or []}
        total = (doc.get("params") or {}).get("max_steps")
        new = [p for p in train if p[0] > self.last_step]
        out = []
        for step, value in new[-5:]:  # a long gap (a slow poll) shows its last points, not hundreds
            of = f"/{total}" if isinstance(total, int) and total > 0 else ""
            extra = f"  eval loss {evals[step]:.4f}" if step in evals else ""
            out.append(self._at(f"  training step {step:g}{of}  loss {value:.4f}{extra}"))
            if step in evals:
                self.eval_steps.add(step)
        if new:
            self.last_step = new[-1][0]
        for step in sorted(s for s in evals if s not in self.eval_steps and s <= self.last_step):
            out.append(self._at(f"  eval at step {step:g}  loss {evals[step]:.4f}"))
            self.eval_steps.add(step)
        return out


def _stage_detail(state: str, doc: Mapping[str, Any]) -> str:
    if state == "submitted":
        estimate = (doc.get("estimate") or {}).get("summary")
        return f"job {doc.get('job_name', '')}" + (f"; estimate: {estimate}" if estimate else "")
    if state == "succeeded":
        last = {k: v.get("last") for k, v in (doc.get("metrics") or {}).items() if isinstance(v, Mapping)}
        shown = [f"{k} {last[k]:.4f}" for k in ("loss", "train_loss", "eval_loss") if isinstance(last.get(k), float)]
        return "  ".join(shown)
    if state == "deploying":
        return f"model {doc.get('model_name', '')}:{doc.get('model_version', '')} to endpoint {doc.get('endpoint', '')}, deployment {doc.get('deployment', '')} at 0 %"
    if state == "evaluating":
        smoke = doc.get("smoke") or {}
        return f"smoke test passed ({len(smoke.get('rows') or [])} rows, p50 {smoke.get('p50_ms')} ms)" if smoke else ""
    if state == "shifting-traffic":
        return f"gate {gate_line(doc.get('gate') or {})}" if doc.get("gate") else ""
    if state == "live":
        return f"100 % of {doc.get('endpoint', '')} on {doc.get('deployment', '')}"
    if state in FAILED_STATES:
        return str(doc.get("error") or "")
    return ""


def validation_lines(v: Mapping[str, Any]) -> list[str]:
    """The verdict, the counts by code and the first errors with their line numbers."""
    errors = sum((v.get("error_counts") or {}).values())
    warnings = sum((v.get("warning_counts") or {}).values())
    verdict = "valid" if v.get("valid") else "INVALID"
    out = [
        f"           validation: {verdict}, {v.get('rows')} rows ({v.get('valid_rows')} valid), {errors} errors, {warnings} warnings"
    ]
    for label, counts in (("errors", v.get("error_counts")), ("warnings", v.get("warning_counts"))):
        if counts:
            out.append(
                f"           {label}: "
                + ", ".join(f"{c}×{n}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            )
    for issue in (v.get("errors") or [])[:SHOWN_ISSUES]:
        where = f"line {issue.get('line')}" if issue.get("line") is not None else "file"
        out.append(f"             {where}: {issue.get('code')}: {issue.get('message')}")
    tokens = (v.get("stats") or {}).get("tokens_per_row")
    if isinstance(tokens, Mapping) and tokens.get("max") is not None:
        out.append("           tokens per row: " + ", ".join(f"{k} {n:g}" for k, n in tokens.items() if n is not None))
    return out


# -------------------------------------------------------------------------------------- run page URL
def run_page_url(run_id: str, *, base_url: str | None, route_prefix: str) -> str:
    """Where the run page is; the function key is left as a placeholder (it is a secret)."""
    prefix = f"/{route_prefix}" if route_prefix else ""
    return f"{(base_url or '').rstrip('/')}{prefix}/runs/{run_id}?code=<host key>"


def default_base_url() -> tuple[str, str]:
    """The dev host's address from the settings file (`Host.LocalHttpPort`, else 7071) and host.json's
    route prefix, as `tunegrid devhost` reads them."""
    from tunegrid.devhost.config import HostConfig, load_local_settings
    from tunegrid.devhost.host import DEFAULT_PORT

    settings = load_local_settings(fallback_level=logging.DEBUG)
    port = settings.local_http_port or DEFAULT_PORT
    return f"http://127.0.0.1:{port}", HostConfig.load(Path.cwd() / "host.json").route_prefix


# --------------------------------------------------------------------------------------------- main
def run_upload(args: argparse.Namespace) -> int:
    uploads = plan_uploads(args.file, name=args.name, config=args.config, test=args.test)
    if args.interval <= 0 or args.timeout <= 0:
        raise UsageError("--interval and --timeout must be positive")
    settings = Settings.from_env()
    ledger_conn = ledger_connection(settings.storage_connection, account_url=args.account_url)
    if args.account_url:
        settings = dataclasses.replace(settings, storage_connection=ledger_conn)
    from azure.core.exceptions import AzureError

    from shared.bootstrap import AppContext

    ctx = AppContext(settings)
    try:
        if ledger_conn.get(""):
            ctx.storage  # noqa: B018 - creates the containers on a fresh Azurite, as the app does
        service = blob_service(settings.storage_connection, account_url=args.account_url)
        etag = ""
        for upload in uploads:
            size = upload.path.stat().st_size
            etag = upload_one(service, upload)
            print(
                f"uploaded {upload.path} -> {TRAINING_CONTAINER}/{upload.blob} ({upload.role}, {_size(size)})",
                flush=True,
            )
    except (AzureError, TransientError) as exc:
        print(
            f"tunegrid: upload failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            file=sys.stderr,
        )
        print("  is the storage reachable (Azurite running; DataStorage or --account-url right)?", file=sys.stderr)
        return 1
    dataset = uploads[-1]
    run_id = run_id_for(TRAINING_CONTAINER, dataset.blob, etag)
    base, prefix = default_base_url()
    page = run_page_url(run_id, base_url=args.base_url or base, route_prefix=prefix)
    print(f"run {run_id}")
    print(f"run page: {page}")
    print(f"          (the key: {_key_hint(args)})", flush=True)
    if not args.follow:
        print(f"follow it: tunegrid status {run_id}")
        return 0
    return follow(ctx, run_id, page=page, interval_s=args.interval, timeout_s=args.timeout, dataset=dataset.blob)


def _key_hint(args: argparse.Namespace) -> str:
    """Where the key comes from. The host key opens every page (the run page links to the table of runs); a
    function's own key opens only that function's route."""
    if args.base_url and not args.base_url.startswith(("http://127.0.0.1", "http://localhost")):
        return "the app's host key: az functionapp keys list -n APP -g RG --query functionKeys.default -o tsv"
    return "tunegrid devhost --show-keys, the host key 'default'"


def follow(ctx: Any, run_id: str, *, page: str, interval_s: float, timeout_s: float, dataset: str) -> int:
    """Poll the run through the status use case until it is live or over; print what changes."""
    from shared.usecases.runs import run_status

    backend = _backend(ctx)
    follower = Follower()
    deadline = time.monotonic() + timeout_s
    hinted = False
    doc: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        try:
            record = ctx.ledger.get(run_id)
            if record is not None:
                doc = run_status(ctx.ledger, backend, run_id, blobs=None if follower.validation_shown else ctx.blobs)
        except TransientError as exc:  # a storage blip: the next poll tries again
            print(f"  (storage: {exc}; retrying)", file=sys.stderr)
            record = None
        if record is None and doc is None:
            if not hinted and time.monotonic() > deadline - timeout_s + HINT_AFTER_S:
                hinted = True
                print(
                    f"  no run for {TRAINING_CONTAINER}/{dataset} yet: is the app running (tunegrid devhost)?",
                    file=sys.stderr,
                    flush=True,
                )
        elif doc is not None:
            for line in follower.lines(doc):
                print(line, flush=True)
            state = str(doc.get("state"))
            if state == "duplicate" and doc.get("duplicate_of"):
                # The same content and settings are trained once: what this upload asked for is that run.
                reused = str(doc["duplicate_of"])
                print(f"  same content and settings as run {reused}, which is reused: following it", flush=True)
                page, run_id, doc, follower = page.replace(run_id, reused), reused, None, Follower()
                continue
            if state in DONE_STATES:
                print(_live_summary(doc, page))
                return 0
            if state in FAILED_STATES:
                print(_failed_summary(doc, page), file=sys.stderr)
                return 1
        time.sleep(interval_s)
    last = doc.get("state") if doc else "not started"
    print(
        f"tunegrid: run {run_id} not live after {timeout_s:g} s (last state: {last}); it goes on in the app",
        file=sys.stderr,
    )
    return 1


def _backend(ctx: Any) -> Any:
    """The configured backend for the metrics series, or None (stages still show) when it cannot be built."""
    try:
        return ctx.backend
    except Exception as exc:
        print(f"  (training metrics unavailable here: {exc})", file=sys.stderr)
        return None


def _live_summary(doc: Mapping[str, Any], page: str) -> str:
    from tunegrid.render import table

    rows = [
        ("endpoint", str(doc.get("endpoint", ""))),
        ("deployment", str(doc.get("deployment", ""))),
        ("model", f"{doc.get('model_name', '')}:{doc.get('model_version', '')}"),
        ("model name", f"{doc.get('model_name', '')}  (the `model` of /api/v1/chat/completions)"),
        ("run page", page),
    ]
    headline = (
        f"run {doc.get('run_id')} is live"
        if doc.get("state") == "live"
        else f"run {doc.get('run_id')} went live (now {doc.get('state')}: {doc.get('error')})"
    )
    return "\n".join([headline, *table(rows, indent="  ")])


def _failed_summary(doc: Mapping[str, Any], page: str) -> str:
    lines = [f"run {doc.get('run_id')} ended {doc.get('state')}: {doc.get('error') or ''}".rstrip(": ")]
    if doc.get("report_url"):
        lines.append(f"  validation report: {doc['report_url']}")
    lines.append(f"  run page: {page}")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "upload",
        help="upload a dataset (and its sidecar / test split) to training-data; --follow shows the run live",
        description=(
            "Upload FILE to the training-data container of the configured storage (DataStorage from "
            "local.settings.json, or --account-url with your Azure sign-in): the sidecar and test split first, the "
            "dataset last (its arrival starts the run). --follow prints the stages as they happen and ends with "
            "the endpoint, the model name and the run page; an upload identical to a run still alive follows that "
            "run. Exit codes: 0 live (or uploaded, without --follow), 1 invalid, failed, rolled back, error, "
            "canceled or superseded, 2 usage errors."
        ),
    )
    parser.add_argument("file", type=Path, help="chat JSONL dataset (one conversation per line)")
    parser.add_argument("--name", help="blob name in training-data (default: FILE's name); must end in .jsonl")
    parser.add_argument("--config", type=Path, help="sidecar JSON (default: STEM.config.json next to FILE, if any)")
    parser.add_argument("--test", type=Path, help="test split JSONL (default: STEM.test.jsonl next to FILE, if any)")
    parser.add_argument("--follow", action="store_true", help="show the run's stages live until it is live or over")
    parser.add_argument(
        "--account-url",
        help="https://ACCOUNT.blob.core.windows.net: upload with your Azure sign-in instead of DataStorage",
    )
    parser.add_argument(
        "--base-url",
        help="the app's address for the run page URL (default: the dev host, http://127.0.0.1:Host.LocalHttpPort)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="--follow gives up after this many seconds")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between --follow polls")
    parser.set_defaults(func=run_upload)
