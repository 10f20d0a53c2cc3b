"""The run page: one self-contained HTML page per run, and the table of runs, for a browser.

Rendered server-side from the same status document as the JSON API, with Jinja2 and autoescaping on
for every template: each value a run carries (dataset names, error messages, model answers) reaches the
page escaped, in text, attributes and the SVG alike, without a call at each place that could be
forgotten. No external asset: the CSS, the loss curve (inline SVG) and a five-line script live in the
page; the Content-Security-Policy allows exactly those (by hash) and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader
from markupsafe import Markup

from shared.domain.clock import utcnow
from shared.usecases.run_page.chart import loss_chart
from shared.usecases.run_page.view import (
    FAILURE_STATES,
    REFRESH_S,
    duration,
    final_metrics,
    headline,
    moving,
    number,
    stages,
    state_of,
    web_link,
    when,
)

__all__ = ["CONTENT_SECURITY_POLICY", "render_not_found", "render_run_list", "render_run_page", "render_unavailable"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
_CSS = (TEMPLATES / "page.css").read_text(encoding="utf-8")
_SCRIPT = (TEMPLATES / "keep_code.js").read_text(encoding="utf-8")


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src {_hash(_CSS)}; script-src {_hash(_SCRIPT)}; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""Only the page's own style and script run; an injected tag could not load or run anything even if it
slipped past the escaping."""


def badge(state: str) -> str:
    parsed = state_of(state)
    if parsed in FAILURE_STATES:
        return "bad"
    if state == "live":
        return "ok"
    return "now" if moving(state) else "off"


@cache
def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.globals.update(
        css=Markup(_CSS),  # noqa: S704 - our own file, never user data; CSP pins its hash
        script=Markup(_SCRIPT),  # noqa: S704 - our own file, never user data; CSP pins its hash
        badge=badge,
        duration=duration,
        number=number,
        web_link=web_link,
        when=when,
    )
    return env


def _reports(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    report = str(doc.get("report_url") or "")
    if report:
        out.append(("validation report (JSON)", report))
        if report.endswith(".report.json"):
            out.append(("validation report (Markdown)", report.removesuffix(".json") + ".md"))
    if doc.get("run_report_url"):
        out.append(("run report (JSON)", str(doc["run_report_url"])))
    return out


def render_run_page(doc: Mapping[str, Any], *, api_root: str, api_path: str, now: datetime | None = None) -> str:
    """One run as HTML. `api_root`: the app's public URL up to the route prefix (`https://app/api`), for
    the client snippet; `api_path`: its path (`/api`), for links between pages."""
    now = now or utcnow()
    state = str(doc.get("state", ""))
    return (
        _environment()
        .get_template("run.html")
        .render(
            run=doc,
            stages=stages(doc.get("timeline") or [], state, now=now),
            headline=headline(doc, now=now),
            chart=loss_chart(doc.get("metrics_series") or {}),
            metrics=final_metrics(doc),
            reports=_reports(doc),
            refresh_s=REFRESH_S if moving(state) else None,
            api_root=api_root,
            api_path=api_path,
            now=now,
        )
    )


def render_run_list(runs: Sequence[Mapping[str, Any]], *, api_path: str, now: datetime | None = None) -> str:
    """The table of runs as HTML, each run linking to its page; refreshes itself while one is moving."""
    now = now or utcnow()
    refresh = any(moving(str(r.get("state", ""))) for r in runs)
    return (
        _environment()
        .get_template("runs.html")
        .render(runs=runs, api_path=api_path, refresh_s=REFRESH_S if refresh else None, now=now)
    )


def render_not_found(message: str, *, api_path: str, now: datetime | None = None) -> str:
    """A 404 for a browser: the message (escaped) and a link to the table of runs."""
    return (
        _environment()
        .get_template("missing.html")
        .render(message=message, api_path=api_path, refresh_s=None, now=now or utcnow())
    )


def render_unavailable(message: str, *, api_path: str, retry_after_s: int, now: datetime | None = None) -> str:
    """A 503 for a browser (run storage unreachable): the message and a reload after `retry_after_s` seconds,
    the page's counterpart of the `Retry-After` header."""
    return (
        _environment()
        .get_template("unavailable.html")
        .render(message=message, api_path=api_path, refresh_s=retry_after_s, now=now or utcnow())
    )
