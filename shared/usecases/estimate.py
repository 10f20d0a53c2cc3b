"""The cost guard: what a run will cost (or, on the local backend, how long it will train), worked out before
it is submitted, written into its validation report and onto the run, and a refusal when it is above the cap.

Called from one place in ingest (`estimate_before_submission`, after the backend's checks). The numbers and
their sources are `shared.domain.costs`'s; the ports give the backend's plan (`plan_training`), the prices
(`PriceSource`) and the history of earlier runs (`ThroughputHistory`, fed by `record_throughput` when a job
completes, from the metrics it logged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson

from shared.domain.clock import utcnow
from shared.domain.costs import (
    PriceQuote,
    ThroughputSample,
    TrainingPlan,
    cost_cap,
    estimate_run,
    throughput_sample,
    training_tokens,
)
from shared.domain.naming import report_base
from shared.domain.resources import FineTuneRequest
from shared.domain.runs import RunRecord
from shared.errors import BackendError, ConfigError, InvalidInput, TransientError, TunegridError
from shared.ports import Blobs, FineTuneBackend, Ledger, PriceSource, ThroughputHistory
from shared.settings import REPORTS_CONTAINER, Settings

log = logging.getLogger(__name__)

ESTIMATE_HEADING = "\n## Cost estimate\n"
REPORT_READ_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True)
class CostPorts:
    """Where prices and the throughput history come from; either may be absent (then: no price / no history)."""

    prices: PriceSource | None = None
    history: ThroughputHistory | None = None


def _history(costs: CostPorts, sku: str) -> list[ThroughputSample]:
    if costs.history is None:
        return []
    try:
        return costs.history.recent(sku)
    except TunegridError as exc:  # the estimate falls back on the default throughput, and says so
        log.warning("throughput history of %s unreadable: %s", sku, exc)
        return []


def _price(costs: CostPorts, sku: str, region: str) -> PriceQuote | None:
    if costs.prices is None or not sku or not region:
        return None
    try:
        return costs.prices.hourly_price(sku, region)
    except TunegridError as exc:
        log.warning("price of %s in %s unavailable: %s", sku, region, exc)
        return None


def estimate_for(record: RunRecord, plan: TrainingPlan, *, settings: Settings, costs: CostPorts) -> dict[str, Any]:
    """The estimate of one run as the JSON the report, the ledger and `status` carry."""
    extra = record.extra
    sidecar = extra.get("sidecar") or {}
    tokens = training_tokens(extra.get("stats") or {}, extra.get("split") or {}, plan)
    deployment = sidecar.get("deployment") or {}
    deployment_sku = str(deployment.get("instance_type") or settings.inference_instance_type or plan.inference_sku)
    deployment_count = int(deployment.get("instance_count") or settings.inference_instance_count or 1)
    estimate = estimate_run(
        plan,
        tokens=tokens,
        history=_history(costs, plan.sku),
        price=_price(costs, plan.sku, plan.region) if plan.priced else None,
        deployment_sku=deployment_sku,
        deployment_count=deployment_count,
        deployment_price=_price(costs, deployment_sku, plan.region) if plan.priced else None,
        cap=cost_cap(settings.max_run_cost_usd, sidecar.get("max_cost_usd")),
    )
    return estimate.to_dict()


def estimate_before_submission(
    record: RunRecord,
    request: FineTuneRequest,
    *,
    backend: FineTuneBackend,
    blobs: Blobs,
    ledger: Ledger,
    settings: Settings,
    costs: CostPorts,
) -> tuple[RunRecord, str | None]:
    """Estimate the run, record the estimate (validation report, run record); the record as written and the
    reason to refuse the run, or None.

    The record is the one the ingest delivery holds: the estimate is written conditional on its ETag, so a
    delivery that lost its claim meanwhile gets `ConflictError` here and submits nothing; the returned record
    carries the new ETag for the delivery's next write. A backend that cannot plan the run gives no estimate
    (the report says why); with a cap set that is a refusal, since the run could not be checked against it.
    Transient errors propagate (ingest retries the delivery)."""
    try:
        plan = backend.plan_training(request)
    except TransientError:
        raise
    except (BackendError, ConfigError, InvalidInput) as exc:
        capped = cost_cap(settings.max_run_cost_usd, (record.extra.get("sidecar") or {}).get("max_cost_usd"))
        doc: dict[str, Any] = {"error": f"no estimate: the backend could not plan the run: {exc}"}
        refusal = None
        if capped[0] is not None:
            refusal = f"no cost estimate could be made ({exc}), so the run cannot be checked against the cap of ${capped[0]:,.2f} ({capped[1]})"
            doc["refusal"] = refusal
    else:
        doc = estimate_for(record, plan, settings=settings, costs=costs)
        refusal = doc.get("refusal")
    _record_in_report(blobs, record, doc)
    written = ledger.update(record, estimate=doc)
    log.info("run %s: %s", record.run_id, doc.get("summary") or doc.get("error"), extra={"run_id": record.run_id})
    return written, (str(refusal) if refusal else None)


def estimate_markdown(doc: dict[str, Any]) -> str:
    if doc.get("error"):
        lines = [f"- {doc['error']}"]
    else:
        lines = [f"- **{doc['summary']}**"]
        lines.append(
            f"- {doc['train_rows']} training rows x {doc['epochs']:g} epochs = {doc['rows_trained']:g} rows of about "
            f"{doc['tokens_per_row']:g} tokens ({doc['token_count_method']}): {doc['tokens']:,} tokens"
        )
        if doc.get("kind") == "cost":
            price = doc.get("price") or {}
            if price:
                lines.append(
                    f"- {doc['sku']} in {doc['region']}: ${price['usd_per_hour']:,.4g}/h from the {price['source']} "
                    f"({price['as_of']}){'; ' + price['note'] if price.get('note') else ''}"
                )
            lines.append(f"- plus {doc['overhead_hours']:g} h per node of provisioning, model import and evaluation")
            dep = doc.get("deployment") or {}
            if dep.get("usd_per_hour") is not None:
                lines.append(f"- the deployment ({dep['count']} x {dep['sku']}) bills ${dep['usd_per_hour']:,.4g}/h")
        for note in doc.get("notes") or []:
            lines.append(f"- note: {note}")
    if doc.get("cap_usd") is not None:
        lines.append(f"- cap: ${doc['cap_usd']:,.2f} ({doc['cap_source']})")
    if doc.get("refusal"):
        lines.append(f"- **refused before submission**: {doc['refusal']}")
    return "".join(line + "\n" for line in lines)


def _record_in_report(blobs: Blobs, record: RunRecord, doc: dict[str, Any]) -> None:
    """The estimate goes into the stored validation report (JSON `cost_estimate`, a Markdown section), replacing
    any earlier one, so a repeated delivery writes the same report."""
    base = report_base(record.blob, record.run_id)
    raw = blobs.read_bytes(REPORTS_CONTAINER, f"{base}.report.json", limit=REPORT_READ_LIMIT)
    markdown = (blobs.read_bytes(REPORTS_CONTAINER, f"{base}.report.md", limit=REPORT_READ_LIMIT) or b"").decode()
    report = orjson.loads(raw) if raw else {}
    report["cost_estimate"] = doc
    head, _, tail = markdown.partition(ESTIMATE_HEADING)
    rest = tail.split("\n## ", 1)[1] if "\n## " in tail else ""
    markdown = head.rstrip("\n") + "\n" + ESTIMATE_HEADING + estimate_markdown(doc) + (f"\n## {rest}" if rest else "")
    blobs.upload(
        REPORTS_CONTAINER,
        f"{base}.report.json",
        orjson.dumps(report, option=orjson.OPT_INDENT_2),
        content_type="application/json",
    )
    blobs.upload(REPORTS_CONTAINER, f"{base}.report.md", markdown.encode(), content_type="text/markdown; charset=utf-8")


def record_throughput(record: RunRecord, history: ThroughputHistory | None) -> ThroughputSample | None:
    """Remember how fast a completed run trained on its SKU (best effort: never blocks the roll-out)."""
    if history is None or not record.estimate or not record.metrics:
        return None
    sample = throughput_sample(record.metrics, record.estimate, run_id=record.run_id, at=utcnow())
    if sample is None:
        log.info("run %s: no throughput to record (metrics lack train_runtime)", record.run_id)
        return None
    try:
        history.record(sample)
    except Exception as exc:  # the history only improves later estimates
        log.warning("run %s: throughput not recorded: %s", record.run_id, exc, extra={"run_id": record.run_id})
        return None
    log.info(
        "run %s: trained at %.0f tokens/s per node on %s (%s)",
        record.run_id,
        sample.tokens_per_second,
        sample.sku,
        sample.source,
        extra={"run_id": record.run_id},
    )
    return sample
