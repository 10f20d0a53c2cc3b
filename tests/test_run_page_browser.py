"""End to end in a real browser: `tunegrid upload --follow` against the dev host (the real function app,
Azurite, the local backend on the tiny model) takes a dataset to a live model with one command; then
headless Chromium (Debian's package, driven by Playwright; nothing is downloaded) opens the run page of
that live run and of an invalid dataset whose name carries a `<script>`.

Screenshots go to tests/artifacts/ (ignored by git). `make test` installs chromium when it is missing."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.tiny_model import model_cache

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
"""Without the network switches Chromium waits on connections a closed network never answers."""
XSS_NAME = "x<script>window.pwned=1</script>.jsonl"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
SIDECAR = {
    "finetune": {
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "max_seq_length": 512,
        "learning_rate": 2e-4,
        "logging_steps": 1,
        "eval_steps": 3,
    }
}

pytestmark = [pytest.mark.slow, pytest.mark.azurite]


@pytest.fixture(scope="module")
def stack(azurite: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The dev host serving function_app.app on a free port, with the local backend on the tiny model."""
    from shared.adapters.storage import StorageClients
    from shared.bootstrap import reset_app_context
    from tunegrid.azurite import free_port
    from tunegrid.demo import DemoConfig, _env
    from tunegrid.devhost import DevHost, HostTimings

    work = tmp_path_factory.mktemp("browser")
    port = free_port()
    env = _env(DemoConfig(model="tiny-phi3"), azurite.connection_string, port, work / "workspace")
    env.update(
        LOCAL_MODEL_CACHE_DIR=str(model_cache(tmp_path_factory)),
        SMOKE_ROWS="2",
        PROXY_API_KEYS="browser-" + "k" * 40,
    )
    StorageClients.from_connection({"": azurite.connection_string}).ensure_resources()
    reset_app_context()
    host = DevHost(
        "function_app:app",
        settings=env,
        port=port,
        state_dir=work / "devhost",
        timings=HostTimings(blob_poll_interval_s=0.3),
        root=ROOT,
    )
    host.start()
    try:
        yield {
            "host": host,
            "env": env,
            "work": work,
            "key": host.keys.host_keys()["default"],  # opens every page, as the CLI tells a user
            "run_status_key": host.function_keys()["run_status"],
            "timings": {},
        }
    finally:
        host.stop()
        _stop_local_work(env)
        reset_app_context()


def _stop_local_work(env: dict[str, str]) -> None:
    """Leave no trainer or endpoint process behind (the local backend runs each job and serves each endpoint
    in its own process): a job still training when the tests end would go on using a core under later
    modules. A canceled job's supervisor only sleeps, retrying its last events, until its redelivery window
    ends."""
    from shared.bootstrap import AppContext
    from shared.settings import Settings

    backend = AppContext(Settings.from_env(env)).backend
    for job in backend.list_jobs():
        if not job.state.terminal:
            backend.cancel_job(job.name)
    for endpoint in backend.list_endpoints():
        backend.begin_delete_endpoint(endpoint.name)


def _upload(stack: dict[str, Any], *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`tunegrid upload ... --follow` as a user runs it, in its own process, with the stack's settings."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tunegrid", "upload", *args, "--follow", "--interval", "0.5", "--timeout", "600"],
        cwd=ROOT,
        env={**os.environ, **stack["env"]},
        capture_output=True,
        text=True,
        timeout=700,
        check=False,
    )
    return proc, time.monotonic() - started


@pytest.fixture(scope="module")
def live_run(stack: dict[str, Any]) -> dict[str, Any]:
    from tunegrid.demo import SAMPLE, demo_rows

    data = stack["work"] / "browser-live.jsonl"
    data.write_bytes(b"\n".join(demo_rows(SAMPLE.read_bytes().splitlines())[:40]) + b"\n")
    config = stack["work"] / "sidecar.json"
    config.write_text(json.dumps(SIDECAR))
    proc, seconds = _upload(stack, str(data), "--config", str(config), "--base-url", stack["host"].base_url)
    stack["timings"]["upload --follow to live"] = seconds
    run_id = next(
        line.split()[1] for line in proc.stdout.splitlines() if line.startswith("run ") and len(line.split()) == 2
    )
    return {"proc": proc, "run_id": run_id}


