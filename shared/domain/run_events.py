"""Run events: what subscribers are told when a run changes state (pure; no I/O).

Every state change of a run, and its creation, becomes one pending event in the run record's outbox,
written by the same ETag-conditional write as the change itself (`shared.domain.runs.apply_transition`).
An event is a plain dict: `id` (`<run_id>-<sequence>`, stable across retries, so subscribers de-duplicate
on it), `type` (`Tunegrid.Run.<State>`, one type per state, so a subscription filters with
`--included-event-types`), `subject` (`runs/<run_id>`), `time` (the transition's) and `data`.
The publisher adds the CloudEvents `source` and envelope (`shared.adapters.run_events`).

Nothing secret ever goes into `data`: URLs lose their query strings (SAS tokens, `code=` keys) except
Azure ML studio's `wsid`/`tid` (names, not secrets), and free text (the failure reason) has URLs and
`key=value` secrets masked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from shared.domain.clock import iso
from shared.domain.runs import IN_FLIGHT, RunRecord, RunState
from shared.settings import REPORTS_CONTAINER, RUN_REPORTS_CONTAINER

TYPE_PREFIX = "Tunegrid.Run."
SUBJECT_PREFIX = "runs/"
SOURCE_PREFIX = "/tunegrid/"


def event_source(instance: str) -> str:
    """The CloudEvents `source` of every event of one deployment: `/tunegrid/<TUNEGRID_INSTANCE>`."""
    return SOURCE_PREFIX + quote(instance, safe="")


def event_type(state: RunState) -> str:
    """`Tunegrid.Run.<State>` with the state in PascalCase: `smoke-testing` -> `Tunegrid.Run.SmokeTesting`."""
    return TYPE_PREFIX + "".join(part.capitalize() for part in state.value.split("-"))


EVENT_TYPES: Mapping[RunState, str] = {state: event_type(state) for state in RunState}
"""Every event type a subscription can filter on, by state."""

FAILURE_STATES = (RunState.INVALID, RunState.FAILED, RunState.ROLLED_BACK, RunState.ERROR)
"""The states a "tell me when something went wrong" subscription filters on (canceled is a user's choice)."""

_REASON_STATES = frozenset(
    {
        RunState.INVALID,
        RunState.FAILED,
        RunState.CANCELED,
        RunState.ROLLED_BACK,
        RunState.ERROR,
        RunState.RETIRED,
        RunState.SUPERSEDED,
        RunState.DUPLICATE,
    }
)
"""States whose event says why (the record's `error`: for `superseded` the newer run, for `duplicate` the run
reused)."""
_METRIC_STATES = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELED, RunState.LIVE})
_SMOKE_STATES = frozenset({RunState.EVALUATING, RunState.SHIFTING_TRAFFIC, RunState.LIVE, RunState.ROLLED_BACK})
_RUN_REPORT_STATES = frozenset(
    {RunState.LIVE, RunState.ROLLED_BACK, RunState.FAILED, RunState.CANCELED, RunState.ERROR, RunState.SUPERSEDED}
)
"""End states the roll-out writes a run report for (`shared.usecases.rollout.REPORT_STATES`), when it moved the run."""

MAX_REASON_CHARS = 1000
MAX_METRICS = 20
SAFE_QUERY_KEYS = frozenset({"wsid", "tid"})
"""Query parameters kept in a URL: Azure ML studio's workspace and tenant ids (a link without them asks which
workspace to open). Everything else in a query string is dropped: a SAS token or a function key lives there."""

_URL_IN_TEXT = re.compile(r"https?://[^\s'\"<>()\[\]]+")
_SECRET_PAIR = re.compile(
    r"(?i)\b(sig|code|key|keys|token|password|secret|accountkey|sharedaccesskey|sharedaccesssignature|"
    r"client_secret|api[-_]?key)=([^&;,\s'\"]+)"
)
_BEARER = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}")


def scrub_url(url: str) -> str:
    """The URL without credentials: no user info, no fragment, no query parameter but `SAFE_QUERY_KEYS`."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return ""
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{port}" if port else host
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() in SAFE_QUERY_KEYS]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(kept, safe="/"), ""))


def scrub_text(text: str, *, limit: int = MAX_REASON_CHARS) -> str:
    """Free text (a failure reason) with URLs scrubbed and `key=value` / bearer secrets masked, cut to `limit`."""
    text = _URL_IN_TEXT.sub(lambda m: scrub_url(m.group(0)), text)
    text = _SECRET_PAIR.sub(lambda m: f"{m.group(1)}=***", text)
    text = _BEARER.sub("Bearer ***", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_report_url(record: RunRecord, previous: RunState | None) -> str | None:
    """Where the run report of this end state is (or is about to be: the roll-out writes it right after the move).

    It lives in the data account next to the validation report, as `run-reports/<run_id>/report.json`."""
    if record.run_report_url:
        return scrub_url(record.run_report_url)
    # every end the roll-out makes from a state it drives (`IN_FLIGHT`) writes a run report: through
    # `REPORT_STATES` after a step, or `shared.usecases.rollout.ending.end_run`, which cancel and supersession use
    if record.state not in _RUN_REPORT_STATES or previous not in IN_FLIGHT:
        return None
    marker = f"/{REPORTS_CONTAINER}/"
    if marker not in record.report_url:
        return None
    account = record.report_url.split(marker, 1)[0]
    return scrub_url(f"{account}/{RUN_REPORTS_CONTAINER}/{record.run_id}/report.json")


def _metrics(record: RunRecord) -> dict[str, float] | None:
    if record.state not in _METRIC_STATES or not record.metrics:
        return None
    out: dict[str, float] = {}
    for name, value in sorted(record.metrics.items()):
        last = value.get("last") if isinstance(value, Mapping) else value
        if isinstance(last, int | float) and not isinstance(last, bool):
            out[str(name)] = float(last)
        if len(out) >= MAX_METRICS:
            break
    return out or None


def _smoke(record: RunRecord) -> dict[str, Any] | None:
    if record.state not in _SMOKE_STATES or not record.smoke:
        return None
    rows = record.smoke.get("rows")
    return {
        "passed": bool(record.smoke.get("passed")),
        "p50Ms": record.smoke.get("p50_ms"),
        "rows": len(rows) if isinstance(rows, list) else None,
    }


def run_event(record: RunRecord, *, previous: RunState | None, sequence: int, at: datetime) -> dict[str, Any]:
    """The pending event for `record` having just moved from `previous` (None: the run was created)."""
    return {
        "id": f"{record.run_id}-{sequence}",
        "type": event_type(record.state),
        "subject": f"{SUBJECT_PREFIX}{record.run_id}",
        "time": iso(at),
        "data": {
            "runId": record.run_id,
            "sequence": sequence,
            "state": record.state.value,
            "previousState": previous.value if previous is not None else None,
            "dataset": f"{record.container}/{record.blob}",
            "datasetVersion": record.blob_version,
            "backend": record.backend or None,
            "baseModel": record.base_model or None,
            "modelName": record.model_name or None,
            "modelVersion": record.model_version or None,
            "endpoint": record.endpoint or None,
            "deployment": record.deployment or None,
            "jobName": record.job_name or None,
            "jobUrl": scrub_url(record.job_url) or None,
            "validationReportUrl": scrub_url(record.report_url) or None,
            "runReportUrl": run_report_url(record, previous),
            "reason": scrub_text(record.error) if record.error and record.state in _REASON_STATES else None,
            "smoke": _smoke(record),
            "metrics": _metrics(record),
        },
    }
