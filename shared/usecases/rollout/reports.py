"""The run report (JSON and Markdown in `run-reports/RUN_ID/`), written when a run reaches an end state."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson

from shared.domain.runs import RunRecord, RunState
from shared.settings import RUN_REPORTS_CONTAINER
from shared.usecases.rollout.model import Rollout

log = logging.getLogger(__name__)


def run_report(record: RunRecord, metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    doc = record.public()
    doc["job_link"] = record.job_url
    doc["model"] = {"name": record.model_name, "version": record.model_version, "id": record.model_id}
    doc["metrics_series"] = dict(metrics or {})
    return doc


def run_report_markdown(record: RunRecord) -> str:
    lines = [f"# Run {record.run_id}: {record.state.value}", "", f"- Dataset: `{record.container}/{record.blob}`"]
    if record.job_name:
        lines.append(f"- Job: `{record.job_name}`" + (f" ({record.job_url})" if record.job_url else ""))
    if record.model_name:
        lines.append(f"- Model: `{record.model_name}` version `{record.model_version}`")
    if record.endpoint:
        lines.append(f"- Endpoint: `{record.endpoint}`, deployment `{record.deployment}`")
    if record.error:
        lines.append(f"- Reason: {record.error}")
    if record.metrics:
        lines += ["", "## Final metrics", ""] + [
            f"- {k}: {v.get('last') if isinstance(v, dict) else v}" for k, v in sorted(record.metrics.items())
        ]
    if record.smoke:
        lines += [
            "",
            "## Smoke test",
            "",
            f"- passed: {record.smoke.get('passed')}, p50 {record.smoke.get('p50_ms')} ms",
        ]
    lines += gate_markdown(record.gate)
    if record.estimate:
        lines += [
            "",
            "## Estimate before submission",
            "",
            f"- {record.estimate.get('summary') or record.estimate.get('error')}",
        ]
    lines += ["", "## Timeline", "", "| state | at |", "|---|---|"] + [f"| {s} | {t} |" for s, t in record.timeline]
    return "\n".join(lines) + "\n"


def _cell(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def gate_markdown(gate: Mapping[str, Any]) -> list[str]:
    """The evaluation gate: verdict, both scores, the rows used, and a few answers side by side."""
    if not gate:
        return []
    new, live = gate.get("new") or {}, gate.get("live") or {}
    lines = ["", "## Evaluation gate", "", f"- verdict: **{gate.get('verdict')}**"]
    if gate.get("rows") is not None:
        lines.append(
            f"- {gate['rows']} test rows, greedy, max {gate.get('max_new_tokens')} new tokens; {gate.get('metric')}"
        )
    if new:
        lines.append(f"- new `{new.get('deployment')}`: ROUGE-L {new.get('rouge_l')}, eval_loss {new.get('eval_loss')}")
    if live:
        lines.append(
            f"- live `{live.get('deployment')}`: ROUGE-L {live.get('rouge_l')}, eval_loss {live.get('eval_loss')}"
        )
    elif new:
        lines.append("- live: none (first model on this endpoint: absolute thresholds only)")
    if gate.get("thresholds"):
        lines.append("- thresholds: " + ", ".join(f"{k} {v}" for k, v in gate["thresholds"].items() if v is not None))
    lines += [f"- why not: {r}" for r in gate.get("reasons") or []]
    lines += [f"- note: {n}" for n in gate.get("notes") or []]
    samples = gate.get("samples") or []
    if samples:
        with_live = any("live" in s for s in samples)
        head = "| row | prompt | reference | new |" + (" live |" if with_live else "")
        lines += ["", head, "|---|---|---|---|" + ("---|" if with_live else "")]
        for s in samples:
            row = f"| {s.get('row')} | {_cell(s.get('prompt'))} | {_cell(s.get('reference'))} | {_cell(s.get('new'))} ({s.get('new_rouge_l')}) |"
            if with_live:
                row += f" {_cell(s.get('live'))} ({s.get('live_rouge_l')}) |"
            lines.append(row)
    return lines


def write_run_report(record: RunRecord, rollout: Rollout) -> str:
    """Store the run report (JSON + Markdown) and remember where; never fails the rollout."""
    try:
        metrics: dict[str, Any] = {}
        submitted = any(state == RunState.SUBMITTED.value for state, _ in record.timeline)
        if record.job_name and submitted:  # a job that was never submitted has no metrics to read
            try:
                metrics = {
                    k: [[p.step, p.value] for p in v]
                    for k, v in rollout.backend.get_job_metrics(record.job_name).items()
                }
            except Exception:
                metrics = {}
        url = rollout.blobs.upload(
            RUN_REPORTS_CONTAINER,
            f"{record.run_id}/report.json",
            orjson.dumps(run_report(record, metrics), option=orjson.OPT_INDENT_2),
            content_type="application/json",
        )
        rollout.blobs.upload(
            RUN_REPORTS_CONTAINER,
            f"{record.run_id}/report.md",
            run_report_markdown(record).encode(),
            content_type="text/markdown; charset=utf-8",
        )
        current = rollout.ledger.get(record.run_id)
        if current is not None and current.run_report_url != url:
            rollout.ledger.update(current, run_report_url=url)
        return url
    except Exception:
        log.exception("run %s: could not write the run report", record.run_id, extra={"run_id": record.run_id})
        return ""
