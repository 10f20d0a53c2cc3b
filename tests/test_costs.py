"""The cost guard: prices from the Azure Retail Prices API (its documented sample answer, served by a real HTTP
server on 127.0.0.1), their cache in the costs table (Azurite), the repo's dated table; the estimate before
submission, the refusal over budget, the throughput history, and the local backend's time estimate."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from shared.adapters import price_table
from shared.domain.costs import (
    OVERHEAD_HOURS,
    ThroughputSample,
    TrainingPlan,
    choose_throughput,
    cost_cap,
    gpu_type,
    throughput_sample,
)
from shared.domain.resources import DataRef, FineTuneRequest, JobState, MetricPoint
from shared.domain.runs import RunState
from shared.settings import REPORTS_CONTAINER, TRAINING_CONTAINER, Settings
from shared.usecases.estimate import CostPorts, estimate_for
from shared.usecases.rollout import Rollout, tick
from tests.fakes import (
    FakeBackend,
    FakeUpstream,
    FixedPrices,
    InMemoryBlobs,
    InMemoryLedger,
    InMemoryThroughputHistory,
)
from tests.support import upload_and_ingest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
DOCS_ITEMS = json.loads((Path(__file__).parent / "data" / "retail-prices" / "docs-sample-items.json").read_text())
"""The sample answers of the API's documentation (tests/data/retail-prices/README.md)."""
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@contextmanager
def prices_server(pages: list[dict[str, Any]]) -> Iterator[tuple[str, list[str]]]:
    """The Retail Prices API on 127.0.0.1: page i of `pages` for `?page=i` (the first without), every GET
    recorded. `NextPageLink` values may hold `{base}`."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            page = int(parse_qs(urlsplit(self.path).query).get("page", ["0"])[0])
            body = json.dumps(pages[page]).replace("{base}", base).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    base = f"http://127.0.0.1:{server.server_port}/api/retail/prices"
    thread = threading.Thread(target=server.serve_forever, name="test-retail-prices", daemon=True)
    thread.start()
    try:
        yield base, seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _closed_port_url() -> str:
    """An address where nothing listens: the API unreachable."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/retail/prices"


def _api(base_url: str, *, day: datetime = T0) -> Any:
    from shared.adapters.retail_prices import RetailPricesApi

    return RetailPricesApi(base_url=base_url, retries=0, clock=lambda: day)


DOCS_ANSWER = {"Items": DOCS_ITEMS, "NextPageLink": None}


def test_the_documented_answer_gives_the_linux_pay_as_you_go_price() -> None:
    """From the documented sample answer, only the Linux pay-as-you-go USD meter is taken (Standard_M8ms,
    southindia, 2.305 $/h); the question names the size and region, Virtual Machines, Consumption."""
    with prices_server([DOCS_ANSWER]) as (url, seen):
        quote = _api(url).query("Standard_M8ms", "southindia")
    assert quote is not None and quote.usd_per_hour == 2.305
    assert (quote.sku, quote.region, quote.source, quote.as_of) == (
        "Standard_M8ms",
        "southindia",
        "retail-prices-api",
        "2026-03-01",
    )
    assert "Virtual Machines MS Series / M8ms" in quote.note
    [path] = seen
    query = parse_qs(urlsplit(path).query)
    assert query["api-version"] == ["2023-01-01-preview"]
    assert query["$filter"] == [
        "serviceName eq 'Virtual Machines' and armRegionName eq 'southindia' and armSkuName eq 'Standard_M8ms' "
        "and priceType eq 'Consumption'"
    ]


