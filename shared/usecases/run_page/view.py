"""What the run page shows, worked out from the status document (`shared.usecases.runs.run_status`):
the stages with their times and durations, whether the page should refresh itself, the final metrics.
Plain values only; the templates lay them out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from shared.domain.clock import parse_time
from shared.domain.runs import ORDER, TERMINAL, RunState

REFRESH_S = 5
"""How often a page of a run that is still moving reloads itself (a meta refresh: no JavaScript needed)."""

FAILURE_STATES = frozenset({RunState.INVALID, RunState.FAILED, RunState.CANCELED, RunState.ROLLED_BACK, RunState.ERROR})
HAPPY_PATH = tuple(s for s in ORDER if s is not RunState.RETIRED)

STAGE_LABELS: Mapping[str, str] = {
    "received": "Dataset received",
    "validating": "Validating the dataset",
    "invalid": "Dataset invalid",
    "submitting": "Submitting the fine-tune job",
    "submitted": "Job submitted (queued)",
    "running": "Training",
    "succeeded": "Training completed",
    "failed": "Training failed",
    "canceled": "Canceled",
    "registering": "Registering the model",
    "deploying": "Deploying (0 % traffic)",
    "smoke-testing": "Smoke test",
    "evaluating": "Evaluation gate (new against live)",
    "shifting-traffic": "Shifting traffic",
    "live": "Live",
    "rolled-back": "Rolled back",
    "retired": "Retired (replaced by a newer run)",
    "error": "Error",
    "superseded": "Superseded (a newer version of the dataset came)",
    "duplicate": "Duplicate (an identical run is reused)",
}


@dataclass(frozen=True)
class Stage:
    state: str
    label: str
    status: str
    """done | current | failed | pending"""
    started: datetime | None = None
    seconds: float | None = None
    """How long the run spent in this state; for the current state, so far."""


def state_of(value: str) -> RunState | None:
    try:
        return RunState(value)
    except ValueError:
        return None


def moving(state: str) -> bool:
    """True while the run is still on its way (the page refreshes itself): not live and not finished."""
    parsed = state_of(state)
    return parsed is not None and parsed not in TERMINAL and parsed is not RunState.LIVE


def stages(timeline: Sequence[Mapping[str, Any]], state: str, *, now: datetime) -> list[Stage]:
    """The states the run went through, then the ones still ahead on the way to live (pending)."""
    out: list[Stage] = []
    times = [parse_time(step.get("at")) for step in timeline]
    for i, step in enumerate(timeline):
        name = str(step.get("state", ""))
        started = times[i]
        last = i == len(timeline) - 1
        ended = times[i + 1] if not last else (now if moving(name) else None)
        seconds = (ended - started).total_seconds() if started and ended else None
        parsed = state_of(name)
        if last and parsed in FAILURE_STATES:
            status = "failed"
        elif last and moving(name):
            status = "current"
        else:
            status = "done"
        out.append(Stage(name, STAGE_LABELS.get(name, name), status, started, seconds))
    if moving(state):
        reached = {s.state for s in out}
        last_index = max((HAPPY_PATH.index(s) for s in map(state_of, reached) if s in HAPPY_PATH), default=-1)
        out += [
            Stage(s.value, STAGE_LABELS[s.value], "pending")
            for s in HAPPY_PATH[last_index + 1 :]
            if s.value not in reached
        ]
    return out


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{max(seconds, 0):.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def when(value: object) -> str:
    moment = parse_time(value) if isinstance(value, datetime | str) else None
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else ""


def web_link(url: object) -> str | None:
    """`url` when a browser may follow it from the page (http or https), else None: a `javascript:` or
    `file:` value is shown as text, never put in an href."""
    if not isinstance(url, str) or not url:
        return None
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return None
    return url if scheme in ("http", "https") else None


@dataclass(frozen=True)
class Metrics:
    main: list[tuple[str, Any, Any, Any]]
    """The losses."""
    other: list[tuple[str, Any, Any, Any]]


def final_metrics(doc: Mapping[str, Any]) -> Metrics:
    """(name, first, last, points) per metric, losses first: the record's summary, else the live series."""
    summary = doc.get("metrics") or {}
    if summary:
        rows = [
            (str(name), m.get("first"), m.get("last"), m.get("steps"))
            for name, m in sorted(summary.items())
            if isinstance(m, Mapping)
        ]
    else:
        series = doc.get("metrics_series") or {}
        rows = [(str(name), pts[0][1], pts[-1][1], len(pts)) for name, pts in sorted(series.items()) if pts]
    return Metrics(main=[r for r in rows if "loss" in r[0]], other=[r for r in rows if "loss" not in r[0]])


def number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def headline(doc: Mapping[str, Any], *, now: datetime) -> str:
    """One line on where the run stands, timed from the moment its dataset arrived."""
    timeline = doc.get("timeline") or []
    if not timeline:
        return ""
    first, last = parse_time(timeline[0].get("at")), parse_time(timeline[-1].get("at"))
    if first is None or last is None:
        return ""
    state = str(doc.get("state", ""))
    label = STAGE_LABELS.get(state, state)
    if moving(state):
        return f"{label}: on its way for {duration((now - first).total_seconds())} since the dataset arrived."
    if state == RunState.LIVE.value:
        return f"Live {duration((last - first).total_seconds())} after the dataset arrived."
    return f"{label} {duration((last - first).total_seconds())} after the dataset arrived."
