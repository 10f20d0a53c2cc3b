"""The run page and the table of runs as HTML (`Accept: text/html`), over a real Azurite ledger and the
hand-written fake backend: negotiation, content, the loss-curve SVG, escaping, and no secret on the page."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from shared.adapters.storage import BlobStore
from shared.adapters.tables import TableRunLedger
from shared.bootstrap import AppContext, set_app_context
from shared.domain.resources import JobState
from shared.domain.runs import RunState
from shared.settings import LEDGER_TABLE, Settings
from shared.usecases.rollout import Rollout, advance_run
from shared.usecases.run_page import CONTENT_SECURITY_POLICY, render_run_list, render_run_page
from shared.usecases.run_page.chart import MAX_POINTS, loss_chart, nice_ticks
from shared.usecases.run_page.view import duration, stages, web_link
from shared.usecases.runs import run_status
from tests.fakes import FakeBackend, FakeUpstream
from tests.support import upload_and_ingest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
PROXY_KEY = "proxy-key-that-must-never-show-1234567890"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


@pytest.fixture
def ctx(storage: Any, storage_conn: str, unique: str) -> Any:
    settings = Settings.from_env(
        {
            "DataStorage": storage_conn,
            "TUNEGRID_INSTANCE": f"page{unique}",
            "SMOKE_ROWS": "2",
            "PROXY_API_KEYS": PROXY_KEY,
        }
    )
    context = AppContext(
        settings,
        overrides={
            "ledger": TableRunLedger(storage.tables.get_table_client(LEDGER_TABLE)),
            "blobs": BlobStore(storage.blobs),
            "backend": FakeBackend(),
            "storage": storage,
        },
    )
    set_app_context(context)
    yield context
    set_app_context(None)


def _ingest(ctx: Any, name: str, data: bytes) -> Any:
    return ctx.ledger.get(upload_and_ingest(ctx, name, data).run_id)


def _rows(count: int = 30) -> list[bytes]:
    return (SAMPLES / "azureml_chat_train.jsonl").read_bytes().splitlines()[:count]


def _live(ctx: Any, unique: str) -> Any:
    record = _ingest(ctx, f"page-{unique}.jsonl", b"\n".join(_rows()) + b"\n")
    ctx.backend.set_job(record.job_name, JobState.COMPLETED)
    rollout = Rollout(
        ledger=ctx.ledger,
        backend=ctx.backend,
        blobs=ctx.blobs,
        settings=ctx.settings,
        upstream=FakeUpstream(ctx.backend),
    )
    for _ in range(20):
        record = advance_run(record.run_id, rollout)
        if record.state == RunState.LIVE:
            return record
    raise AssertionError(f"run did not go live: {record.state} {record.error}")


def _invalid(ctx: Any, name: str) -> Any:
    rows = _rows(12)
    rows[3] = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": NaN}]}'
    rows[7] = rows[7].replace(b'"role": "assistant"', b'"role": "<b>bot</b>"', 1)
    return _ingest(ctx, name, b"\n".join(rows) + b"\n")


@dataclass(frozen=True)
class Answer:
    """A function's response, read the way the host forwards it."""

    status_code: int
    mimetype: str
    charset: str
    headers: Any
    body: bytes

    def get_body(self) -> bytes:
        return self.body


def _call(name: str, *, run_id: str | None = None, accept: str | None = None, code: str = "") -> Answer:
    """Call an HTTP function as the worker does with HTTP streams on: a FastAPI (Starlette) request in."""
    from starlette.requests import Request

    from function_app import app
    from tunegrid.appindex import functions_of

    fns = {f.get_function_name(): f.get_user_function() for f in functions_of(app)}
    path = "/api/runs" + (f"/{run_id}" if run_id else "")
    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "https",
        "server": ("tunegrid-app.example.net", 443),
        "path": path,
        "query_string": f"code={code}".encode() if code else b"",
        "headers": [(b"accept", accept.encode())] if accept is not None else [],
        "path_params": {"run_id": run_id} if run_id else {},
    }
    resp = fns[name](Request(scope))
    content_type = resp.headers.get("content-type", "")
    media_type, _, params = content_type.partition(";")
    charset = params.strip().removeprefix("charset=") if "charset=" in params else ""
    return Answer(resp.status_code, media_type.strip(), charset, resp.headers, bytes(resp.body))


