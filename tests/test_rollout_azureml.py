"""The rollout use case against the Azure ML adapter: the exact HTTP calls azure-ai-ml sends, in order.

Only the use case drives: `handle_run_event` with a parsed completion event, then `tick` as the timer
would. The run lives in a real Azurite ledger (a table of its own per test, so `tick` sees only this
run), the smoke rows come from a real Azurite blob. At the Azure ML boundary the rig captures every
request and answers it in the service's shape from a small model of the workspace (`Workspace`) whose
provisioning the test moves on between ticks, as Azure would between two timer firings.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from azure.core.polling import LROPoller

from shared.adapters.azureml.backend import AzureMLBackend
from shared.adapters.storage import BlobStore
from shared.adapters.tables import TableRunLedger
from shared.domain.clock import utcnow
from shared.domain.events import RunEvent, parse_run_event
from shared.domain.naming import deployment_name_for, endpoint_name_for, job_name_for, model_name_for, model_version_for
from shared.domain.runs import RunRecord, RunState, run_id_for
from shared.ports import UpstreamReply
from shared.settings import PREPARED_CONTAINER, RUN_REPORTS_CONTAINER, TRAINING_CONTAINER, Settings
from shared.usecases.rollout import Rollout, handle_run_event, tick
from tests import azureml_rig as rig_module
from tests.azureml_rig import (
    API_HOST,
    LOCATION,
    MLFLOW_PATH,
    WS_PATH,
    AzureMLRig,
    Call,
    Reply,
    error_reply,
    load,
)

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
EVENTS = Path(__file__).resolve().parent / "data" / "events"
BASE_MODEL_ID = "azureml://registries/azureml/models/Phi-4/versions/8"
"""What ingest records as `base_model` on Azure ML: the registry id the job was submitted with."""
MLFLOW_HOST = API_HOST.removeprefix("https://")
SMOKE_ROWS = 2
GATE_ROWS = 2
loopback_only = rig_module.loopback_only  # fixture: Azurite on 127.0.0.1 only


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def never_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call to a waiting poller method fails the test: long operations are started, never awaited."""

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("something waited on a long-running operation")

    monkeypatch.setattr(LROPoller, "result", refuse)
    monkeypatch.setattr(LROPoller, "wait", refuse)


@pytest.fixture
def rig(loopback_only: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AzureMLRig]:
    """The capture rig with the workspace served; fails the test when a request found no route."""
    monkeypatch.chdir(tmp_path)
    azureml = AzureMLRig()
    azureml.serve_workspace()
    yield azureml
    assert not azureml.unmatched, "requests with no route:\n" + "\n".join(str(c) for c in azureml.unmatched)


@dataclass
class World:
    settings: Settings
    ledger: TableRunLedger
    blobs: BlobStore
    rig: AzureMLRig
    backend: AzureMLBackend
    prefix: str

    def rollout(self) -> Rollout:
        upstream = RigUpstream(self.rig, self.backend)
        return Rollout(
            ledger=self.ledger, backend=self.backend, blobs=self.blobs, settings=self.settings, upstream=upstream
        )


