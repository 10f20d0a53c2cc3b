"""The roll-out steps, one per state: each re-reads the backend's truth, checks before it acts, and
either moves the run on or gives its lease back to wait for a long operation."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

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
from shared.errors import ConflictError, TransientError, UpstreamError
from shared.settings import Settings
from shared.usecases.estimate import record_throughput
from shared.usecases.rollout.gate import step_evaluate
from shared.usecases.rollout.leases import leased, move, release
from shared.usecases.rollout.model import Rollout

log = logging.getLogger(__name__)


def _step_job(record: RunRecord, rollout: Rollout) -> RunRecord | None:
    status = rollout.backend.get_job(record.job_name)
    if status is None:
        log.warning(
            "run %s: job %s not found at the backend", record.run_id, record.job_name, extra={"run_id": record.run_id}
        )
        return None
    if status.state == JobState.RUNNING and record.state == RunState.SUBMITTED:
        return move(record, rollout, RunState.RUNNING)
    if status.state == JobState.COMPLETED:
        metrics = _final_metrics(record, rollout)
        return move(record, rollout, RunState.SUCCEEDED, metrics=metrics, job_url=status.studio_url or record.job_url)
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
        return move(record, rollout, to, error=reason[:4000], metrics=_final_metrics(record, rollout))
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
    record_throughput(record, rollout.history)  # how fast it trained on its SKU: later cost estimates learn it
    return move(record, rollout, RunState.REGISTERING)


@leased
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
    return move(
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


@leased
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
        return release(record, rollout)
    if endpoint.provisioning_state.in_progress:
        return release(record, rollout)
    if endpoint.provisioning_state == ProvisioningState.FAILED:
        return move(record, rollout, RunState.ERROR, error=f"endpoint {record.endpoint} failed to provision")
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
        return release(record, rollout)
    if deployment.provisioning_state.in_progress:
        return release(record, rollout)
    if deployment.provisioning_state != ProvisioningState.SUCCEEDED:
        reason = f"deployment {record.deployment} {deployment.provisioning_state.value.lower()}: {deployment.error or 'no reason given'}"
        backend.begin_delete_deployment(record.endpoint, record.deployment)
        return move(record, rollout, RunState.ROLLED_BACK, error=reason)
    return move(record, rollout, RunState.SMOKE_TESTING)


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


@leased
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
        rollout.backend.begin_delete_deployment(record.endpoint, record.deployment)
        return move(
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
    return move(record, rollout, RunState.EVALUATING, smoke=smoke)


@leased
def _step_shift(record: RunRecord, rollout: Rollout) -> RunRecord | None:
    backend = rollout.backend
    endpoint = backend.get_endpoint(record.endpoint)
    if endpoint is None:
        return move(
            record, rollout, RunState.ERROR, error=f"endpoint {record.endpoint} disappeared during the traffic shift"
        )
    if endpoint.provisioning_state.in_progress:
        return release(record, rollout)
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
        return release(record, rollout)
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
    live = move(record, rollout, RunState.LIVE)
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


STEPS: Mapping[RunState, Callable[[RunRecord, Rollout], RunRecord | None]] = {
    RunState.SUBMITTED: _step_job,
    RunState.RUNNING: _step_job,
    RunState.SUCCEEDED: _step_succeeded,
    RunState.REGISTERING: _step_register,
    RunState.DEPLOYING: _step_deploy,
    RunState.SMOKE_TESTING: _step_smoke,
    RunState.EVALUATING: step_evaluate,  # the evaluation gate: shared/usecases/rollout/gate.py
    RunState.SHIFTING_TRAFFIC: _step_shift,
}