@pytest.fixture(scope="module")
def invalid_run(stack: dict[str, Any]) -> dict[str, Any]:
    from tunegrid.demo import SAMPLE, invalid_sample

    data = stack["work"] / "invalid.jsonl"
    data.write_bytes(invalid_sample(SAMPLE.read_bytes().splitlines()[:20]))
    proc, seconds = _upload(stack, str(data), "--name", XSS_NAME, "--base-url", stack["host"].base_url)
    stack["timings"]["upload --follow to invalid"] = seconds
    run_id = next(
        line.split()[1] for line in proc.stdout.splitlines() if line.startswith("run ") and len(line.split()) == 2
    )
    return {"proc": proc, "run_id": run_id}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _status(stack: dict[str, Any], run_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{stack['host'].base_url}/api/runs/{run_id}", headers={"x-functions-key": stack["key"]}, timeout=60
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    return response.json()


def _open(browser: Any, url: str, *, width: int = 1000, height: int = 900) -> tuple[Any, Any, list[str], str]:
    """A fresh page at `url`; also the console messages (a CSP violation would show there) and the HTML as
    the server sent it (the page's own script later adds the key to links, in the browser only)."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    response = page.goto(url)
    assert response is not None and response.status == 200, url
    return context, page, console, response.text()


def test_upload_follow_goes_from_file_to_live_model(stack: dict[str, Any], live_run: dict[str, Any]) -> None:
    """One command: every stage in order, training steps with loss, then endpoint, model name and run page."""
    proc = live_run["proc"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    stages = [line.split("] ", 1)[1].split()[0] for line in out.splitlines() if line.startswith("[") and "] " in line]
    order = ["received", "validating", "submitting", "submitted", "running", "succeeded"]
    order += ["registering", "deploying", "smoke-testing", "evaluating", "shifting-traffic", "live"]
    assert [s for s in stages if s in order] == order
    assert "validation: valid, 40 rows (40 valid)" in out and "training step 6/6  loss " in out
    doc = _status(stack, live_run["run_id"])
    assert doc["state"] == "live"
    assert f"endpoint    {doc['endpoint']}" in out and f"model name  {doc['model_name']}" in out
    assert f"run page    {stack['host'].base_url}/api/runs/{live_run['run_id']}?code=<host key>" in out
    for secret in (stack["key"], stack["run_status_key"], stack["env"]["PROXY_API_KEYS"]):
        assert secret not in out + proc.stderr


def test_invalid_upload_follow_shows_the_first_errors_and_exits_1(invalid_run: dict[str, Any]) -> None:
    """The verdict, counts by code and the first errors with line numbers; exit code 1."""
    proc = invalid_run["proc"]
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "validation: INVALID" in proc.stdout
    for expected in ("line 5: invalid_json", "line 6: unknown_role", "line 7: too_few_messages"):
        assert expected in proc.stdout, expected
    assert f"run {invalid_run['run_id']} ended invalid" in proc.stderr


def test_live_run_page_in_chromium(stack: dict[str, Any], live_run: dict[str, Any], browser: Any) -> None:
    """Stages done, the loss curve has the run's points, model and snippet shown, links keep the key, no CSP error."""
    started = time.monotonic()
    run_id = live_run["run_id"]
    doc = _status(stack, run_id)
    base = stack["host"].base_url
    context, page, console, sent = _open(browser, f"{base}/api/runs/{run_id}?code={stack['key']}")
    try:
        assert page.locator("#state").inner_text() == "live"
        items = page.locator("#stages li")
        assert items.count() == len(doc["timeline"])
        assert set(items.evaluate_all("els => els.map(e => e.className)")) == {"done"}
        assert page.locator("#stages li[data-state=running] .took").inner_text().endswith(" s")
        # the train curve: one vertex per logged loss, left to right by step, higher loss drawn higher
        loss = doc["metrics_series"]["loss"]
        points = page.locator("#loss-curve polyline.train").get_attribute("points") or ""
        xy = [tuple(map(float, p.split(","))) for p in points.split()]
        assert len(xy) == len(loss) >= 6
        for ((x1, y1), (_, v1)), ((x2, y2), (_, v2)) in itertools.pairwise(zip(xy, loss, strict=True)):
            assert x1 < x2 and ((y1 < y2) == (v1 > v2) or v1 == v2)
        dots = page.locator("#loss-curve circle.train").evaluate_all(
            "els => els.map(e => [Number(e.dataset.step), Number(e.dataset.value)])"
        )
        assert dots == [[s, v] for s, v in loss]
        assert page.locator("#loss-curve polyline.eval").count() == (1 if doc["metrics_series"].get("eval_loss") else 0)
        assert page.locator("#model").inner_text().startswith(doc["model_name"])
        assert page.locator("#endpoint").inner_text() == doc["endpoint"]
        assert f"{doc['deployment']} 100 %" in page.locator("#traffic").inner_text()
        snippet = page.locator("#snippet").inner_text()
        assert f'base_url="{base}/api/v1"' in snippet and f'model="{doc["model_name"]}"' in snippet
        assert "valid" in page.locator("#verdict").inner_text()
        assert stack["key"] not in sent and stack["env"]["PROXY_API_KEYS"] not in sent
        # the page's own style applied (the CSP hash matched): a live badge is not the default text colour
        colours = page.evaluate(
            "() => [getComputedStyle(document.querySelector('#state')).color, getComputedStyle(document.body).color]"
        )
        assert colours[0] != colours[1]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "run-page-live.png"), full_page=True)
        # every link keeps the key (in the browser): to the table of runs and back to this run
        page.locator("a", has_text="All runs").click()
        page.wait_for_load_state()
        assert page.title() == "Tunegrid runs" and page.locator("tr.run").count() >= 1
        page.locator(f"a[href^='/api/runs/{run_id}']").click()
        page.wait_for_load_state()
        assert page.locator("#state").inner_text() == "live"
        assert not [c for c in console if "Content Security Policy" in c or c.startswith("error")], console
    finally:
        context.close()
    # run_status's own key opens this page too; the phone-sized viewport shows nothing wider than the screen
    phone, page, _, _ = _open(
        browser, f"{base}/api/runs/{run_id}?code={stack['run_status_key']}", width=390, height=844
    )
    try:
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than a phone
        page.screenshot(path=str(ARTIFACTS / "run-page-phone.png"), full_page=True)
    finally:
        phone.close()
    stack["timings"]["browser: live page"] = time.monotonic() - started