@pytest.mark.parametrize(
    ("sku", "region"),
    [
        ("Standard_F16s", "westeurope"),  # Windows Spot, DevTestConsumption; and an EUR Windows Spot meter
        ("Standard_E64_v4", "southcentralus"),  # a Reservation price per year
        ("Standard_M8ms", "eastus"),  # listed for another region only
    ],
)
def test_windows_spot_devtest_reservation_foreign_currency_and_other_regions_are_never_taken(
    sku: str, region: str
) -> None:
    """The documented Windows, Spot, DevTest, Reservation and EUR meters are not a pay-as-you-go price."""
    with prices_server([DOCS_ANSWER]) as (url, _):
        assert _api(url).query(sku, region) is None


def test_pages_are_followed() -> None:
    """An answer split over pages (`NextPageLink`) is read to the end."""
    pages = [
        {"Items": DOCS_ITEMS[:2], "NextPageLink": "{base}?page=1"},
        {"Items": DOCS_ITEMS[2:], "NextPageLink": None},
    ]
    with prices_server(pages) as (url, seen):
        quote = _api(url).query("Standard_M8ms", "southindia")
    assert quote is not None and quote.usd_per_hour == 2.305 and len(seen) == 2


def test_names_that_are_not_plain_are_refused() -> None:
    """A size or region with quotes or spaces never reaches the filter."""
    from shared.adapters.retail_prices import price_filter

    with pytest.raises(ValueError, match="not a plain Azure name"):
        price_filter("Standard_M8ms' or 1 eq 1", "eastus")


@pytest.mark.azurite
def test_cache_api_stale_cache_then_the_dated_table(storage: Any, unique: str) -> None:
    """The API's answer is cached with its date; while fresh it is used without asking; once stale and the API
    unreachable, the stale answer says so; with nothing cached, the repo's dated table answers."""
    from shared.adapters.cost_tables import TablePriceCache
    from shared.adapters.retail_prices import CACHE_TTL, RetailPrices

    cache = TablePriceCache(storage.tables.create_table(f"costs{unique}"))
    with prices_server([DOCS_ANSWER]) as (url, seen):
        fetched = RetailPrices(api=_api(url), cache=cache, clock=lambda: T0).hourly_price("Standard_M8ms", "southindia")
        assert fetched is not None and fetched.source == "retail-prices-api" and len(seen) == 1
    down = _api(_closed_port_url())

    fresh = RetailPrices(api=down, cache=cache, clock=lambda: T0 + timedelta(days=1))
    quote = fresh.hourly_price("Standard_M8ms", "southindia")
    assert quote is not None and (quote.usd_per_hour, quote.source, quote.as_of) == (
        2.305,
        "retail-prices-api (cached)",
        "2026-03-01",
    )

    later = RetailPrices(api=down, cache=cache, clock=lambda: T0 + CACHE_TTL + timedelta(days=1))
    stale = later.hourly_price("Standard_M8ms", "southindia")
    assert stale is not None and stale.source == "retail-prices-api (cached, stale)" and stale.usd_per_hour == 2.305
    assert "fetched 2026-03-01; refreshing failed: the Retail Prices API could not be reached" in stale.note

    table = later.hourly_price("Standard_NC24ads_A100_v4", "eastus")
    assert table is not None and (table.usd_per_hour, table.source, table.as_of) == (
        price_table.USD_PER_HOUR["Standard_NC24ads_A100_v4"],
        "price table",
        price_table.AS_OF,
    )
    elsewhere = later.hourly_price("Standard_NC24ads_A100_v4", "westeurope")
    assert elsewhere is not None and "no row for westeurope" in elsewhere.note
    assert later.hourly_price("Standard_Unknown_v9", "eastus") is None


def test_every_table_price_is_a_positive_hourly_figure_of_a_known_gpu_size() -> None:
    """The fallback table is dated and lists GPU sizes the estimate knows the GPU type of."""
    assert datetime.fromisoformat(price_table.AS_OF) <= datetime.now()
    for sku, usd in price_table.USD_PER_HOUR.items():
        assert usd > 0 and gpu_type(sku) in ("A100", "H100", "T4"), sku


# ---- the estimate before submission -----------------------------------------------------------------