@dataclass
class RigUpstream:
    """The `Upstream` port's blocking call, answered by the rig so the smoke POSTs stand in the call log
    beside azure-ai-ml's. Keys come from the adapter's `get_credentials` (listKeys), once per endpoint,
    as the real caller's cache does; the caller itself is tested over loopback servers (test_scoring_upstream)."""

    rig: AzureMLRig
    backend: AzureMLBackend
    credentials: dict[str, Any] = field(default_factory=dict)

    def post_json_blocking(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> UpstreamReply:
        if endpoint not in self.credentials:
            self.credentials[endpoint] = self.backend.get_credentials(endpoint)
        creds = self.credentials[endpoint]
        headers = {**creds.headers(deployment=deployment), "Content-Type": "application/json"}
        reply = self.rig._dispatch(Call("POST", creds.scoring_uri, headers, body, threading.current_thread().name))
        content = reply.body if reply.body is not None else json.dumps(reply.json).encode()
        return UpstreamReply(reply.status, content, content_type="application/json")


@pytest.fixture
def world(rig: AzureMLRig, never_wait: None, storage: Any, storage_conn: str, unique: str) -> Iterator[World]:
    """Settings for the rig's workspace, a ledger table of this test's own, blobs, and the adapter."""
    settings = rig.settings(
        DataStorage=storage_conn,
        TUNEGRID_INSTANCE=f"t{unique}",
        SMOKE_ROWS=str(SMOKE_ROWS),
        GATE_ROWS=str(GATE_ROWS),
        INFERENCE_INSTANCE_TYPE="Standard_NC48ads_A100_v4",  # on Phi-4's list, not its first
        INFERENCE_INSTANCE_COUNT="2",
        REQUEST_TIMEOUT_MS="120000",
    )
    table = f"runs{unique}"
    storage.tables.create_table(table)
    yield World(
        settings=settings,
        ledger=TableRunLedger(storage.tables.get_table_client(table)),
        blobs=BlobStore(storage.blobs),
        rig=rig,
        backend=rig.backend(settings),
        prefix=f"r{unique}/",
    )
    storage.tables.delete_table(table)


# --- the workspace as the service holds it ------------------------------------------------------


@dataclass
class Workspace:
    """Models, one online endpoint and its deployments as Azure ML holds them, served in its shape.

    Writes are accepted as long-running operations (201/202 plus an operation URL polled by
    azure-core's own thread) and leave the resource `Creating` / `Updating` / `Deleting`;
    `settle()` is Azure finishing the work between two timer ticks."""

    rig: AzureMLRig
    endpoint: str
    exists: bool = False
    state: str = "Succeeded"
    traffic: dict[str, int] = field(default_factory=dict)
    pending_traffic: dict[str, int] | None = None
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[tuple[str, str], Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rig, base = self.rig, re.escape(f"{WS_PATH}/onlineEndpoints/{self.endpoint}")
        rig.on("GET", base, self._get_endpoint)
        rig.on("GET", base + "/deployments", self._list_deployments)
        rig.on("GET", base + r"/deployments/([^/]+)", self._get_deployment)
        self._accept("PUT", base, self._put_endpoint)
        self._accept("PUT", base + r"/deployments/[^/]+", self._put_deployment)
        self._accept("DELETE", base + r"/deployments/[^/]+", self._delete_deployment, status=202, header="Location")
        models = re.escape(f"{WS_PATH}/models/") + r"[^/]+/versions"
        rig.on("GET", models, lambda call: Reply(200, {"value": []}))
        rig.on("GET", models + r"/[^/]+", self._get_model)
        rig.on("PUT", models + r"/[^/]+", self._put_model)

    # -- what the test does between ticks ------------------------------------------------------
    def serve_existing(self, *, traffic: dict[str, int], model: tuple[str, str]) -> None:
        """An endpoint made by an earlier run, its deployments provisioned."""
        self.exists, self.state, self.traffic = True, "Succeeded", dict(traffic)
        self.description = f"Tunegrid endpoint for {model[0]}"
        for name in traffic:
            self.deployments[name] = {"state": "Succeeded", "model": model, "body": None}

    def settle(self) -> None:
        """Azure finished every operation in flight."""
        if self.exists:
            self.state = "Succeeded"
        if self.pending_traffic is not None:
            self.traffic, self.pending_traffic = self.pending_traffic, None
        for name, deployment in list(self.deployments.items()):
            if deployment["state"] == "Deleting":
                del self.deployments[name]
                self.traffic.pop(name, None)
            else:
                deployment["state"] = "Succeeded"

    # -- answers -------------------------------------------------------------------------------
    def _accept(
        self, method: str, path: str, apply: Any, *, status: int = 201, header: str = "Azure-AsyncOperation"
    ) -> None:
        accepted = self.rig.lro(method, path, initial_status=status, header=header, then=lambda: None)

        def respond(call: Call) -> Reply:
            apply(call)
            reply = accepted.answer(call)
            return Reply(reply.status, self._doc_for(call), reply.headers) if method == "PUT" else reply

        self.rig.on(method, path, respond)

    def _doc_for(self, call: Call) -> Any:
        name = call.path.rsplit("/", 1)[1]
        return self._endpoint_doc() if name == self.endpoint else self._deployment_doc(name)

    def _endpoint_doc(self) -> Any:
        doc = load("endpoint.json", endpoint=self.endpoint, provisioning_state=self.state)
        doc["tags"] = dict(self.tags)
        doc["properties"].update(description=self.description, traffic=dict(self.traffic), mirrorTraffic={})
        return doc

    def _deployment_doc(self, name: str) -> Any:
        deployment = self.deployments[name]
        model_name, model_version = deployment["model"]
        doc = self.rig.deployment_doc(
            self.endpoint, name, state=deployment["state"], model_name=model_name, model_version=model_version
        )
        body = deployment["body"]
        if body is not None:
            doc["tags"] = body["tags"]
            doc["sku"]["capacity"] = body["sku"]["capacity"]
            doc["properties"]["instanceType"] = body["properties"]["instanceType"]
        return doc

    def _get_endpoint(self, _: Call) -> Reply:
        if not self.exists:
            return error_reply(404, "EndpointNotFound", f"Endpoint {self.endpoint} not found")
        return Reply(200, self._endpoint_doc())

    def _list_deployments(self, _: Call) -> Reply:
        return Reply(200, {"value": [self._deployment_doc(n) for n in self.deployments]})

    def _get_deployment(self, call: Call) -> Reply:
        name = call.path.rsplit("/", 1)[1]
        if name not in self.deployments:
            return error_reply(404, "NotFound", f"Deployment {name} not found")
        return Reply(200, self._deployment_doc(name))

    def _put_endpoint(self, call: Call) -> None:
        body = call.json
        if not self.exists:
            self.exists, self.state = True, "Creating"
            self.tags = dict(body["tags"])
            self.description = body["properties"]["description"]
            self.traffic = dict(body["properties"]["traffic"])
        else:
            self.state = "Updating"
            named = body["properties"]["traffic"]
            self.pending_traffic = {name: int(named.get(name, 0)) for name in self.deployments}

    def _put_deployment(self, call: Call) -> None:
        body = call.json
        model = re.fullmatch(r".*/models/([^/]+)/versions/([^/]+)", body["properties"]["model"])
        assert model is not None, body["properties"]["model"]
        name = call.path.rsplit("/", 1)[1]
        self.deployments[name] = {"state": "Creating", "model": model.groups(), "body": body}

    def _delete_deployment(self, call: Call) -> None:
        self.deployments[call.path.rsplit("/", 1)[1]]["state"] = "Deleting"

    def _get_model(self, call: Call) -> Reply:
        name, version = call.path.split("/models/")[1].split("/versions/")
        doc = self.models.get((name, version))
        return Reply(200, doc) if doc is not None else error_reply(404, "UserError", "Not found")

    def _put_model(self, call: Call) -> Reply:
        name, version = call.path.split("/models/")[1].split("/versions/")
        job = re.fullmatch(r"azureml://jobs/([^/]+)/outputs/.*", call.json["properties"]["modelUri"])
        doc = load("model_finetuned.json", model_name=name, model_version=version, job_name=job.group(1) if job else "")
        doc["properties"].update(call.json["properties"])
        self.models[(name, version)] = doc
        return Reply(201, doc)


# --- helpers ---------------------------------------------------------------------------------------


def _submitted_run(world: World, name: str = "family.jsonl", *, test_rows: int = 3) -> RunRecord:
    """The record as ingest leaves it on Azure ML: submitted, with the job, base model id and splits."""
    lines = [line for line in (SAMPLES / "ultrachat_small.jsonl").read_bytes().splitlines() if line.strip()]
    blob = world.prefix + name
    run_id = run_id_for(TRAINING_CONTAINER, blob, "0x8DCTEST")
    test_blob = f"{run_id}/test.jsonl"
    world.blobs.upload(
        PREPARED_CONTAINER, test_blob, b"\n".join(lines[:test_rows]) + b"\n", content_type="application/jsonl"
    )
    job = job_name_for(run_id)
    now = utcnow()
    stamp = now.isoformat()
    record = RunRecord(
        run_id=run_id,
        state=RunState.SUBMITTED,
        container=TRAINING_CONTAINER,
        blob=blob,
        blob_version="0x8DCTEST",
        created_at=now,
        updated_at=now,
        timeline=tuple((s, stamp) for s in ("received", "validating", "submitting", "submitted")),
        backend="azureml",
        sha256="ab" * 32,
        job_name=job,
        job_url=f"https://ml.azure.com/runs/{job}",
        base_model=BASE_MODEL_ID,
        params={"num_train_epochs": 1},
        extra={
            "sidecar": {},
            "train": {
                "container": PREPARED_CONTAINER,
                "blob": f"{run_id}/train.jsonl",
                "url": world.blobs.url(PREPARED_CONTAINER, f"{run_id}/train.jsonl"),
            },
            "test": {
                "container": PREPARED_CONTAINER,
                "blob": test_blob,
                "url": world.blobs.url(PREPARED_CONTAINER, test_blob),
            },
        },
    )
    created, fresh = world.ledger.create(record)
    assert fresh
    return created


def _event(file: str, record: RunRecord) -> RunEvent:
    raw = (EVENTS / file).read_text().replace("{JOB}", record.job_name).replace("{RUN}", record.run_id)
    [event] = [
        parsed
        for e in json.loads(raw)
        if (
            parsed := parse_run_event(event_id=e["id"], event_type=e["eventType"], subject=e["subject"], data=e["data"])
        )
    ]
    return event


def _serve_metrics(rig: AzureMLRig, job: str) -> None:
    """The job's MLflow run: runs/get lists the keys, get-history gives each series."""
    rig.on(
        "GET", re.escape(f"{MLFLOW_PATH}/runs/get"), Reply(200, load("mlflow_run.json", run_id=job)), host=MLFLOW_HOST
    )
    series = {"loss": [(10, 1.61), (30, 0.98)], "eval_loss": [(30, 1.04)], "learning_rate": [(10, 5e-6), (30, 0.0)]}

    def history(call: Call) -> Reply:
        key = call.query["metric_key"]
        points = [{"key": key, "value": v, "timestamp": 1717230000000 + s, "step": s} for s, v in series[key]]
        return Reply(200, {"metrics": points})

    rig.on("GET", re.escape(f"{MLFLOW_PATH}/metrics/get-history"), history, host=MLFLOW_HOST)


def _serve_completed_job(world: World, record: RunRecord, workspace: Workspace) -> tuple[Any, Any]:
    """The job completed; the registry's base model; keys and a scoring URI that answers."""
    rig = world.rig
    rig.serve_registry()
    rig.serve_job(record.job_name, status="Completed", run_id=record.run_id)
    _serve_metrics(rig, record.job_name)
    keys = rig.on(
        "POST",
        re.escape(f"{WS_PATH}/onlineEndpoints/{workspace.endpoint}/listKeys"),
        Reply(200, load("endpoint_keys.json")),
    )
    score = rig.on(
        "POST",
        "/score",
        Reply(200, load("score_response.json")),
        host=f"{workspace.endpoint}.{LOCATION}.inference.ml.azure.com",
    )
    return keys, score


def _writes(rig: AzureMLRig, since: int = 0) -> list[str]:
    """`METHOD path` of every call but reads, in the order the caller's thread sent them."""
    return [line for line in rig.summary()[since:] if not line.startswith("GET ")]


def _expected_conversations(rows: int) -> list[list[dict[str, str]]]:
    out = []
    for line in (SAMPLES / "ultrachat_small.jsonl").read_bytes().splitlines()[:rows]:
        messages = json.loads(line)["messages"]
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        out.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return out


def _names(world: World, record: RunRecord) -> tuple[str, str, str, str]:
    model = model_name_for(record)
    return (
        model,
        model_version_for(record),
        endpoint_name_for(record, model, world.settings),
        deployment_name_for(record),
    )


# --- tests -----------------------------------------------------------------------------------------


def test_a_completed_job_goes_live_with_these_calls_in_this_order(world: World) -> None:
    """Event, then ticks: model PUT, endpoint PUT, deployment PUT at 0 %, listKeys, smoke by name, traffic PUT."""
    rig, settings = world.rig, world.settings
    record = _submitted_run(world)
    model, version, endpoint, deployment = _names(world, record)
    workspace = Workspace(rig, endpoint)
    keys, score = _serve_completed_job(world, record, workspace)
    rollout = world.rollout()

    outcome = handle_run_event(_event("parent_completed.json", record), rollout)
    assert (outcome.action, outcome.state) == ("advanced", "deploying")
    assert _writes(rig) == [
        f"PUT {{ws}}/models/{model}/versions/{version}",
        f"PUT {{ws}}/onlineEndpoints/{endpoint}",
    ]
    reads = rig.summary()
    assert reads.index(f"GET {{ws}}/models/{model}/versions/{version}") < reads.index(
        f"PUT {{ws}}/models/{model}/versions/{version}"
    ), "the model version is read before it is registered"
    assert reads.index(f"GET {{ws}}/onlineEndpoints/{endpoint}") < reads.index(f"PUT {{ws}}/onlineEndpoints/{endpoint}")

    # Six timer ticks; before some of them Azure has finished what was in flight.
    states = []
    for azure_done in (False, True, False, True, False, True):
        if azure_done:
            workspace.settle()
        mark = len(rig.summary())
        tick(rollout)
        states.append((world.ledger.get(record.run_id).state.value, _writes(rig, mark)))  # type: ignore[union-attr]

    assert states == [
        ("deploying", []),  # the endpoint is still Creating: nothing is sent, nothing waits
        ("deploying", [f"PUT {{ws}}/onlineEndpoints/{endpoint}/deployments/{deployment}"]),
        ("deploying", []),  # the deployment is still Creating
        (
            "shifting-traffic",
            [f"POST {{ws}}/onlineEndpoints/{endpoint}/listKeys"]
            + ["POST /score"] * SMOKE_ROWS
            + [f"PUT {{ws}}/onlineEndpoints/{endpoint}"],
        ),
        ("shifting-traffic", []),  # the endpoint is Updating
        ("live", []),
    ]
    assert _writes(rig) == [
        f"PUT {{ws}}/models/{model}/versions/{version}",
        f"PUT {{ws}}/onlineEndpoints/{endpoint}",
        f"PUT {{ws}}/onlineEndpoints/{endpoint}/deployments/{deployment}",
        f"POST {{ws}}/onlineEndpoints/{endpoint}/listKeys",
        *["POST /score"] * SMOKE_ROWS,
        f"PUT {{ws}}/onlineEndpoints/{endpoint}",
    ]
    assert deployment == f"d-{record.run_id}"
    polls = rig.wait_for("GET", r"/mfeOperationsStatus/", count=3)
    assert all(p.thread != threading.main_thread().name for p in polls), "only azure-core's poller thread polls"
    model_id = f"{WS_PATH}/models/{model}/versions/{version}"

    registered = rig.one("PUT", r"/models/").json["properties"]
    assert registered["modelType"] == "mlflow_model"
    assert registered["modelUri"] == f"azureml://jobs/{record.job_name}/outputs/trained_model"
    assert {
        k: registered["tags"][k] for k in ("tunegridrunid", "tunegrid-owner", "tunegridjob", "tunegridbasemodel")
    } == {
        "tunegridrunid": record.run_id,
        "tunegrid-owner": settings.instance,
        "tunegridjob": record.job_name,
        "tunegridbasemodel": BASE_MODEL_ID,
    }
    assert "Standard_NC48ads_A100_v4" in registered["tags"]["inference_compute_allow_list"]

    created_endpoint, traffic_update = [c.json for c in rig.requests("PUT", rf"/onlineEndpoints/{endpoint}$")]
    assert created_endpoint == {
        "location": LOCATION,
        "properties": {
            "description": f"Tunegrid endpoint for {model}",
            "authMode": "Key",
            "properties": {},
            "traffic": {},
            "mirrorTraffic": {},
        },
        "identity": {"type": "SystemAssigned"},
        "tags": {"tunegrid-owner": settings.instance, "tunegridmodel": model},
    }
    assert rig.one("PUT", r"/deployments/").json == {
        "location": LOCATION,
        "properties": {
            "model": model_id,
            "properties": {},
            "environmentVariables": {},
            "appInsightsEnabled": False,
            "requestSettings": {"maxConcurrentRequestsPerInstance": 1, "requestTimeout": "PT2M"},
            "livenessProbe": {"initialDelay": "PT10M"},
            "instanceType": "Standard_NC48ads_A100_v4",
            "endpointComputeType": "Managed",
        },
        "tags": {"tunegrid-owner": settings.instance, "tunegridrunid": record.run_id},
        "sku": {"name": "Default", "capacity": 2},
    }
    assert traffic_update["properties"]["traffic"] == {deployment: 100}
    assert traffic_update["properties"]["mirrorTraffic"] == {}
    assert traffic_update["tags"] == {"tunegrid-owner": settings.instance, "tunegridmodel": model}

    assert len(keys.calls) == 1 and keys.calls[0].body == b""
    conversations = _expected_conversations(SMOKE_ROWS)
    smoke_calls, gate_calls = score.calls[:SMOKE_ROWS], score.calls[SMOKE_ROWS:]
    assert [c.json["input_data"]["input_string"] for c in smoke_calls] == [[c] for c in conversations]
    # the evaluation gate: the first model on the endpoint, so only the new deployment answers its rows
    assert [c.json["input_data"]["input_string"] for c in gate_calls] == [
        [c] for c in _expected_conversations(GATE_ROWS)
    ]
    assert all(c.json["input_data"]["parameters"]["do_sample"] is False for c in gate_calls)
    for call in score.calls:
        assert call.url == f"https://{endpoint}.{LOCATION}.inference.ml.azure.com/score"
        assert call.headers["azureml-model-deployment"] == deployment
        assert call.headers["Authorization"] == "Bearer pk-0123456789abcdef0123456789abcdef"

    live = world.ledger.get(record.run_id)
    assert live is not None and live.state == RunState.LIVE, live
    assert [s for s, _ in live.timeline] == [
        "received",
        "validating",
        "submitting",
        "submitted",
        "succeeded",
        "registering",
        "deploying",
        "smoke-testing",
        "evaluating",
        "shifting-traffic",
        "live",
    ]
    assert (live.model_name, live.model_version, live.model_id) == (model, version, model_id)
    assert (live.endpoint, live.deployment, live.previous_deployment, live.operation) == (endpoint, deployment, "", "")
    assert live.metrics["loss"] == {"last": 0.98, "first": 1.61, "steps": 2, "last_step": 30}
    assert live.smoke["passed"] is True and [r["ok"] for r in live.smoke["rows"]] == [True] * SMOKE_ROWS
    assert (live.gate["verdict"], live.gate["rows"], live.gate["live"]) == ("promoted", GATE_ROWS, None)
    assert live.smoke["rows"][0]["answer"].startswith("Hello! I am a fine-tuned assistant")
    report = json.loads(world.blobs.read_bytes(RUN_REPORTS_CONTAINER, f"{record.run_id}/report.json") or b"{}")
    assert report["state"] == "live" and report["model"]["id"] == model_id and report["deployment"] == deployment
    assert report["metrics_series"]["loss"] == [[10, 1.61], [30, 0.98]]
    assert "pk-0123" not in json.dumps(report)
    assert workspace.traffic == {deployment: 100}


def test_a_second_model_replaces_blue_and_blue_is_deleted_only_after_the_shift(world: World) -> None:
    """Endpoint serving `blue` at 100 %: new deployment at 0 %, smoked by name, {new: 100}, then DELETE blue."""
    rig = world.rig
    record = _submitted_run(world)
    model, version, endpoint, deployment = _names(world, record)
    workspace = Workspace(rig, endpoint)
    workspace.serve_existing(traffic={"blue": 100}, model=(model, "1"))
    _, score = _serve_completed_job(world, record, workspace)
    rollout = world.rollout()

    outcome = handle_run_event(_event("parent_completed.json", record), rollout)
    assert outcome.state == "deploying"
    assert world.ledger.get(record.run_id).previous_deployment == "blue"  # type: ignore[union-attr]
    assert workspace.traffic == {"blue": 100}  # the new one takes none (azure-ai-ml lists it with 0)
    tick(rollout)  # the deployment is still Creating
    workspace.settle()
    tick(rollout)  # smoke, then the traffic PUT
    assert world.ledger.get(record.run_id).state == RunState.SHIFTING_TRAFFIC  # type: ignore[union-attr]
    assert not rig.requests("DELETE"), "blue still has its traffic: it must not be deleted yet"
    workspace.settle()
    tick(rollout)

    assert _writes(rig) == [
        f"PUT {{ws}}/models/{model}/versions/{version}",
        f"PUT {{ws}}/onlineEndpoints/{endpoint}/deployments/{deployment}",
        f"POST {{ws}}/onlineEndpoints/{endpoint}/listKeys",
        *["POST /score"] * SMOKE_ROWS,
        f"PUT {{ws}}/onlineEndpoints/{endpoint}",
        f"DELETE {{ws}}/onlineEndpoints/{endpoint}/deployments/blue",
    ]
    shift = rig.one("PUT", rf"/onlineEndpoints/{endpoint}$").json["properties"]
    assert shift["traffic"] == {deployment: 100}  # blue, left out, is set to 0 by the service
    by_deployment: dict[str, list[Any]] = {}
    for c in score.calls:
        by_deployment.setdefault(c.headers["azureml-model-deployment"], []).append(c.json["input_data"]["input_string"])
    # the smoke rows go to the new deployment; the gate's rows to it and to blue, the same rows to both
    assert {k: len(v) for k, v in by_deployment.items()} == {deployment: SMOKE_ROWS + GATE_ROWS, "blue": GATE_ROWS}
    assert sorted(map(json.dumps, by_deployment[deployment][SMOKE_ROWS:])) == sorted(
        map(json.dumps, by_deployment["blue"])
    )
    live = world.ledger.get(record.run_id)
    assert live is not None and live.state == RunState.LIVE
    assert live.previous_deployment == "blue"
    assert workspace.traffic == {deployment: 100, "blue": 0}
    assert workspace.deployments["blue"]["state"] == "Deleting"
    tick(rollout)  # live is not in flight: the timer sends nothing more
    assert _writes(rig)[-1] == f"DELETE {{ws}}/onlineEndpoints/{endpoint}/deployments/blue"


def test_a_failed_job_is_recorded_with_the_failed_steps_error(world: World) -> None:
    """Job Failed: the reason is the failed step's error from run history; nothing is written to Azure."""
    rig = world.rig
    record = _submitted_run(world)
    root = record.job_name
    rig.serve_job(root, status="Failed", run_id=record.run_id)
    steps = rig.serve_failed_pipeline_steps(root)
    rig.on(
        "GET",
        re.escape(f"{MLFLOW_PATH}/runs/get"),
        error_reply(404, "RESOURCE_DOES_NOT_EXIST", f"Run '{root}' not found"),
        host=MLFLOW_HOST,
    )
    rollout = world.rollout()

    outcome = handle_run_event(_event("parent_failed.json", record), rollout)
    tick(rollout)  # a failed run is not in flight: the timer leaves it alone

    assert (outcome.action, outcome.state) == ("advanced", "failed")
    failed = world.ledger.get(record.run_id)
    assert failed is not None and failed.state == RunState.FAILED
    assert failed.error == (
        "step chat_completion_finetune failed: UserError: torch.OutOfMemoryError: CUDA out of memory. "
        "Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.77 GiB of which 1.02 GiB is free."
    )
    assert [s for s, _ in failed.timeline][-2:] == ["submitted", "failed"]
    assert failed.metrics == {}  # MLflow does not know the run: the report goes without metrics
    assert _writes(rig) == []
    assert rig.requests("GET", rf"/runs/{steps[1]['runId']}$"), "the failed step's run was read for its error"
    report = json.loads(world.blobs.read_bytes(RUN_REPORTS_CONTAINER, f"{record.run_id}/report.json") or b"{}")
    assert report["state"] == "failed" and "CUDA out of memory" in report["error"]
    markdown = (world.blobs.read_bytes(RUN_REPORTS_CONTAINER, f"{record.run_id}/report.md") or b"").decode()
    assert "Reason: step chat_completion_finetune failed" in markdown


def test_the_model_family_is_named_after_the_base_model_not_its_version(world: World) -> None:
    """With the base model id ingest records on Azure ML, the registered name starts with the model's name."""
    record = _submitted_run(world)
    assert model_name_for(record).startswith("Phi-4-")
