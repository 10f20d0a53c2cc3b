"""The validation report of a run: stored as JSON and Markdown in `run-reports`, with the backend's submission checks
added before submission."""

from __future__ import annotations

from typing import Any

from shared.domain.naming import report_base
from shared.domain.resources import Finding
from shared.domain.runs import RunRecord
from shared.ports import Blobs
from shared.settings import REPORTS_CONTAINER

REPORT_READ_LIMIT = 16 * 1024 * 1024


def store_report(blobs: Blobs, *, name: str, run_id: str, report: dict[str, Any], markdown: str) -> str:
    import orjson

    base = report_base(name, run_id)
    url = blobs.upload(
        REPORTS_CONTAINER,
        f"{base}.report.json",
        orjson.dumps(report, option=orjson.OPT_INDENT_2),
        content_type="application/json",
    )
    blobs.upload(REPORTS_CONTAINER, f"{base}.report.md", markdown.encode(), content_type="text/markdown; charset=utf-8")
    return url


CHECKS_HEADING = "\n## Submission checks\n"


def record_findings(blobs: Blobs, record: RunRecord, findings: list[Finding]) -> None:
    """The backend's pre-submission findings go into the stored report (JSON `submission_checks`,
    a markdown section), replacing any earlier ones, so a repeated delivery writes the same report."""
    if not findings:
        return
    base = report_base(record.blob, record.run_id)
    raw = blobs.read_bytes(REPORTS_CONTAINER, f"{base}.report.json", limit=REPORT_READ_LIMIT)
    markdown = (blobs.read_bytes(REPORTS_CONTAINER, f"{base}.report.md", limit=REPORT_READ_LIMIT) or b"").decode()
    import orjson

    doc = orjson.loads(raw) if raw else {}
    doc["submission_checks"] = {
        "passed": not any(f.is_error for f in findings),
        "findings": [f.to_dict() for f in findings],
    }
    markdown = markdown.split(CHECKS_HEADING, 1)[0].rstrip("\n") + "\n" + CHECKS_HEADING
    markdown += "".join(f"- **{f.level.value}** `{f.code}`: {f.message}\n" for f in findings)
    store_report(blobs, name=record.blob, run_id=record.run_id, report=doc, markdown=markdown)
