"""The roll-out steps, one per state: each re-reads the backend's truth, checks before it acts, and
either moves the run on or gives its lease back to wait for a long operation.

Steps that act (register, deploy, smoke-test, evaluate, shift) run under a run lease (`Held`) and call
`authorise` right before each side effect; the endpoint steps (all but register) also hold the endpoint lease. A side effect that undoes
(deleting a failed deployment) comes after the move that decides it is won. Every side effect is idempotent
by name (model version, endpoint and deployment names derive from the run)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import orjson

from shared.domain.leases import RunLease
from shared.domain.naming import (
    OWNER_TAG,
    RUN_TAG,
    deployment_name_for,
    endpoint_name_for,
    model_name_for,
    model_version_for,
)
from shared.domain.resources import DeploymentSpec, EndpointInfo, JobState, ModelRef, ProvisioningState
from shared.domain.runs import RunRecord, RunState, is_run_id
from shared.errors import ConflictError, TransientError, UpstreamError
from shared.settings import Settings
from shared.usecases.estimate import record_throughput
from shared.usecases.rollout.ending import end_held
from shared.usecases.rollout.gate import step_evaluate
from shared.usecases.rollout.leases import Held, authorise, hold_endpoint, move, release, release_endpoint, write
from shared.usecases.rollout.model import ENDPOINT_STATES, Rollout
from shared.usecases.rollout.reports import write_run_report
from shared.usecases.runs import retire_live

log = logging.getLogger(__name__)


def _step_job(record: RunRecord, rollout: Rollout) -> RunRecord | None:
    status = rollout.backend.get_job(record.job_name)
    if status is None:
        log.warning(
            "run %s: job %s not found at the backend", record.run_id, record.job_name, extra={"run_id": record.run_id}
        )
        return None
    ledger = rollout.ledger
    if status.state == JobState.RUNNING and record.state == RunState.SUBMITTED:
        return ledger.transition(record, RunState.RUNNING)
    if status.state == JobState.COMPLETED:
        metrics = _final_metrics(record, rollout)
        return ledger.transition(
            record, RunState.SUCCEEDED, metrics=metrics, job_url=status.studio_url or record.job_url
        )
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
        return ledger.transition(record, to, error=reason[:4000], metrics=_final_metrics(record, rollout))
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
    # How fast it trained on its SKU, so later cost estimates learn it: one row per run (an upsert), so a
    # second delivery racing this observing step writes the same row again.
    record_throughput(record, rollout.history)
    return rollout.ledger.transition(record, RunState.REGISTERING)


def _step_register(held: Held, rollout: Rollout) -> RunRecord | None:
    record = held.record
    name, version = model_name_for(record), model_version_for(record)
    model = rollout.backend.get_model(name, version)
    if model is None:
        held = authorise(held, rollout)
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
    return move(
        held,
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


def _step_deploy(held: Held, rollout: Rollout) -> RunRecord | None:
    backend = rollout.backend
    record = held.record
    if not hold_endpoint(held, rollout):
        return release(held, rollout)
    endpoint = backend.get_endpoint(record.endpoint)
    if endpoint is None:
        held = authorise(held, rollout)
        backend.begin_create_endpoint(
            record.endpoint,
            tags={OWNER_TAG: rollout.settings.instance, "tunegridmodel": record.model_name},
            description=f"Tunegrid endpoint for {record.model_name}",
        )
        log.info("run %s: creating endpoint %s", record.run_id, record.endpoint, extra={"run_id": record.run_id})
        return release(held, rollout)
    if endpoint.provisioning_state.in_progress:
        return release(held, rollout)
    if endpoint.provisioning_state == ProvisioningState.FAILED:
        return _ended(held, rollout, RunState.ERROR, f"endpoint {record.endpoint} failed to provision")
    if not record.previous_deployment:
        holders = [name for name, pct in endpoint.traffic.items() if pct > 0 and name != record.deployment]
        previous = max(holders, key=lambda n: endpoint.traffic[n]) if holders else ""
        if previous:
            held = write(held, rollout, previous_deployment=previous)
            record = held.record
    deployment = backend.get_deployment(record.endpoint, record.deployment)
    if deployment is None:
        held = authorise(held, rollout)
        backend.begin_create_deployment(_deployment_spec(record, rollout.settings))
        log.info(
            "run %s: creating deployment %s/%s at 0 %% traffic",
            record.run_id,
            record.endpoint,
            record.deployment,
            extra={"run_id": record.run_id},
        )
        return release(held, rollout)
    if deployment.provisioning_state.in_progress:
        return release(held, rollout)
    if deployment.provisioning_state != ProvisioningState.SUCCEEDED:
        state = deployment.provisioning_state.value.lower()
        reason = f"deployment {record.deployment} {state}: {deployment.error or 'no reason given'}"
        return _ended(held, rollout, RunState.ROLLED_BACK, reason)
    return move(held, rollout, RunState.SMOKE_TESTING)


_ended = end_held
"""Win the move to an end state first; only then undo (delete the 0 % deployment, release the endpoint)."""


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


def _smoke_call(record: RunRecord, rollout: Rollout, body: dict[str, Any], *, row: int) -> str:
    """One smoke request to the new deployment by name, through the shared endpoint caller."""
    reply = rollout.upstream.post_json_blocking(
        record.endpoint,
        record.deployment,
        orjson.dumps(body),
        request_id=f"smoke-{record.run_id}-{row}",
        timeout_s=rollout.settings.smoke_timeout_s,
    )
    snippet = reply.body[:200].decode("utf-8", "replace")
    if reply.status in (429, 503):
        raise TransientError(f"deployment {record.deployment} answered HTTP {reply.status}: {snippet}")
    if reply.status >= 400:
        raise UpstreamError(
            f"deployment {record.deployment} answered HTTP {reply.status}: {snippet}", status=reply.status
        )
    try:
        return _answer_text(orjson.loads(reply.body))
    except orjson.JSONDecodeError:
        raise UpstreamError(f"deployment {record.deployment} answered with invalid JSON") from None


def _step_smoke(held: Held, rollout: Rollout) -> RunRecord | None:
    settings = rollout.settings
    record = held.record
    if not hold_endpoint(held, rollout):
        return release(held, rollout)
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
        held = authorise(held, rollout)  # renewed before each row: a lease lasts one smoke request
        started = time.perf_counter()
        try:
            answer = _smoke_call(record, rollout, body, row=i)
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
        return _ended(
            held, rollout, RunState.ROLLED_BACK, f"smoke test failed: {failure}; previous traffic kept", smoke=smoke
        )
    mirror = (
        (record.extra.get("sidecar") or {})
        .get("deployment", {})
        .get("mirror_traffic_percent", settings.mirror_traffic_percent)
    )
    if mirror and record.previous_deployment:
        endpoint = rollout.backend.get_endpoint(record.endpoint)
        if endpoint is not None:
            held = authorise(held, rollout)
            rollout.backend.begin_set_traffic(
                record.endpoint, dict(endpoint.traffic), mirror_traffic={record.deployment: int(mirror)}
            )
    return move(held, rollout, RunState.EVALUATING, smoke=smoke)


def _step_shift(held: Held, rollout: Rollout) -> RunRecord | None:
    backend = rollout.backend
    record = held.record
    if not hold_endpoint(held, rollout):
        return release(held, rollout)
    endpoint = backend.get_endpoint(record.endpoint)
    if endpoint is None:
        reason = f"endpoint {record.endpoint} disappeared during the traffic shift"
        return _ended(held, rollout, RunState.ERROR, reason)
    if endpoint.provisioning_state.in_progress:
        return release(held, rollout)
    if endpoint.traffic.get(record.deployment, 0) != 100 or endpoint.mirror_traffic:
        traffic = {name: 0 for name in endpoint.traffic}
        traffic[record.deployment] = 100
        held = authorise(held, rollout)
        backend.begin_set_traffic(record.endpoint, traffic, mirror_traffic={})
        log.info(
            "run %s: shifting 100 %% of %s to %s",
            record.run_id,
            record.endpoint,
            record.deployment,
            extra={"run_id": record.run_id},
        )
        return release(held, rollout)
    replaced = _replaced_deployments(record, endpoint, rollout)
    if replaced:
        held = authorise(held, rollout)
        for name in replaced:
            backend.begin_delete_deployment(record.endpoint, name)
            log.info(
                "run %s: deleting deployment %s (0 %% traffic, replaced)",
                record.run_id,
                name,
                extra={"run_id": record.run_id},
            )
    _retire_replaced(record, rollout)  # first: an endpoint never has two live runs, not even for a moment
    live = move(held, rollout, RunState.LIVE)
    release_endpoint(live, rollout)
    return live


def _replaced_deployments(record: RunRecord, endpoint: EndpointInfo, rollout: Rollout) -> list[str]:
    """The deployments this shift replaces, once all traffic is on the new one: the previous one, and any 0 %
    deployment of a run of ours that has ended (left by an undo that could not finish). A 0 % deployment of
    a run still in flight, or one the ledger does not know, is left alone."""
    out = []
    for deployment in endpoint.deployments:
        name = deployment.name
        if name == record.deployment or deployment.provisioning_state.in_progress:
            continue
        if endpoint.traffic.get(name, 0) or endpoint.mirror_traffic.get(name, 0):
            continue
        if name == record.previous_deployment:
            out.append(name)
            continue
        owner_id = name.removeprefix("d-")
        owner = rollout.ledger.get(owner_id) if is_run_id(owner_id) else None
        ended = owner is not None and (owner.state.terminal or owner.state == RunState.LIVE)
        if ended and owner is not None and owner.deployment == name:
            out.append(name)
    return out


def _retire_replaced(live: RunRecord, rollout: Rollout) -> None:
    """Retire the other live runs of the endpoint (the shift has taken their traffic). A record that keeps
    changing fails the step transiently: the next tick shifts again, finds the traffic already moved, and
    retires it then; the new run never goes live beside it."""
    for other in rollout.ledger.list():
        if other.run_id == live.run_id or other.state != RunState.LIVE or other.endpoint != live.endpoint:
            continue
        try:
            retired = retire_live(rollout.ledger, other.run_id, f"replaced by run {live.run_id}")
        except ConflictError as exc:
            raise TransientError(str(exc)) from exc
        if retired is not None:
            write_run_report(retired, rollout)


GUARD_TTLS = 3
"""How long after going live, in lease TTLs, a run's traffic is checked (`guard_live`)."""
GUARDED = "traffic_guarded"
"""Set in `extra` by the first conclusive check of a live run's traffic after its guard window closed."""