def test_invalid_dataset_page_shows_the_report_and_runs_no_injected_script(
    stack: dict[str, Any], invalid_run: dict[str, Any], browser: Any
) -> None:
    """A `<script>` in the dataset name is shown as text and never runs; verdict, counts and lines shown."""
    started = time.monotonic()
    run_id = invalid_run["run_id"]
    base = stack["host"].base_url
    context, page, console, sent = _open(browser, f"{base}/api/runs/{run_id}?code={stack['key']}")
    try:
        assert page.evaluate("typeof window.pwned") == "undefined"
        assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in sent and "<script>window.pwned" not in sent
        assert page.locator("#dataset").inner_text() == f"training-data/{XSS_NAME}"
        assert page.locator("#state").inner_text() == "invalid"
        assert page.locator("#stages li[data-state=invalid]").get_attribute("class") == "failed"
        assert "invalid" in page.locator("#verdict").inner_text()
        lines = page.locator("#errors tbody tr").evaluate_all(
            "rows => rows.map(r => [r.cells[0].innerText, r.cells[1].innerText])"
        )
        assert ["5", "invalid_json"] in lines and ["6", "unknown_role"] in lines and ["7", "too_few_messages"] in lines
        assert page.locator("script").count() == 1  # the page's own, nothing from the name
        assert not page.locator("meta[http-equiv=refresh]").count()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "run-page-invalid.png"), full_page=True)
        listing = page.goto(f"{base}/api/runs?code={stack['key']}")
        assert listing is not None and listing.status == 200
        assert page.evaluate("typeof window.pwned") == "undefined"
        assert page.get_by_text(f"training-data/{XSS_NAME}").count() == 1
        assert not [c for c in console if "Content Security Policy" in c or c.startswith("error")], console
    finally:
        context.close()
    json_doc = httpx.get(f"{base}/api/runs/{run_id}?code={stack['key']}", timeout=60)
    assert json_doc.headers["content-type"].startswith("application/json") and json_doc.json()["blob"] == XSS_NAME
    html = httpx.get(f"{base}/api/runs/{run_id}?code={stack['key']}", headers={"accept": BROWSER_ACCEPT}, timeout=60)
    assert html.headers["content-type"].startswith("text/html") and "&lt;script&gt;window.pwned=1" in html.text
    stack["timings"]["browser: invalid page"] = time.monotonic() - started
    print("timings:", {k: round(v, 1) for k, v in stack["timings"].items()})