class World:
    def __init__(self, unique: str, *, plan: TrainingPlan | None = None, **settings: str) -> None:
        self.settings = Settings.from_env({"TUNEGRID_INSTANCE": f"c{unique}", "GATE_ROWS": "2", **settings})
        self.ledger = InMemoryLedger()
        self.blobs = InMemoryBlobs()
        self.backend = FakeBackend()
        if plan is not None:
            self.backend.plan = plan
        self.history = InMemoryThroughputHistory()
        self.prefix = f"c{unique}/"

    def ingest(
        self, costs: CostPorts, *, rows: int = 60, offset: int = 0, sidecar: dict[str, Any] | None = None
    ) -> Any:
        lines = (SAMPLES / "ultrachat_small.jsonl").read_bytes().splitlines()
        blob = self.prefix + "budget.jsonl"
        if sidecar is not None:
            self.blobs.upload(TRAINING_CONTAINER, self.prefix + "budget.config.json", json.dumps(sidecar).encode())
        return upload_and_ingest(self, blob, b"\n".join(lines[offset : offset + rows]) + b"\n", costs=costs)

    def report(self, run_id: str) -> tuple[dict[str, Any], str]:
        record = self.ledger.get(run_id)
        base = f"{record.blob}/{record.run_id}"
        doc = json.loads(self.blobs.read_bytes(REPORTS_CONTAINER, f"{base}.report.json") or b"{}")
        markdown = (self.blobs.read_bytes(REPORTS_CONTAINER, f"{base}.report.md") or b"").decode()
        return doc, markdown


M8MS = TrainingPlan(backend="fake", sku="Standard_M8ms", region="southindia", epochs=2.0, inference_sku="Standard_M8ms")


def test_the_estimate_from_a_recorded_retail_prices_answer(unique: str) -> None:
    """Tokens from the validator x epochs, the default throughput, the documented price: in the validation
    report (JSON and Markdown), on the run and in its status, with the deployment's hourly price."""
    from shared.adapters.retail_prices import RetailPrices
    from shared.usecases.runs import run_status

    world = World(unique, plan=M8MS)
    with prices_server([DOCS_ANSWER]) as (url, _):
        costs = CostPorts(prices=RetailPrices(api=_api(url), cache=None), history=world.history)
        outcome = world.ingest(costs)
    assert outcome.action == "submitted", outcome
    record = world.ledger.get(outcome.run_id)
    est = record.estimate
    stats, split = record.extra["stats"], record.extra["split"]
    per_row = stats["total_tokens"] / stats["valid_rows"]
    tokens = round(split["train_rows"] * 2 * per_row)
    assert (est["tokens"], est["train_rows"], est["epochs"]) == (tokens, split["train_rows"], 2.0)
    assert est["tokens_per_second"] == 100.0 and "default for an unknown GPU" in est["throughput_source"]
    hours = tokens / 100 / 3600
    assert est["hours"] == round(hours, 4)
    assert est["training_usd"] == round((hours + OVERHEAD_HOURS) * 2.305, 2)
    assert est["price"]["usd_per_hour"] == 2.305 and est["price"]["source"] == "retail-prices-api"
    assert est["deployment"] == {
        "sku": "Standard_M8ms",
        "count": 1,
        "usd_per_hour": 2.305,
        "price": est["deployment"]["price"],
    }
    assert est["cap_usd"] is None and est["over_cap"] is False
    report, markdown = world.report(record.run_id)
    assert report["cost_estimate"] == est
    assert "## Cost estimate" in markdown and f"${est['training_usd']:,.2f} at $2.305/h (retail-prices-api" in markdown
    assert "bills $2.305/h" in markdown
    assert run_status(world.ledger, None, record.run_id)["estimate"] == est
    assert world.backend.calls["submit_finetune"] == 1