def guard_live(record: RunRecord, rollout: Rollout) -> RunRecord:
    """Keep a run that just went live at 100 % of its endpoint.

    A lease cannot fence a call that is already on its way: a traffic update authorised by a run that then
    lost its lease (its host stalled inside the call for longer than the TTL) can still land after another
    run went live. So for `GUARD_TTLS` lease TTLs after going live, each tick reads the endpoint and, when
    its traffic is not all on the live deployment and no other roll-out holds the endpoint lease, puts it
    back (under the endpoint lease, and unless another run of the endpoint is rolling out). A stall longer
    than that is outside what the lease TTL is sized for.

    The window is a time, and the timer may be late (a host restart, a queue of ticks): so the first tick
    after the window closes checks once more, and only a conclusive check (the traffic is right, put right, or
    the endpoint or deployment is gone) marks the run `traffic_guarded` and ends the guard. A call that landed
    inside the window is therefore put right even when no tick ran between its landing and the window's end."""
    went_live = next((at for state, at in reversed(record.timeline) if state == RunState.LIVE.value), "")
    if not went_live or record.extra.get(GUARDED):
        return record
    closed = rollout.now() - datetime.fromisoformat(went_live) > rollout.ttl * GUARD_TTLS
    backend = rollout.backend
    endpoint = backend.get_endpoint(record.endpoint)
    if endpoint is not None and endpoint.provisioning_state.in_progress:
        return record
    if (
        endpoint is None
        or (endpoint.traffic.get(record.deployment, 0) == 100 and not endpoint.mirror_traffic)
        or not any(d.name == record.deployment for d in endpoint.deployments)
    ):
        return _guarded(record, rollout) if closed else record
    holder = Held(
        lease=RunLease(record.run_id, "", record.etag, rollout.now() + rollout.ttl, record.state), record=record
    )
    if not hold_endpoint(holder, rollout):
        return record  # another roll-out owns the endpoint now: its shift decides the traffic
    rolling = [
        r.run_id
        for r in rollout.ledger.list()
        if r.endpoint == record.endpoint and r.run_id != record.run_id and r.state in ENDPOINT_STATES
    ]
    if rolling:  # its lease lapsed between two of its steps, but it still rolls out: its shift decides
        release_endpoint(record, rollout)
        return record
    try:
        record = rollout.ledger.update(record)  # still live? (a newer run retires it before going live)
    except ConflictError:
        release_endpoint(record, rollout)
        return record
    traffic = {name: 0 for name in endpoint.traffic}
    traffic[record.deployment] = 100
    log.warning(
        "run %s: %s had drifted from its live deployment (%s): putting it back",
        record.run_id,
        record.endpoint,
        dict(endpoint.traffic),
        extra={"run_id": record.run_id},
    )
    backend.begin_set_traffic(record.endpoint, traffic, mirror_traffic={})
    release_endpoint(record, rollout)
    return _guarded(record, rollout) if closed else record


def _guarded(record: RunRecord, rollout: Rollout) -> RunRecord:
    """Mark the guard done (conditional on the record: a run retired meanwhile is left as it is)."""
    try:
        return rollout.ledger.update(record, extra={**record.extra, GUARDED: True})
    except ConflictError:
        return record


OBSERVING_STEPS: Mapping[RunState, Callable[[RunRecord, Rollout], RunRecord | None]] = {
    RunState.SUBMITTED: _step_job,
    RunState.RUNNING: _step_job,
    RunState.SUCCEEDED: _step_succeeded,
}
"""Steps that only read the backend and move the run, conditional on the record they read: no lease."""

LEASED_STEPS: Mapping[RunState, Callable[[Held, Rollout], RunRecord | None]] = {
    RunState.REGISTERING: _step_register,
    RunState.DEPLOYING: _step_deploy,
    RunState.SMOKE_TESTING: _step_smoke,
    RunState.EVALUATING: step_evaluate,  # the evaluation gate: shared/usecases/rollout/gate.py
    RunState.SHIFTING_TRAFFIC: _step_shift,
}
"""Steps with side effects: each runs under a run lease."""