class Page(HTMLParser):
    """Every tag with its attributes, the text, and the contents of style and script elements."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.raw: dict[str, list[str]] = {"style": [], "script": []}
        self._in: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in self.raw:
            self._in = tag

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in:
            self.raw[self._in].append(data)
        else:
            self.text.append(data)

    @property
    def visible(self) -> str:
        return " ".join(" ".join(self.text).split())


def test_negotiation_json_by_default_html_for_a_browser(ctx: Any, unique: str) -> None:
    """No Accept, */* and application/json get JSON; a browser's Accept gets the page, with its headers."""
    record = _ingest(ctx, f"neg-{unique}.jsonl", b"\n".join(_rows()) + b"\n")
    for accept in (None, "*/*", "application/json", "text/html;q=0.1, application/json"):
        resp = _call("run_status", run_id=record.run_id, accept=accept)
        assert resp.mimetype == "application/json" and json.loads(resp.get_body())["run_id"] == record.run_id
        assert resp.headers["Vary"] == "Accept"
    page = _call("run_status", run_id=record.run_id, accept=BROWSER_ACCEPT)
    assert page.status_code == 200 and page.mimetype == "text/html" and page.charset == "utf-8"
    assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert page.headers["Referrer-Policy"] == "no-referrer" and page.headers["Cache-Control"] == "no-store"
    assert record.run_id in Page(page.get_body().decode()).visible
    listing = _call("runs_list", accept=BROWSER_ACCEPT)
    assert listing.mimetype == "text/html"
    assert ("a", {"data-keep-code": None, "href": f"/api/runs/{record.run_id}"}) in Page(
        listing.get_body().decode()
    ).tags
    assert json.loads(_call("runs_list", accept="*/*").get_body())["runs"]
    missing = _call("run_status", run_id="r-nope<i>", accept=BROWSER_ACCEPT)
    assert missing.status_code == 404 and "run r-nope<i> not found" in Page(missing.get_body().decode()).visible


def test_status_document_has_the_validation_summary_and_traffic(ctx: Any, unique: str) -> None:
    """run_status with blobs carries the report's verdict, counts, first errors by line; live runs their traffic."""
    bad = _invalid(ctx, f"bad-{unique}.jsonl")
    assert bad.state == RunState.INVALID
    v = run_status(ctx.ledger, ctx.backend, bad.run_id, blobs=ctx.blobs)["validation"]
    assert v["valid"] is False and v["rows"] == 12
    assert v["error_counts"] == {"invalid_json": 1, "unknown_role": 1}
    assert [(e["line"], e["code"]) for e in v["errors"]] == [(4, "invalid_json"), (8, "unknown_role")]
    assert v["stats"]["tokens_per_row"]["max"] > 0
    live = _live(ctx, unique)
    doc = run_status(ctx.ledger, ctx.backend, live.run_id, blobs=ctx.blobs)
    assert doc["traffic"] == {live.deployment: 100} and doc["validation"]["valid"] is True
    assert "validation" not in run_status(ctx.ledger, ctx.backend, live.run_id)


def test_live_run_page_shows_stages_curve_model_and_snippet(ctx: Any, unique: str) -> None:
    """Every stage done with times, the loss SVG with the series' points, model, endpoint, traffic, smoke, snippet."""
    live = _live(ctx, unique)
    resp = _call("run_status", run_id=live.run_id, accept=BROWSER_ACCEPT, code="function-key-secret-42")
    html = resp.get_body().decode()
    page = Page(html)
    text = page.visible
    for expected in (
        live.run_id,
        "Live",
        f"{live.model_name}:{live.model_version}",
        live.endpoint,
        f"{live.deployment} 100 %",
        "Smoke test passed",
        "train rows",
        "valid 30 rows, 30 valid",
        'base_url="https://tunegrid-app.example.net/api/v1"',
        f'model="{live.model_name}"',
    ):
        assert expected in text, expected
    stage_items = [a for t, a in page.tags if t == "li" and "data-state" in a]
    assert [a["data-state"] for a in stage_items] == [s for s, _ in live.timeline]
    assert {a["class"] for a in stage_items} == {"done"}
    [train] = [a for t, a in page.tags if t == "polyline" and a.get("class") == "train"]
    assert train["data-metric"] == "loss" and len(train["points"].split()) == 2  # FakeBackend: loss at steps 1, 2
    dots = [a for t, a in page.tags if t == "circle" and a.get("class") == "train"]
    assert [(a["data-step"], a["data-value"]) for a in dots] == [("1", "2.5"), ("2", "1.5")]
    (x1, y1), (x2, y2) = (map(float, p.split(",")) for p in train["points"].split())
    assert x1 < x2 and y1 < y2  # loss 2.5 then 1.5: the curve goes down the plot
    assert not any(t == "meta" and a.get("http-equiv") == "refresh" for t, a in page.tags)
    assert PROXY_KEY not in html and "function-key-secret-42" not in html