def test_a_run_over_the_cap_is_refused_before_submission(unique: str) -> None:
    """MAX_RUN_COST_USD below the estimate: the run ends in error, nothing is submitted, the estimate and the
    refusal are in the report."""
    world = World(unique, MAX_RUN_COST_USD="1")
    prices = FixedPrices({("Standard_NC24ads_A100_v4", "eastus"): 3.673})
    outcome = world.ingest(CostPorts(prices=prices, history=world.history))
    record = world.ledger.get(outcome.run_id)
    assert outcome.action == "error" and record.state == RunState.ERROR
    cost = record.estimate["training_usd"]
    assert cost > 1
    assert record.error == (
        f"submission refused: estimated training cost ${cost:,.2f} is above the cap of $1.00 (MAX_RUN_COST_USD)"
    )
    assert world.backend.calls["submit_finetune"] == 0 and not world.backend.submissions
    report, markdown = world.report(record.run_id)
    assert report["cost_estimate"]["over_cap"] is True and report["cost_estimate"]["training_usd"] == cost
    assert "**refused before submission**" in markdown and "- cap: $1.00 (MAX_RUN_COST_USD)" in markdown


@pytest.mark.parametrize(
    ("setting", "sidecar", "refused_by"),
    [
        ("1000", 1.0, "the sidecar's max_cost_usd"),  # the sidecar lowers the cap
        ("1", 1000.0, "MAX_RUN_COST_USD"),  # but cannot raise it
        ("", 1.0, "the sidecar's max_cost_usd"),  # and sets one where none is
        ("1000", None, None),  # under the cap: submitted
    ],
)
def test_the_sidecar_may_only_lower_the_cap(
    unique: str, setting: str, sidecar: float | None, refused_by: str | None
) -> None:
    """`max_cost_usd` in the sidecar lowers MAX_RUN_COST_USD, never raises it."""
    world = World(unique, MAX_RUN_COST_USD=setting)
    prices = FixedPrices({("Standard_NC24ads_A100_v4", "eastus"): 3.673})
    outcome = world.ingest(CostPorts(prices=prices), sidecar={"max_cost_usd": sidecar} if sidecar is not None else {})
    if refused_by is None:
        assert outcome.action == "submitted"
    else:
        assert outcome.action == "error" and f"({refused_by})" in world.ledger.get(outcome.run_id).error
    assert cost_cap(None, None) == (None, "")


def test_a_run_with_no_known_price_is_refused_while_a_cap_is_set(unique: str) -> None:
    """No price for the size and region: with a cap the run cannot be checked, so it is refused; without one it
    is submitted with the cost marked unknown."""
    capped = World(unique, MAX_RUN_COST_USD="50")
    outcome = capped.ingest(CostPorts(prices=FixedPrices()))
    assert outcome.action == "error"
    assert "no price is known for Standard_NC24ads_A100_v4 in eastus" in capped.ledger.get(outcome.run_id).error
    free = World(unique + "x")
    outcome = free.ingest(CostPorts(prices=FixedPrices()))
    record = free.ledger.get(outcome.run_id)
    assert outcome.action == "submitted" and record.estimate["training_usd"] is None
    assert "cost unknown" in record.estimate["summary"]


def test_a_run_canceled_while_it_is_estimated_is_not_submitted(unique: str) -> None:
    """The estimate is written under the ingest delivery's claim (conditional on the record it holds): a run
    canceled while the backend plans it keeps its cancel, and nothing is submitted."""
    from shared.usecases.runs import cancel_run

    world = World(unique)
    canceled: list[str] = []

    def cancel_meanwhile(job_name: str) -> None:
        run_id = job_name.removeprefix("tunegrid-")
        canceled.append(cancel_run(world.ledger, world.backend, run_id, blobs=world.blobs, settings=world.settings))

    world.backend.hooks["plan_training"] = cancel_meanwhile
    outcome = world.ingest(CostPorts(prices=FixedPrices({("Standard_NC24ads_A100_v4", "eastus"): 3.673})))
    record = world.ledger.get(outcome.run_id)
    assert canceled == ["canceled"] and outcome.action == "canceled"
    assert record.state == RunState.CANCELED and record.error == "canceled by user" and record.estimate == {}
    assert world.backend.calls["submit_finetune"] == 0


