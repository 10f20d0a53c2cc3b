"""`make demo`: the whole loop on this machine, with no Azure account and no Core Tools.

Azurite + the dev host (serving the real `function_app.app`) + the embedded local backend. It
uploads an invalid dataset (to show the report) and a real ultrachat slice, prints the time estimate
made before submission, follows the run through every stage, asks the fine-tuned model a question with
the official `openai` client, then uploads a second version of the dataset: its model goes through the
evaluation gate against the live one (both scores printed) and is promoted or rolled back. Last, the
janitor (dry run, then a short idle window, which deletes the endpoint). A webhook subscriber of the
dev host's run-events topic prints every run event as it arrives. Stops everything on exit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shared.settings import REPORTS_CONTAINER, TRAINING_CONTAINER
from tunegrid.azurite import free_port, run_azurite
from tunegrid.notifications import WebhookListener
from tunegrid.render import gate_line, gate_samples

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "ultrachat_small.jsonl"
QUESTION = "Give me two tips for writing a clear email."

STAGES = (
    ("validated", ("submitting", "invalid")),
    ("submitted", ("submitted",)),
    ("training", ("running",)),
    ("completed", ("succeeded",)),
    ("registered", ("deploying",)),
    ("deploying", ("smoke-testing",)),
    ("smoke-tested", ("evaluating",)),
    ("gate", ("shifting-traffic", "rolled-back")),
    ("live", ("live",)),
)
FAILED = ("failed", "canceled", "rolled-back", "error", "invalid", "superseded", "duplicate")


@dataclass(frozen=True)
class DemoConfig:
    model: str = "smollm2"
    rows: int = 48
    max_steps: int = 8
    batch_size: int = 2
    max_seq_length: int = 256
    learning_rate: float = 2e-4
    temperature: float = 0.7
    workdir: Path = ROOT / ".demo"
    timeout_s: float = 900.0
    extra_params: dict[str, Any] = field(default_factory=dict)


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.start


def say(clock: Clock, text: str) -> None:
    print(f"[{clock():7.1f}s] {text}", flush=True)


def invalid_sample(lines: list[bytes]) -> bytes:
    """Real rows with real-world mistakes: a NaN, a wrong role, a one-message row, a cut-off line."""
    bad = [
        *lines[:4],
        b'{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": NaN}]}',
        lines[4].replace(b'"role": "assistant"', b'"role": "bot"', 1),
        b'{"messages": [{"role": "user", "content": "hello?"}]}',
        lines[5][: len(lines[5]) // 2],
        *lines[6:14],
    ]
    return b"\r\n".join(bad) + b"\r\n"


def demo_rows(lines: list[bytes], *, max_chars: int = 900) -> list[bytes]:
    """Real rows whose conversations are short enough that a small max_seq_length keeps assistant
    tokens in every row (the pipeline drops rows truncated before the first answer)."""
    out = []
    for line in lines:
        messages = json.loads(line)["messages"]
        if len(messages) >= 2 and sum(len(m["content"]) for m in messages[:2]) <= max_chars:
            out.append(line)
    return out


def _env(config: DemoConfig, conn: str, port: int, workspace: Path) -> dict[str, str]:
    return {
        "FUNCTIONS_WORKER_RUNTIME": "python",
        "AzureWebJobsStorage": conn,
        "DataStorage": conn,
        "FINETUNE_BACKEND": "local",
        "TUNEGRID_INSTANCE": "tunegrid-demo",
        "LOCAL_WORKSPACE_DIR": str(workspace),
        "LOCAL_BASE_MODEL": config.model,
        "LOCAL_EVENT_WEBHOOK_URL": f"http://127.0.0.1:{port}/runtime/webhooks/eventgrid?functionName=job_events",
        "LOCAL_EVENT_KEY": secrets.token_urlsafe(24),
        "RUN_EVENTS_TOPIC_ENDPOINT": f"http://127.0.0.1:{port}/runtime/topics/run-events",
        "LOCAL_RUN_EVENTS_KEY": secrets.token_urlsafe(24),
        "PROXY_API_KEYS": "demo-" + secrets.token_urlsafe(24),
        "ROLLOUT_SCHEDULE": "*/2 * * * * *",
        "JANITOR_SCHEDULE": "0 0 0 1 1 *",
        "SMOKE_ROWS": "2",
        "SMOKE_TIMEOUT_S": "120",
        # the evaluation gate: a few rows and short answers, so the second run's gate takes seconds on a CPU;
        # 10 % held out gives it 4 test rows of the 48
        "TEST_SPLIT_PERCENT": "10",
        "GATE_ROWS": "4",
        "GATE_MAX_NEW_TOKENS": "32",
        "IDLE_MINUTES": "120",
        "JANITOR_GRACE_MINUTES": "0",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _wait_report(ctx: Any, name: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for r in ctx.ledger.list():
            if r.blob == name and r.report_url:
                blob = r.report_url.split(f"/{REPORTS_CONTAINER}/", 1)[1]
                doc: dict[str, Any] = json.loads(ctx.blobs.read_bytes(REPORTS_CONTAINER, blob, limit=10**8) or b"{}")
                doc["_markdown"] = (
                    ctx.blobs.read_bytes(REPORTS_CONTAINER, blob.replace(".report.json", ".report.md")) or b""
                ).decode()
                doc["_state"] = r.state.value
                return doc
        time.sleep(0.3)
    raise TimeoutError(f"no validation report for {name} within {timeout_s:.0f}s")


def _follow_run(
    ctx: Any, name: str, clock: Clock, config: DemoConfig, upload_at: float, *, after: set[str] | None = None
) -> tuple[Any, dict[str, float]]:
    """Print each stage as the ledger reaches it, with training steps and loss from the job, the estimate made
    before submission and the gate's verdict. `after`: runs of the same dataset to leave out (earlier versions).
    A run the gate rolls back is returned too (the live model stays); any other failure raises."""
    deadline = time.monotonic() + config.timeout_s
    seen: dict[str, float] = {}
    last_step = -1
    record = None
    estimate_shown = False
    while time.monotonic() < deadline:
        record = next((r for r in ctx.ledger.list() if r.blob == name and r.run_id not in (after or ())), None)
        if record is not None:
            if record.estimate and not estimate_shown:
                estimate_shown = True
                say(
                    clock,
                    f"estimate before submission: {record.estimate.get('summary') or record.estimate.get('error')}",
                )
            states = [s for s, _ in record.timeline]
            for stage, markers in STAGES:
                if stage not in seen and any(m in states for m in markers):
                    seen[stage] = clock() - upload_at
                    detail = {
                        "submitted": f"job {record.job_name}",
                        "registered": f"model {record.model_name}:{record.model_version}",
                        "deploying": f"endpoint {record.endpoint}, deployment {record.deployment} at 0 %",
                        "smoke-tested": f"p50 {record.smoke.get('p50_ms')} ms" if record.smoke else "",
                        "gate": gate_line(record.gate),
                        "live": f"100 % of {record.endpoint} on {record.deployment}",
                    }.get(stage, "")
                    say(clock, f"stage {stage:<13} {detail}")
                    if stage == "gate" and record.gate.get("live"):
                        for line in gate_samples(record.gate, width=60, indent="           "):
                            print(line, flush=True)
            if record.job_name and "completed" not in seen:
                progress = ctx.settings.local_workspace_dir / "jobs" / record.job_name / "progress.json"
                with contextlib.suppress(OSError, ValueError):
                    p = json.loads(progress.read_text())
                    if p.get("step", -1) != last_step:
                        last_step = p["step"]
                        loss = p.get("loss")
                        say(
                            clock,
                            f"  training step {p['step']}/{p['total']}  loss {loss if loss is None else round(loss, 4)}  {p.get('tokens_per_s', 0):.0f} tokens/s",
                        )
            if record.state.value == "rolled-back" and record.gate.get("verdict") == "rolled-back":
                return record, seen
            if record.state.value in FAILED:
                raise RuntimeError(f"run {record.run_id} ended {record.state.value}: {record.error}")
            if record.state.value == "live":
                return record, seen
        time.sleep(0.25)
    raise TimeoutError(
        f"run did not go live within {config.timeout_s:.0f}s (last state: {record.state.value if record else 'none'})"
    )


def run_demo(config: DemoConfig) -> dict[str, Any]:
    from tunegrid.local.base_models import resolve_base_model

    clock = Clock()
    workspace = config.workdir / "workspace"
    if workspace.exists():
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True)
    say(clock, f"preparing the base model {config.model!r} (converted once, then cached)")
    resolve_base_model(config.model)
    port = free_port()
    listener = WebhookListener(on_event=lambda n: say(clock, f"  event {n.summary()}"))
    with run_azurite(log_path=config.workdir / "azurite.log") as azurite, listener:
        say(
            clock,
            f"Azurite up (blob {azurite.blob_port}, queue {azurite.queue_port}, table {azurite.table_port}), pid {azurite.pid}",
        )
        env = {**_env(config, azurite.connection_string, port, workspace), "LOCAL_RUN_EVENTS_SUBSCRIBERS": listener.url}
        with _environment(env):
            return _run_loop(config, env, port, clock, listener)


def _run_loop(
    config: DemoConfig, env: dict[str, str], port: int, clock: Clock, listener: WebhookListener
) -> dict[str, Any]:
    from openai import OpenAI

    from shared.bootstrap import app_context, reset_app_context, sweep_from_context
    from tunegrid.devhost import DevHost, HostTimings
    from tunegrid.render import sweep_table

    reset_app_context()
    ctx = app_context()
    ctx.storage  # noqa: B018 - creates the containers and tables before the host polls them
    host = DevHost(
        "function_app:app",
        settings=env,
        port=port,
        state_dir=config.workdir / "devhost",
        timings=HostTimings(blob_poll_interval_s=0.5),
        root=ROOT,
    )
    host.start()
    try:
        say(clock, f"dev host up at {host.base_url}: {len(host.routes())} functions")
        say(clock, f"run events: the dev host's topic delivers each one to a webhook subscriber at {listener.url}")
        lines = demo_rows(SAMPLE.read_bytes().splitlines())

        say(clock, "uploading demo-invalid.jsonl (real rows with mistakes) to training-data/")
        ctx.blobs.upload(TRAINING_CONTAINER, "demo-invalid.jsonl", invalid_sample(lines))
        report = _wait_report(ctx, "demo-invalid.jsonl", 60)
        say(clock, f"validation report: valid={report['valid']} rows={report['rows']} errors={report['error_counts']}")
        for e in report["errors"][:6]:
            print(f"           line {e['line']}: {e['code']}: {e['message']}")

        name = "ultrachat-demo.jsonl"
        sidecar = {
            "finetune": {
                "max_steps": config.max_steps,
                "per_device_train_batch_size": config.batch_size,
                "max_seq_length": config.max_seq_length,
                "learning_rate": config.learning_rate,
                "logging_steps": 1,
                **config.extra_params,
            }
        }
        ctx.blobs.upload(TRAINING_CONTAINER, "ultrachat-demo.config.json", json.dumps(sidecar).encode())
        data = b"\n".join(lines[: config.rows]) + b"\n"
        say(
            clock,
            f"uploading {name}: {config.rows} ultrachat_200k rows, {len(data)} bytes, sidecar {sidecar['finetune']}",
        )
        upload_at = clock()
        ctx.blobs.upload(TRAINING_CONTAINER, name, data)
        record, stages = _follow_run(ctx, name, clock, config, upload_at)
        listener.wait_for(
            lambda seen: any(n.subject == f"runs/{record.run_id}" and n.state == "live" for n in seen), timeout_s=60
        )

        client = OpenAI(base_url=f"{host.base_url}/api/v1", api_key=env["PROXY_API_KEYS"], max_retries=0, timeout=120)
        say(clock, f"asking {record.model_name} through /api/v1/chat/completions: {QUESTION!r}")
        reply = client.chat.completions.create(
            model=record.model_name,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=48,
            temperature=config.temperature,
        )
        answer = reply.choices[0].message.content or ""
        total = clock() - upload_at
        stages["answered"] = total
        say(clock, f"answer: {answer!r}")
        data2 = b"\n".join(lines[config.rows : 2 * config.rows]) + b"\n"
        say(clock, f"uploading a second version of {name}: {config.rows} other rows, the same sidecar")
        second_at = clock()
        ctx.blobs.upload(TRAINING_CONTAINER, name, data2)
        second, second_stages = _follow_run(ctx, name, clock, config, second_at, after={record.run_id})
        verdict = "goes live" if second.state.value == "live" else f"is rolled back ({second.error})"
        say(clock, f"the second model {verdict}")
        page = _save_run_page(host, second.run_id, config.workdir)
        say(clock, f"run page: {host.base_url}/api/runs/{second.run_id}?code=<host key> (while the demo runs)")
        print(f"           saved as {page}: open it in a browser (one self-contained file)", flush=True)

        dry = sweep_from_context(ctx, dry_run=True)
        say(clock, "janitor, dry run (idle window IDLE_MINUTES=120): nothing is deleted")
        print(sweep_table(dry))
        idle_s = 3.0
        say(clock, f"nobody calls the endpoint for {idle_s:.0f} s; janitor with a {idle_s:.0f}-second idle window:")
        time.sleep(idle_s + 0.5)
        live = sweep_from_context(ctx, dry_run=False, idle_minutes=idle_s / 60, grace_minutes=0)
        print(sweep_table(live))
        runs = {r.run_id: r.state.value for r in ctx.ledger.list()}
        say(clock, f"ledger: {runs}")
        return {
            "run_id": record.run_id,
            "stages": {k: round(v, 1) for k, v in stages.items()},
            "model": f"{record.model_name}:{record.model_version}",
            "endpoint": record.endpoint,
            "answer": answer,
            "deleted_endpoints": live.deleted_endpoints,
            "total_seconds": round(total, 1),
            "base_model": config.model,
            "max_steps": config.max_steps,
            "run_page": str(page),
            "timeline": [state for state, _ in record.timeline],
            "events": [n.state for n in listener.events if n.subject == f"runs/{record.run_id}"],
            "estimate": record.estimate.get("summary"),
            "second": {
                "run_id": second.run_id,
                "state": second.state.value,
                "estimate": second.estimate.get("summary"),
                "throughput_source": second.estimate.get("throughput_source"),
                "test_rows": second.extra.get("split", {}).get("test_rows"),
                "gate": {k: second.gate.get(k) for k in ("verdict", "rows", "new", "live")},
                "stages": {k: round(v, 1) for k, v in second_stages.items()},
            },
        }
    finally:
        host.stop()
        _stop_local_endpoints(ctx)
        reset_app_context()


def _save_run_page(host: Any, run_id: str, workdir: Path) -> Path:
    """The run page as a browser gets it, saved: the demo stops its host on exit, the file stays."""
    import httpx

    key = host.function_keys()["run_status"]
    response = httpx.get(
        f"{host.base_url}/api/runs/{run_id}", headers={"x-functions-key": key, "accept": "text/html"}, timeout=60
    )
    response.raise_for_status()
    path = workdir / f"run-{run_id}.html"
    path.write_text(response.text, encoding="utf-8")
    return path


def _stop_local_endpoints(ctx: Any) -> None:
    """Leave no process behind: cancel unfinished jobs, delete endpoints (the janitor normally did)."""
    with contextlib.suppress(Exception):
        for record in ctx.ledger.list():
            if record.job_name and record.state.value in ("submitting", "submitted", "running"):
                ctx.backend.cancel_job(record.job_name)
    with contextlib.suppress(Exception):
        for endpoint in ctx.backend.list_endpoints():
            ctx.backend.begin_delete_endpoint(endpoint.name)


def main(config: DemoConfig) -> int:
    """Progress goes to stdout; the full INFO log of the host and the app goes to WORKDIR/demo.log."""
    config.workdir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.FileHandler(config.workdir / "demo.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    print(f"full log: {config.workdir / 'demo.log'}", flush=True)

    def _terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = run_demo(config)
    except KeyboardInterrupt:
        print("demo interrupted; everything was stopped", file=sys.stderr)
        return 130
    print("DEMO_RESULT " + json.dumps(result), flush=True)
    return 0


def config_from_args(**kw: Any) -> DemoConfig:
    return replace(DemoConfig(), **{k: v for k, v in kw.items() if v is not None})