def test_page_of_an_invalid_dataset_shows_the_report(ctx: Any, unique: str) -> None:
    """Verdict invalid, counts by code, first errors with line numbers, the failed stage, no refresh."""
    bad = _invalid(ctx, f"invalid-{unique}.jsonl")
    page = Page(_call("run_status", run_id=bad.run_id, accept=BROWSER_ACCEPT).get_body().decode())
    text = page.visible
    assert "invalid 12 rows, 10 valid, 2 errors" in text
    assert re.search(r"4 invalid_json .*8 unknown_role", text)
    assert "<b>bot</b>" in text  # the role from the data, as text
    classes = {a["data-state"]: a["class"] for t, a in page.tags if t == "li" and "data-state" in a}
    assert classes == {"received": "done", "validating": "done", "invalid": "failed"}
    assert not any(t == "meta" and a.get("http-equiv") == "refresh" for t, a in page.tags)


HOSTILE = '"><script>window.pwned=1</script><img src=x onerror="window.pwned=2">'


def test_every_value_is_escaped_in_text_attributes_and_svg() -> None:
    """Hostile strings in every field render as text: no new element, no event handler, no javascript: link."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    t = [(now + timedelta(seconds=i)).isoformat() for i in range(4)]
    doc = {
        "run_id": "r" + HOSTILE,
        "state": "running",
        "container": "training-data",
        "blob": HOSTILE + ".jsonl",
        "backend": HOSTILE,
        "base_model": HOSTILE,
        "timeline": [
            {"state": s, "at": a} for s, a in zip(["received", "validating", HOSTILE, "running"], t, strict=True)
        ],
        "job_name": HOSTILE,
        "job_url": "javascript:window.pwned=3",
        "error": HOSTILE,
        "params": {HOSTILE: HOSTILE},
        "split": {"train_rows": HOSTILE, "test_rows": 1, "test_source": HOSTILE},
        "metrics_series": {"loss": [[1, 2.0], [2, 1.0]], HOSTILE: [[1, 1.0]]},
        "metrics": {HOSTILE: {"first": HOSTILE, "last": 1.0, "steps": 1}},
        "model_name": HOSTILE,
        "model_version": HOSTILE,
        "endpoint": HOSTILE,
        "deployment": HOSTILE,
        "traffic": {HOSTILE: 100},
        "smoke": {
            "passed": True,
            "p50_ms": HOSTILE,
            "rows": [{"row": 0, "ok": True, "latency_ms": 1, "answer": HOSTILE}],
        },
        "gate": {
            "verdict": HOSTILE,
            "rows": HOSTILE,
            "metric": HOSTILE,
            "new": {"deployment": HOSTILE, "rouge_l": HOSTILE, "eval_loss": 1.0},
            "live": {"deployment": HOSTILE, "rouge_l": 0.5, "eval_loss": HOSTILE},
            "thresholds": {"max_regression": HOSTILE, "min_rouge_l": HOSTILE, "max_eval_loss": None},
            "reasons": [HOSTILE],
            "notes": [HOSTILE],
            "samples": [{"row": 0, "prompt": HOSTILE, "reference": HOSTILE, "new": HOSTILE, "live": HOSTILE}],
        },
        "estimate": {"summary": HOSTILE, "refusal": HOSTILE, "tokens": HOSTILE, "price": {"usd_per_hour": HOSTILE}},
        "report_url": "javascript:window.pwned=4",
        "run_report_url": "https://reports.example/" + HOSTILE,
        "validation": {
            "valid": False,
            "rows": 1,
            "valid_rows": 0,
            "error_counts": {HOSTILE: 1},
            "warning_counts": {},
            "errors": [{"line": 1, "code": HOSTILE, "message": HOSTILE}],
            "warnings": [],
            "stats": {"tokens_per_row": {HOSTILE: 1}, "sha256": HOSTILE},
        },
    }
    html = render_run_page(doc, api_root="https://app.example/api" + HOSTILE, api_path="/api", now=now)
    page = Page(html)
    assert [t for t, _ in page.tags].count("script") == 1 and [t for t, _ in page.tags].count("img") == 0
    assert not any(name.startswith("on") for _, attrs in page.tags for name in attrs)
    hrefs = [a["href"] for t, a in page.tags if t == "a"]
    assert not any("javascript" in (h or "").lower() for h in hrefs)
    assert "https://reports.example/" + HOSTILE in hrefs  # an http(s) link keeps its text, attribute-escaped
    assert page.visible.count("<script>window.pwned=1</script>") >= 30
    assert "javascript:window.pwned=3" in page.visible  # shown as text only
    listing = Page(
        render_run_list([{"run_id": HOSTILE, "state": HOSTILE, "dataset": HOSTILE, "error": HOSTILE}], api_path="/api")
    )
    assert [t for t, _ in listing.tags].count("script") == 1 and "<script>window.pwned=1</script>" in listing.visible


def test_the_page_shows_the_gates_two_scores_the_answers_and_the_estimate() -> None:
    """Verdict, both deployments' ROUGE-L and eval_loss, rows used, answers side by side; the cost estimate."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    doc = {
        "run_id": "r1",
        "state": "live",
        "container": "training-data",
        "blob": "family.jsonl",
        "timeline": [{"state": "received", "at": now.isoformat()}, {"state": "live", "at": now.isoformat()}],
        "gate": {
            "verdict": "promoted",
            "rows": 20,
            "metric": "ROUGE-L F1",
            "new": {"deployment": "d-new", "rouge_l": 0.3412, "eval_loss": 1.25},
            "live": {"deployment": "d-old", "rouge_l": 0.3301, "eval_loss": 1.31},
            "thresholds": {"max_regression": 0.02, "min_rouge_l": None, "max_eval_loss": None},
            "reasons": [],
            "notes": [],
            "samples": [
                {
                    "row": 0,
                    "prompt": "Tips?",
                    "reference": "Be brief.",
                    "new": "Be short.",
                    "new_rouge_l": 0.5,
                    "live": "Hm.",
                    "live_rouge_l": 0.0,
                }
            ],
        },
        "estimate": {
            "summary": "about 2.1 h on Standard_NC24ads_A100_v4 for 4,500,000 tokens: $8.63",
            "tokens": 4500000,
            "train_rows": 1000,
            "epochs": 3.0,
            "tokens_per_row": 1500.0,
            "tokens_per_second": 600.0,
            "throughput_source": "default for 1 x A100",
            "sku": "Standard_NC24ads_A100_v4",
            "region": "eastus",
            "price": {"usd_per_hour": 3.673, "source": "retail-prices-api", "as_of": "2026-01-01"},
            "deployment": {"sku": "Standard_NC24ads_A100_v4", "count": 1, "usd_per_hour": 3.673},
            "cap_usd": 50.0,
            "cap_source": "MAX_RUN_COST_USD",
        },
    }
    page = Page(render_run_page(doc, api_root="http://h/api", api_path="/api", now=now))
    text = page.visible
    for expected in (
        "Evaluation gate promoted 20 test rows, greedy",
        "new d-new 0.3412 1.25",
        "live d-old 0.3301 1.31",
        "Allowed regression 0.02",
        "Answers side by side (1)",
        "Tips? Be brief. Be short. (0.5) Hm. (0)",
        "about 2.1 h on Standard_NC24ads_A100_v4 for 4,500,000 tokens: $8.63",
        "$3.673/h for Standard_NC24ads_A100_v4 in eastus (retail-prices-api, 2026-01-01)",
        "cap $50.0 (MAX_RUN_COST_USD)",
    ):
        assert expected in text, expected
    assert any(t == "table" and a.get("id") == "gate" for t, a in page.tags)