def test_a_resumed_ingest_estimates_with_the_rollouts_cost_ports(unique: str) -> None:
    """A delivery that died before the estimate leaves its run submitting; the tick that takes it over makes the
    estimate with the roll-out's prices (`Rollout.costs`) and refuses the run over the cap, as ingest would."""
    from datetime import timedelta

    class Killed(BaseException):
        """The host died mid-delivery."""

    world = World(unique, MAX_RUN_COST_USD="1")

    def die(job_name: str) -> None:
        raise Killed

    world.backend.hooks["check_finetune"] = die
    with pytest.raises(Killed):
        world.ingest(CostPorts())
    [left] = world.ledger.list()
    assert left.state == RunState.SUBMITTING and left.estimate == {}
    del world.backend.hooks["check_finetune"]
    prices = FixedPrices({("Standard_NC24ads_A100_v4", "eastus"): 3.673})
    rollout = Rollout(
        ledger=world.ledger,
        backend=world.backend,
        blobs=world.blobs,
        settings=world.settings,
        costs=CostPorts(prices=prices, history=world.history),
        claim_ttl=timedelta(0),
    )
    tick(rollout)
    record = world.ledger.get(left.run_id)
    assert record.state == RunState.ERROR and "above the cap of $1.00 (MAX_RUN_COST_USD)" in record.error
    assert record.estimate["training_usd"] > 1 and prices.asked
    assert world.report(left.run_id)[0]["cost_estimate"] == record.estimate
    assert world.backend.calls["submit_finetune"] == 0


def test_a_completed_run_teaches_the_next_estimate_its_throughput(unique: str) -> None:
    """When a job completes, its tokens/s (num_input_tokens_seen / train_runtime) is recorded for its SKU; the
    next run's estimate uses it instead of the default."""
    world = World(unique)
    world.backend.metrics = {
        "loss": [MetricPoint(1, 2.0), MetricPoint(9, 1.0)],
        "train_runtime": [MetricPoint(9, 100.0)],
        "num_input_tokens_seen": [MetricPoint(1, 1000.0), MetricPoint(9, 250_000.0)],
    }
    costs = CostPorts(prices=FixedPrices({("Standard_NC24ads_A100_v4", "eastus"): 3.673}), history=world.history)
    first = world.ingest(costs)
    record = world.ledger.get(first.run_id)
    assert "default for 1 x A100" in record.estimate["throughput_source"]
    world.backend.set_job(record.job_name, JobState.COMPLETED)
    rollout = Rollout(
        ledger=world.ledger,
        backend=world.backend,
        blobs=world.blobs,
        settings=world.settings,
        upstream=FakeUpstream(world.backend),
        history=world.history,
    )
    for _ in range(12):
        tick(rollout)
    [sample] = world.history.recent("Standard_NC24ads_A100_v4")
    assert (sample.tokens_per_second, sample.run_id, sample.source) == (
        2500.0,
        record.run_id,
        "num_input_tokens_seen / train_runtime",
    )
    second = world.ingest(costs, offset=200)
    estimate = world.ledger.get(second.run_id).estimate
    assert estimate["tokens_per_second"] == 2500.0
    assert estimate["throughput_source"] == "median of 1 earlier run on Standard_NC24ads_A100_v4"


