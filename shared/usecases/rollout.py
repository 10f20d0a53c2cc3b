"""Roll-out use case: a finished job becomes a live deployment without anyone watching.

The ledger drives a state machine:
    submitted -> running -> succeeded | failed | canceled
    succeeded -> registering -> deploying -> smoke-testing -> shifting-traffic -> live (-> retired)
    deploying | smoke-testing | shifting-traffic -> rolled-back
Events are only a nudge: every step re-reads the backend's truth, checks before it acts, and takes a
short lease on the record (an ETag-conditional write) so that duplicate, concurrent or out-of-order
deliveries never repeat work. Long operations (endpoint and deployment provisioning, traffic updates)
are started, recorded and resumed by the next event or timer tick, never waited on.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from shared.domain.clock import utcnow
from shared.domain.events import RunEvent
from shared.domain.naming import (
    OWNER_TAG,
    RUN_TAG,
    deployment_name_for,
    endpoint_name_for,
    model_name_for,
    model_version_for,
)
from shared.domain.resources import DeploymentSpec, JobState, ModelRef, ProvisioningState
from shared.domain.runs import RunRecord, RunState
from shared.errors import ConflictError, NotFound, TransientError
from shared.ports import Blobs, FineTuneBackend, Ledger
from shared.settings import RUN_REPORTS_CONTAINER, Settings

log = logging.getLogger(__name__)

LEASE_TTL = timedelta(minutes=5)
IN_FLIGHT = (
    RunState.SUBMITTED,
    RunState.RUNNING,
    RunState.SUCCEEDED,
    RunState.REGISTERING,
    RunState.DEPLOYING,
    RunState.SMOKE_TESTING,
    RunState.SHIFTING_TRAFFIC,
)
REPORT_STATES = frozenset({RunState.LIVE, RunState.ROLLED_BACK, RunState.FAILED, RunState.CANCELED, RunState.ERROR})


@dataclass(frozen=True)
class Rollout:
    """The ports and settings one rollout step needs."""

    ledger: Ledger
    backend: FineTuneBackend
    blobs: Blobs
    settings: Settings
    now: Callable[[], datetime] = utcnow


@dataclass(frozen=True)
class EventOutcome:
    action: str
    """ignored | advanced"""
    reason: str
    run_id: str | None = None
    state: str | None = None


# --- entry points ------------------------------------------------------------------------------


def handle_run_event(event: RunEvent, rollout: Rollout) -> EventOutcome:
    """Act only on the parent run of a job this app submitted; everything else is logged and ignored."""
    if event.is_child_step:
        log.info("ignoring event %s: child step %s of pipeline %s", event.id, event.run_id, event.parent_run_id)
        return EventOutcome("ignored", "child pipeline step")
    record = None
    if event.our_run_id:
        record = rollout.ledger.get(event.our_run_id)
    if record is None and event.run_id:
        record = rollout.ledger.find_by_job(event.run_id)
    if record is None:
        log.info("ignoring event %s: run %s was not submitted by this app", event.id, event.run_id)
        return EventOutcome("ignored", "foreign run")
    if record.job_name and event.run_id and record.job_name != event.run_id:
        log.info(
            "ignoring event %s: run %s is not job %s of run %s", event.id, event.run_id, record.job_name, record.run_id
        )
        return EventOutcome("ignored", "not the parent job", run_id=record.run_id)
    log.info(
        "event %s: job %s %s (run %s is %s)",
        event.id,
        event.run_id,
        event.run_status or event.event_type,
        record.run_id,
        record.state.value,
        extra={"run_id": record.run_id},
    )
    final = advance_run(record.run_id, rollout)
    return EventOutcome("advanced", f"run is {final.state.value}", run_id=record.run_id, state=final.state.value)


def tick(rollout: Rollout) -> list[RunRecord]:
    """Timer entry: move every in-flight run on (resumes long steps, catches missed events)."""
    from shared.usecases.ingest import resume_stale_submission

    moved = []
    for record in rollout.ledger.list():
        if record.state == RunState.SUBMITTING:
            resume_stale_submission(record, ledger=rollout.ledger, backend=rollout.backend, now=rollout.now())
            continue
        if record.state not in IN_FLIGHT:
            continue
        try:
            moved.append(advance_run(record.run_id, rollout))
        except TransientError:
            log.warning(
                "run %s: transient error, next tick retries",
                record.run_id,
                exc_info=True,
                extra={"run_id": record.run_id},
            )
    return moved


def advance_run(run_id: str, rollout: Rollout, *, max_steps: int = 12) -> RunRecord:
    """Move one run as far as it can go now, stopping at the first step that has to wait.

    A step that fails gives its lease back at once, so the next event or tick retries it without
    waiting for the lease to expire; the error propagates (the trigger decides about retries).
    """
    record = rollout.ledger.get(run_id)
    if record is None:
        raise NotFound(f"run {run_id} not found")
    for _ in range(max_steps):
        step = _STEPS.get(record.state)
        if step is None:
            break
        _held.token = ""
        try:
            moved = step(record, rollout)
        except ConflictError as exc:
            log.info("run %s: %s (another delivery is handling it)", run_id, exc, extra={"run_id": run_id})
            moved = None
        except Exception:
            _give_back(run_id, rollout)
            raise
        if moved is None or moved.state == record.state:
            record = moved or rollout.ledger.get(run_id) or record
            break
        record = moved
        if record.state in REPORT_STATES:
            write_run_report(record, rollout)
    return record


# --- leases --------------------------------------------------------------------------------------


_held = threading.local()


def _give_back(run_id: str, rollout: Rollout) -> None:
    token = getattr(_held, "token", "")
    if not token:
        return
    try:
        current = rollout.ledger.get(run_id)
        if current is not None and f"|{token}|" in current.operation:
            rollout.ledger.update(current, operation="")
    except Exception:  # the lease expires on its own after LEASE_TTL
        log.warning("run %s: could not give the step lease back", run_id, exc_info=True, extra={"run_id": run_id})


def _lease(record: RunRecord, rollout: Rollout) -> RunRecord | None:
    """Take the step lease on this record (ETag-conditional); None when someone else holds it."""
    now = rollout.now()
    if record.operation:
        state, _, stamp = ([*record.operation.split("|"), "", ""])[:3]
        try:
            fresh = state == record.state.value and now - datetime.fromisoformat(stamp) < LEASE_TTL
        except ValueError:
            fresh = False
        if fresh:
            return None
    token = uuid.uuid4().hex[:12]
    try:
        leased = rollout.ledger.update(record, operation=f"{record.state.value}|{token}|{now.isoformat()}")
    except ConflictError:
        return None
    _held.token = token
    return leased


def _leased(step: Callable[[RunRecord, Rollout], RunRecord | None]) -> Callable[[RunRecord, Rollout], RunRecord | None]:
    """Run a step only under its lease; the step gets the leased record (its ETag is the lease's)."""

    @functools.wraps(step)
    def leased_step(record: RunRecord, rollout: Rollout) -> RunRecord | None:
        leased = _lease(record, rollout)
        return None if leased is None else step(leased, rollout)

    return leased_step


def _release(record: RunRecord, rollout: Rollout, **fields: Any) -> RunRecord:
    """Give the lease back without moving state (the step must wait for a long operation)."""
    try:
        return rollout.ledger.update(record, operation="", **fields)
    except ConflictError:
        return rollout.ledger.get(record.run_id) or record


def _move(record: RunRecord, rollout: Rollout, to: RunState, **fields: Any) -> RunRecord:
    return rollout.ledger.transition(record.run_id, to, expect=[record.state], operation="", **fields)


# --- steps ---------------------------------------------------------------------------------------


def _step_job(record: RunRecord, rollout: Rollout) -> RunRecord | None:
    status = rollout.backend.get_job(record.job_name)
    if status is None:
        log.warning(
            "run %s: job %s not found at the backend", record.run_id, record.job_name, extra={"run_id": record.run_id}
        )
        return None
    if status.state == JobState.RUNNING and record.state == RunState.SUBMITTED:
        return _move(record, rollout, RunState.RUNNING)
    if status.state == JobState.COMPLETED:
        metrics = _final_metrics(record, rollout)
        return _move(record, rollout, RunState.SUCCEEDED, metrics=metrics, job_url=status.studio_url or record.job_url)
    if status.state in (JobState.FAILED, JobState.CANCELED):
        to = RunState.FAILED if status.state == JobState.FAILED else RunState.CANCELED
        reason = status.error or f"job {status.raw_status.lower()} (no reason given by the backend)"
        log.warning(
            "run %s: job %s %s: %s",
            record.run_id,
            record.job_name,
            status.raw_status,
            reason,
            extra={"run_id": record.run_id},
        )
        return _move(record, rollout, to, error=reason[:4000], metrics=_final_metrics(record, rollout))
    return None


def _final_metrics(record: RunRecord, rollout: Rollout) -> dict[str, Any]:
    try:
        series = rollout.backend.get_job_metrics(record.job_name)
    except Exception as exc:  # metrics are for the report; never block the rollout on them
        log.warning("run %s: metrics unavailable: %s", record.run_id, exc, extra={"run_id": record.run_id})
        return {}
    out: dict[str, Any] = {}
    for name, points in series.items():
        if points:
            out[name] = {
                "last": points[-1].value,
                "first": points[0].value,
                "steps": len(points),
                "last_step": points[-1].step,
            }
    return out


def _step_succeeded(record: RunRecord, rollout: Rollout) -> RunRecord | None:
    return _move(record, rollout, RunState.REGISTERING)


@_leased
def _step_register(record: RunRecord, rollout: Rollout) -> RunRecord | None:
    name, version = model_name_for(record), model_version_for(record)
    model = rollout.backend.get_model(name, version)
    if model is None:
        model = rollout.backend.register_model(
            job_name=record.job_name,
            name=name,
            version=version,
            description=f"Fine-tuned by Tunegrid run {record.run_id} from {record.base_model} on {record.container}/{record.blob} (sha256 {record.sha256[:16]}), job {record.job_name}.",
            tags={
                RUN_TAG: record.run_id,
                OWNER_TAG: rollout.settings.instance,
                "tunegridjob": record.job_name,
                "tunegridbasemodel": record.base_model,
            },
        )
    endpoint = endpoint_name_for(record, model.name, rollout.settings)
    return _move(
        record,
        rollout,
        RunState.DEPLOYING,
        model_name=model.name,
        model_version=model.version,
        model_id=model.id,
        endpoint=endpoint,
        deployment=deployment_name_for(record),
    )


def _deployment_spec(record: RunRecord, settings: Settings) -> DeploymentSpec:
    overrides = (record.extra.get("sidecar") or {}).get("deployment") or {}
    return DeploymentSpec(
        endpoint=record.endpoint,
        name=record.deployment,
        model=ModelRef(name=record.model_name, version=record.model_version, id=record.model_id),
        instance_type=overrides.get("instance_type", settings.inference_instance_type),
        instance_count=overrides.get("instance_count", settings.inference_instance_count),
        request_timeout_ms=min(overrides.get("request_timeout_ms", settings.request_timeout_ms), 180_000),
        liveness_initial_delay_s=overrides.get("liveness_initial_delay_s", settings.liveness_initial_delay_s),
        max_concurrent_requests_per_instance=overrides.get(
            "max_concurrent_requests_per_instance", settings.max_concurrent_requests_per_instance
        ),
        tags={RUN_TAG: record.run_id, OWNER_TAG: settings.instance},
    )


@_leased
def _step_deploy(record: RunRecord, rollout: Rollout) -> RunRecord | None:
    backend = rollout.backend
    endpoint = backend.get_endpoint(record.endpoint)
    if endpoint is None:
        backend.begin_create_endpoint(
            record.endpoint,
            tags={OWNER_TAG: rollout.settings.instance, "tunegridmodel": record.model_name},
            description=f"Tunegrid endpoint for {record.model_name}",
        )
        log.info("run %s: creating endpoint %s", record.run_id, record.endpoint, extra={"run_id": record.run_id})
        return _release(record, rollout)
    if endpoint.provisioning_state.in_progress:
        return _release(record, rollout)
    if endpoint.provisioning_state == ProvisioningState.FAILED:
        return _move(record, rollout, RunState.ERROR, error=f"endpoint {record.endpoint} failed to provision")
    previous = record.previous_deployment
    if not previous:
        holders = [name for name, pct in endpoint.traffic.items() if pct > 0 and name != record.deployment]
        previous = max(holders, key=lambda n: endpoint.traffic[n]) if holders else ""
        if previous:
            record = rollout.ledger.update(record, previous_deployment=previous)
    deployment = backend.get_deployment(record.endpoint, record.deployment)
    if deployment is None:
        backend.begin_create_deployment(_deployment_spec(record, rollout.settings))
        log.info(
            "run %s: creating deployment %s/%s at 0 %% traffic",
            record.run_id,
            record.endpoint,
            record.deployment,
            extra={"run_id": record.run_id},
        )
        return _release(record, rollout)
    if deployment.provisioning_state.in_progress:
        return _release(record, rollout)
    if deployment.provisioning_state != ProvisioningState.SUCCEEDED:
        reason = f"deployment {record.deployment} {deployment.provisioning_state.value.lower()}: {deployment.error or 'no reason given'}"
        backend.begin_delete_deployment(record.endpoint, record.deployment)
        return _move(record, rollout, RunState.ROLLED_BACK, error=reason)
    return _move(record, rollout, RunState.SMOKE_TESTING)


def _smoke_conversations(record: RunRecord, rollout: Rollout, rows: int) -> list[list[dict[str, Any]]]:
    from shared.domain.validation import iter_lines

    test = record.extra.get("test") or {}
    out: list[list[dict[str, Any]]] = []
    if not test:
        return out
    for _, line in iter_lines(
        rollout.blobs.chunks(test["container"], test["blob"]), max_line_bytes=rollout.settings.validation_max_line_bytes
    ):
        if line is None or not line.strip():
            continue
        messages = [m for m in orjson.loads(line)["messages"] if isinstance(m, dict)]
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()
        if messages:
            out.append([{"role": m["role"], "content": m["content"]} for m in messages])
        if len(out) >= rows:
            break
    return out


def _answer_text(response: Any) -> str:
    """The first answer, in whichever shape the serving image used (the proxy's normaliser)."""
    from shared.usecases.scoring import normalise_output

    texts = normalise_output(response).texts
    return texts[0] if texts else ""


@_leased
def _step_smoke(record: RunRecord, rollout: Rollout) -> RunRecord | None:
    settings = rollout.settings
    conversations = _smoke_conversations(record, rollout, settings.smoke_rows)
    results: list[dict[str, Any]] = []
    failure = "" if conversations else "no test rows to smoke-test with"
    for i, conversation in enumerate(conversations):
        body = {
            "input_data": {
                "input_string": [conversation],
                # Greedy decoding: the verdict on a model must not depend on a dice roll.
                "parameters": {"do_sample": False, "temperature": 0.0, "max_new_tokens": 32},
            },
            "params": {},
        }
        started = time.perf_counter()
        try:
            answer = _answer_text(
                rollout.backend.invoke(
                    record.endpoint, body, deployment=record.deployment, timeout_s=settings.smoke_timeout_s
                )
            )
            error = "" if answer.strip() else "empty answer"
        except TransientError:
            raise  # throttling or a blip says nothing about the model: retry on the next tick
        except Exception as exc:
            answer, error = "", f"{type(exc).__name__}: {exc}"
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
        results.append({"row": i, "latency_ms": latency_ms, "ok": not error, "error": error, "answer": answer[:200]})
        if error:
            failure = f"smoke row {i}: {error}"
            break
    latencies = [r["latency_ms"] for r in results]
    smoke = {
        "rows": results,
        "passed": not failure,
        "p50_ms": sorted(latencies)[len(latencies) // 2] if latencies else None,
    }
    if failure:
        log.warning(
            "run %s: smoke test failed (%s): rolling back", record.run_id, failure, extra={"run_id": record.run_id}
        )
        rollout.backend.begin_delete_deployment(record.endpoint, record.deployment)
        return _move(
            record,
            rollout,
            RunState.ROLLED_BACK,
            smoke=smoke,
            error=f"smoke test failed: {failure}; previous traffic kept",
        )
    mirror = (
        (record.extra.get("sidecar") or {})
        .get("deployment", {})
        .get("mirror_traffic_percent", settings.mirror_traffic_percent)
    )
    if mirror and record.previous_deployment:
        endpoint = rollout.backend.get_endpoint(record.endpoint)
        if endpoint is not None:
            rollout.backend.begin_set_traffic(
                record.endpoint, dict(endpoint.traffic), mirror_traffic={record.deployment: int(mirror)}
            )
    return _move(record, rollout, RunState.SHIFTING_TRAFFIC, smoke=smoke)


@_leased
def _step_shift(record: RunRecord, rollout: Rollout) -> RunRecord | None:
    backend = rollout.backend
    endpoint = backend.get_endpoint(record.endpoint)
    if endpoint is None:
        return _move(
            record, rollout, RunState.ERROR, error=f"endpoint {record.endpoint} disappeared during the traffic shift"
        )
    if endpoint.provisioning_state.in_progress:
        return _release(record, rollout)
    if endpoint.traffic.get(record.deployment, 0) != 100 or endpoint.mirror_traffic:
        traffic = {name: 0 for name in endpoint.traffic}
        traffic[record.deployment] = 100
        backend.begin_set_traffic(record.endpoint, traffic, mirror_traffic={})
        log.info(
            "run %s: shifting 100 %% of %s to %s",
            record.run_id,
            record.endpoint,
            record.deployment,
            extra={"run_id": record.run_id},
        )
        return _release(record, rollout)
    previous = record.previous_deployment
    if (
        previous
        and previous != record.deployment
        and endpoint.traffic.get(previous, 0) == 0
        and backend.get_deployment(record.endpoint, previous) is not None
    ):
        backend.begin_delete_deployment(record.endpoint, previous)
        log.info(
            "run %s: deleting previous deployment %s (0 %% traffic)",
            record.run_id,
            previous,
            extra={"run_id": record.run_id},
        )
    live = _move(record, rollout, RunState.LIVE)
    _retire_replaced(live, rollout)
    return live


def _retire_replaced(live: RunRecord, rollout: Rollout) -> None:
    for other in rollout.ledger.list():
        if other.run_id != live.run_id and other.state == RunState.LIVE and other.endpoint == live.endpoint:
            try:
                rollout.ledger.transition(
                    other.run_id, RunState.RETIRED, expect=[RunState.LIVE], error=f"replaced by run {live.run_id}"
                )
            except ConflictError:
                continue


_STEPS: Mapping[RunState, Callable[[RunRecord, Rollout], RunRecord | None]] = {
    RunState.SUBMITTED: _step_job,
    RunState.RUNNING: _step_job,
    RunState.SUCCEEDED: _step_succeeded,
    RunState.REGISTERING: _step_register,
    RunState.DEPLOYING: _step_deploy,
    RunState.SMOKE_TESTING: _step_smoke,
    RunState.SHIFTING_TRAFFIC: _step_shift,
}


# --- run report ----------------------------------------------------------------------------------


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
    lines += ["", "## Timeline", "", "| state | at |", "|---|---|"] + [f"| {s} | {t} |" for s, t in record.timeline]
    return "\n".join(lines) + "\n"


def write_run_report(record: RunRecord, rollout: Rollout) -> str:
    """Store the run report (JSON + Markdown) and remember where; never fails the rollout."""
    try:
        metrics: dict[str, Any] = {}
        if record.job_name:
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