def test_inline_style_and_script_match_the_policy_hashes() -> None:
    """The CSP allows exactly the page's own style and script (by hash), and nothing from elsewhere."""
    page = Page(render_run_list([], api_path="/api"))
    for kind, source in (("style", "".join(page.raw["style"])), ("script", "".join(page.raw["script"]))):
        digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert f"{kind}-src 'sha256-{digest}'" in CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY
    assert not [a for t, a in page.tags if t in ("link", "img", "iframe") or (t == "script" and a.get("src"))]
    assert ("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}) in page.tags


def test_loss_chart_maps_steps_and_values_to_the_plot() -> None:
    """x grows with the step, y falls as the loss grows; eval is its own curve; long series are thinned."""
    chart = loss_chart(
        {"loss": [[3, 1.0], [1, 3.0], [2, 2.0], [4, float("nan")]], "eval_loss": [[2, 2.5]], "lr": [[1, 1]]}
    )
    assert chart is not None
    train, evals = chart.curves
    assert (train.metric, evals.metric) == ("loss", "eval_loss")
    assert [p.step for p in train.points] == [1, 2, 3]
    xs, ys = [p.x for p in train.points], [p.y for p in train.points]
    assert xs == sorted(xs) and ys == sorted(ys)  # higher loss is higher up (smaller y)
    assert chart.left <= min(xs) and max(xs) <= chart.right and chart.top <= min(ys) and max(ys) <= chart.bottom
    assert loss_chart({"learning_rate": [[1, 0.1]]}) is None and loss_chart({}) is None
    long = loss_chart({"train_loss": [[i, 1 / (i + 1)] for i in range(10_000)]})
    assert long is not None and long.curves[0].total == 10_000 and len(long.curves[0].points) <= MAX_POINTS + 1
    assert long.curves[0].points[-1].step == 9_999 and not long.curves[0].markers
    assert nice_ticks(0.93, 3.07) == [1.0, 1.5, 2.0, 2.5, 3.0]


def test_stages_mark_done_current_failed_and_pending_with_durations() -> None:
    """Past states are done with their durations; the last is current (timed so far) or failed; the rest pending."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    steps = [
        {"state": s, "at": (t0 + timedelta(seconds=10 * i)).isoformat()}
        for i, s in enumerate(["received", "validating", "submitting", "submitted", "running"])
    ]
    moving = stages(steps, "running", now=t0 + timedelta(seconds=95))
    assert [(s.state, s.status) for s in moving[:5]] == [
        ("received", "done"),
        ("validating", "done"),
        ("submitting", "done"),
        ("submitted", "done"),
        ("running", "current"),
    ]
    assert moving[0].seconds == 10 and moving[4].seconds == 55
    assert [s.state for s in moving[5:]] == [
        "succeeded",
        "registering",
        "deploying",
        "smoke-testing",
        "evaluating",
        "shifting-traffic",
        "live",
    ]
    assert {s.status for s in moving[5:]} == {"pending"}
    failed = stages([*steps, {"state": "failed", "at": (t0 + timedelta(seconds=60)).isoformat()}], "failed", now=t0)
    assert failed[-1].status == "failed" and failed[-1].seconds is None and failed[-2].seconds == 20
    assert (duration(4.25), duration(42), duration(125), duration(7322)) == (
        "4.2 s",
        "42 s",
        "2 min 05 s",
        "2 h 02 min",
    )
    assert web_link("https://ml.azure.com/x") and not web_link("javascript:alert(1)") and not web_link("file:///tmp")


def test_pages_refresh_only_while_a_run_is_on_its_way() -> None:
    """A meta refresh while validating, training or rolling out; none once live, invalid or failed."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    for state, refresh in (
        ("validating", True),
        ("running", True),
        ("deploying", True),
        ("live", False),
        ("invalid", False),
        ("failed", False),
    ):
        doc = {
            "run_id": "r1",
            "state": state,
            "container": "c",
            "blob": "b",
            "timeline": [{"state": state, "at": now.isoformat()}],
        }
        tags = Page(render_run_page(doc, api_root="http://h/api", api_path="/api", now=now)).tags
        assert any(t == "meta" and a.get("http-equiv") == "refresh" for t, a in tags) is refresh, state