def test_throughput_from_what_the_job_logged() -> None:
    """train_tokens_per_second first, then tokens seen / runtime, then the estimate's tokens / runtime (not when
    max_steps cut the run short); per node."""
    at = T0
    estimate = {"sku": "Standard_ND96asr_v4", "nodes": 2, "tokens": 3_600_000, "notes": []}
    logged = {"train_tokens_per_second": {"last": 8000.0}, "train_runtime": {"last": 600.0}}
    assert throughput_sample(logged, estimate, run_id="r", at=at).tokens_per_second == 4000.0
    assert (
        throughput_sample({"train_runtime": {"last": 600.0}}, estimate, run_id="r", at=at).tokens_per_second == 3000.0
    )
    capped = {**estimate, "notes": ["max_steps 8 x 2 rows per step stops after 16 rows"]}
    assert throughput_sample({"train_runtime": {"last": 600.0}}, capped, run_id="r", at=at) is None
    assert throughput_sample({"loss": {"last": 1.0}}, estimate, run_id="r", at=at) is None


def test_history_median_of_the_latest_runs_and_defaults_per_gpu_type() -> None:
    """The median of the latest runs on the SKU; with none, the GPU type's default times its GPU count."""
    samples = [
        ThroughputSample("Standard_NC24ads_A100_v4", v, f"r{i}", f"2026-01-{i + 1:02d}", "s")
        for i, v in enumerate([100.0, 900.0, 1000.0, 1100.0])
    ]
    assert choose_throughput("Standard_NC24ads_A100_v4", samples).tokens_per_second == 950.0
    nd = choose_throughput("Standard_ND96isr_H100_v5", [])
    assert nd.tokens_per_second == 8 * 1400.0 and "8 x H100" in nd.source
    local = choose_throughput("local-cpu", [])
    assert (
        local.tokens_per_second == 100.0
        and local.source == "default for the local backend on cpu; no earlier run on local-cpu"
    )


def test_the_local_backend_estimates_time_from_its_measured_tokens_per_second(tmp_path: Path) -> None:
    """The local backend's plan is this machine, unpriced: the estimate is a time, from the tokens/s measured on
    its earlier runs, and no cost cap applies."""
    from tunegrid.local import LocalBackend

    backend = LocalBackend(tmp_path / "ws", webhook_url=None)
    request = FineTuneRequest(
        run_id="rlocal",
        job_name="tunegrid-rlocal",
        dataset="demo.jsonl",
        train=DataRef("prepared-data", "rlocal/train.jsonl", "file:///dev/null"),
        test=DataRef("prepared-data", "rlocal/test.jsonl", "file:///dev/null"),
        params={"max_steps": 8, "per_device_train_batch_size": 2, "max_seq_length": 256},
    )
    plan = backend.plan_training(request)
    assert (plan.backend, plan.priced, plan.max_steps, plan.rows_per_step, plan.max_seq_length) == (
        "local",
        False,
        8,
        2,
        256,
    )
    assert plan.sku in ("local-cpu", "local-cuda")
    from shared.domain.runs import new_record

    record = new_record(
        run_id="rlocal", container="training-data", blob="demo.jsonl", blob_version="1", backend="local"
    )
    record = replace(
        record,
        extra={
            "stats": {"valid_rows": 48, "total_tokens": 48 * 300, "token_count_method": "estimate"},
            "split": {"train_rows": 46},
            "sidecar": {},
        },
    )
    history = InMemoryThroughputHistory([ThroughputSample(plan.sku, 400.0, "rold", "2026-01-01T00:00:00+00:00", "s")])
    settings = Settings.from_env({"MAX_RUN_COST_USD": "0.01"})
    est = estimate_for(record, plan, settings=settings, costs=CostPorts(history=history))
    assert est["kind"] == "time" and est["training_usd"] is None and est["refusal"] is None
    assert est["tokens"] == 16 * 256  # max_steps 8 x 2 rows, each cut at max_seq_length 256
    assert est["hours"] == round(16 * 256 / 400 / 3600, 4)
    assert est["summary"] == (
        f"about 10 s of training for 4,096 tokens on this machine at 400 tokens/s per node (median of 1 earlier "
        f"run on {plan.sku})"
    )
