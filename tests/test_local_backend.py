"""The local backend end to end with the tiny model: train, events, registry, endpoints, cancel, crashes.

Real parts only: data blobs in Azurite, the job as its own OS process, MLflow on sqlite, model
servers and routers as HTTP processes on 127.0.0.1, events POSTed to a real local webhook.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from shared.domain.resources import DataRef, DeploymentSpec, FineTuneRequest, JobState, ProvisioningState
from shared.errors import BackendError, InvalidInput, MetricsUnavailable, NotFound
from shared.ports import FineTuneBackend
from shared.settings import PREPARED_CONTAINER
from tests.tiny_model import TINY_PARAMS, EventSink, event_sink, model_cache, wait_until, write_rows
from tunegrid.local import LocalBackend
from tunegrid.local.backend import blob_fetcher
from tunegrid.local.events import RUN_COMPLETED, RUN_STATUS_CHANGED
from tunegrid.local.workspace import ProcessHandle, read_json

pytestmark = [pytest.mark.slow, pytest.mark.azurite]

EVENT_KEY = "test-event-key"
JOB = "tg-job-main"
CRASH = "tg-job-crash"
SCORE = {
    "input_data": {
        "input_string": [[{"role": "user", "content": "Book a table for two"}]],
        "parameters": {"max_new_tokens": 3},
    },
    "params": {},
}


@pytest.fixture(scope="module")
def sink() -> EventSink:
    with event_sink(EVENT_KEY) as s:
        yield s


@pytest.fixture(scope="module")
def data(azurite: object, tmp_path_factory: pytest.TempPathFactory) -> dict[str, DataRef]:
    """Train and test splits uploaded as blobs to the prepared-data container in Azurite."""
    from shared.adapters.storage import BlobStore, StorageClients

    clients = StorageClients.from_connection({"": azurite.connection_string})  # type: ignore[attr-defined]
    clients.ensure_resources()
    store = BlobStore(clients.blobs)
    folder = tmp_path_factory.mktemp("data")
    refs = {}
    for split, start, count in (("train", 0, 64), ("test", 100, 12)):
        path = write_rows(folder / f"{split}.jsonl", start=start, count=count)
        blob = f"local-backend-test/{split}.jsonl"
        refs[split] = DataRef(PREPARED_CONTAINER, blob, store.upload(PREPARED_CONTAINER, blob, path.read_bytes()))
    return refs


def _request(name: str, data: dict[str, DataRef], **params: object) -> FineTuneRequest:
    return FineTuneRequest(
        run_id=f"run-{name}",
        job_name=name,
        dataset="chat.jsonl",
        train=data["train"],
        test=data["test"],
        params={**TINY_PARAMS, **params},
        tags={"tunegridrunid": f"run-{name}", "tunegrid-owner": "test"},
    )


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory, sink: EventSink, azurite: object) -> LocalBackend:
    workspace = tmp_path_factory.mktemp("workspace")
    b = LocalBackend(
        workspace,
        base_model="tiny-phi3",
        webhook_url=sink.url,
        event_key=EVENT_KEY,
        fetch_data=blob_fetcher({"": azurite.connection_string}),  # type: ignore[attr-defined]
        instance="test",
        model_cache_dir=model_cache(tmp_path_factory),
        max_eval_rows=8,
        redeliver_for_s=5,
    )
    yield b
    b.stop_processes()


@pytest.fixture(scope="module")
def jobs(backend: LocalBackend, data: dict[str, DataRef]) -> dict[str, str]:
    """The main job and a job that crashes in the trainer, submitted together (they run in parallel)."""
    backend.submit_finetune(_request(JOB, data))
    # max_seq_length 4 cuts every row before its first assistant token: the trainer must fail loudly.
    backend.submit_finetune(_request(CRASH, data, max_seq_length=4))
    return {"main": JOB, "crash": CRASH}


def _terminal(backend: LocalBackend, name: str, timeout_s: float = 300):
    return wait_until(
        lambda: (s := backend.get_job(name)) is not None and s.state.terminal and s,
        timeout_s=timeout_s,
        what=f"job {name} to finish",
    )


def _statuses(sink: EventSink, job: str) -> list[str]:
    return [e["data"].get("runStatus", "RunCompleted") for e in sink.events if e["data"]["runId"] == job]


def test_backend_implements_the_port(backend: LocalBackend) -> None:
    """LocalBackend satisfies the FineTuneBackend protocol."""
    assert isinstance(backend, FineTuneBackend)


def test_submit_twice_is_one_job(backend: LocalBackend, jobs: dict[str, str], data: dict[str, DataRef]) -> None:
    """Submitting the same job name again returns the same job and starts no second process."""
    first = read_json(backend.job_dir(JOB) / "state.json")["supervisor"]
    again = backend.submit_finetune(_request(JOB, data))
    assert again.name == JOB
    assert read_json(backend.job_dir(JOB) / "state.json")["supervisor"] == first
    assert (backend.job_dir(JOB) / "data" / "train.jsonl").read_bytes().count(b"\n") == 64


def test_bad_parameters_fail_at_submit(backend: LocalBackend, data: dict[str, DataRef]) -> None:
    """An unusable parameter is refused before anything starts."""
    with pytest.raises(InvalidInput):
        backend.submit_finetune(_request("tg-job-bad", data, lr_scheduler_type="sometimes"))
    assert not backend.job_dir("tg-job-bad").exists()


def test_job_trains_and_loss_goes_down(backend: LocalBackend, jobs: dict[str, str]) -> None:
    """The job completes; its MLflow metrics show the loss falling, eval_loss, learning rate and tokens/s."""
    status = _terminal(backend, JOB)
    assert (status.state, status.raw_status, status.error) == (JobState.COMPLETED, "Completed", None), backend.job_log(
        JOB
    )
    assert status.tags["tunegridrunid"] == f"run-{JOB}"
    metrics = backend.get_job_metrics(JOB)
    loss = [p.value for p in metrics["loss"]]
    assert len(loss) == TINY_PARAMS["max_steps"]
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.05, loss
    assert metrics["eval_loss"] and metrics["learning_rate"] and metrics["tokens_per_s"]
    assert [p.step for p in metrics["loss"]] == sorted(p.step for p in metrics["loss"])
    log = "\n".join(backend.job_log(JOB, lines=200))
    assert f"step {TINY_PARAMS['max_steps']}/{TINY_PARAMS['max_steps']} loss=" in log and "tokens/s=" in log
    assert "ignoring Azure-only parameters: apply_deepspeed" in log


def test_job_output_is_an_mlflow_chat_model(backend: LocalBackend, jobs: dict[str, str]) -> None:
    """azureml://jobs/{job}/outputs/trained_model resolves to the merged MLflow model folder."""
    _terminal(backend, JOB)
    folder = backend.job_output(f"azureml://jobs/{JOB}/outputs/trained_model")
    mlmodel = (folder / "MLmodel").read_text(encoding="utf-8")
    assert "llm/v1/chat" in mlmodel and "transformers" in mlmodel
    assert not any(p.name.startswith("adapter_") for p in (folder / "model").iterdir()), "LoRA must be merged"
    with pytest.raises(NotFound):
        backend.job_output(f"azureml://jobs/{CRASH}/outputs/trained_model")


def test_events_reach_the_webhook_like_azure_ml(backend: LocalBackend, sink: EventSink, jobs: dict[str, str]) -> None:
    """NotStarted, Running, Completed and RunCompleted arrive at the webhook with Azure ML's payload."""
    _terminal(backend, JOB)
    wait_until(lambda: "RunCompleted" in _statuses(sink, JOB), timeout_s=60, what="RunCompleted at the webhook")
    assert _statuses(sink, JOB) == ["NotStarted", "Running", "Completed", "RunCompleted"]
    events = [e for e in sink.events if e["data"]["runId"] == JOB]
    for event in events:
        assert event["eventType"] in (RUN_STATUS_CHANGED, RUN_COMPLETED)
        assert event["subject"] == f"experiments/{event['data']['experimentId']}/runs/{JOB}"
        assert event["data"]["runType"] == "azureml.PipelineRun"
        assert event["data"]["runTags"]["tunegridrunid"] == f"run-{JOB}"
        assert event["topic"].endswith("/providers/Microsoft.MachineLearningServices/workspaces/local")
    assert "mlflow.runId" in events[-1]["data"]["runProperties"]
    assert len({e["id"] for e in events}) == len(events)


def test_trainer_crash_is_failed_with_its_reason(backend: LocalBackend, sink: EventSink, jobs: dict[str, str]) -> None:
    """An exception in the trainer ends the job Failed, with the error line, and a Failed event."""
    status = _terminal(backend, CRASH)
    assert status.state == JobState.FAILED and status.raw_status == "Failed"
    assert "MaskError" in status.error and "assistant mask is empty" in status.error
    wait_until(lambda: "Failed" in _statuses(sink, CRASH), timeout_s=60, what="the Failed event")
    failed = next(e for e in sink.events if e["data"]["runId"] == CRASH and e["data"].get("runStatus") == "Failed")
    assert "assistant mask is empty" in failed["data"]["runProperties"]["error"]
    assert "RunCompleted" not in _statuses(sink, CRASH)


def test_register_is_idempotent(backend: LocalBackend, jobs: dict[str, str]) -> None:
    """Registering the same name and version twice gives the same model; get_model finds it by our version."""
    _terminal(backend, JOB)
    tags = {"tunegridrunid": f"run-{JOB}", "tunegrid-owner": "test"}
    first = backend.register_model(job_name=JOB, name="tiny-chat", version="20240101.1", description="test", tags=tags)
    second = backend.register_model(job_name=JOB, name="tiny-chat", version="20240101.1", description="test", tags=tags)
    assert first == second and first.version == "20240101.1" and first.name == "tiny-chat"
    assert backend.get_model("tiny-chat", "20240101.1") == first
    assert backend.get_model("tiny-chat", "20240101.2") is None
    assert backend.get_model("no-such-model", "1") is None
    with pytest.raises(BackendError, match="Failed"):
        backend.register_model(job_name=CRASH, name="tiny-chat", version="20240101.3", description="", tags={})


def _post(uri: str, key: str, *, deployment: str | None = None, body: dict | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if deployment:
        headers["azureml-model-deployment"] = deployment
    return httpx.post(uri, json=body or SCORE, headers=headers, timeout=60)


def _dead(handle: dict) -> bool:
    return not ProcessHandle.from_dict(handle).alive()  # type: ignore[union-attr]


def test_endpoint_deployments_traffic_auth_and_delete(backend: LocalBackend, jobs: dict[str, str]) -> None:
    """Blue/green on one endpoint: provisioning, key auth, header targeting, split, counters, restart, delete."""
    _terminal(backend, JOB)
    model = backend.register_model(job_name=JOB, name="tiny-chat", version="20240101.1", description="test", tags={})
    op = backend.begin_create_endpoint("tg-ep-test", tags={"tunegrid-owner": "test", "tunegrid-keep": "false"})
    assert not op.done
    for name in ("blue", "green"):
        started = backend.begin_create_deployment(
            DeploymentSpec(endpoint="tg-ep-test", name=name, model=model, instance_type="Standard_DS3_v2")
        )
        assert started.status == "InProgress" and not started.done
    assert backend.get_deployment("tg-ep-test", "blue").provisioning_state in (
        ProvisioningState.CREATING,
        ProvisioningState.SUCCEEDED,
    )
    with pytest.raises(BackendError, match="Succeeded"):
        backend.begin_set_traffic("tg-ep-test", {"blue": 100})  # still loading its model
    endpoint = wait_until(
        lambda: (
            (e := backend.get_endpoint("tg-ep-test"))
            and e.provisioning_state == ProvisioningState.SUCCEEDED
            and all(d.provisioning_state == ProvisioningState.SUCCEEDED for d in e.deployments)
            and e
        ),
        timeout_s=180,
        what="endpoint and deployments to be Succeeded",
    )
    assert [d.name for d in endpoint.deployments] == ["blue", "green"] and endpoint.traffic == {"blue": 0, "green": 0}
    assert endpoint.tags["tunegrid-owner"] == "test" and endpoint.created_at is not None

    with pytest.raises(BackendError, match="sum to 0 or 100"):
        backend.begin_set_traffic("tg-ep-test", {"blue": 60, "green": 30})
    with pytest.raises(BackendError, match="does not exist"):
        backend.begin_set_traffic("tg-ep-test", {"purple": 100})
    assert backend.begin_set_traffic("tg-ep-test", {"blue": 50, "green": 50}).done

    creds = backend.get_credentials("tg-ep-test")
    assert creds.key not in repr(creds)
    ok = _post(creds.scoring_uri, creds.key)
    assert ok.status_code == 200 and isinstance(ok.json()["output"], str)
    assert _post(creds.scoring_uri, "wrong-key").status_code == 401
    assert _post(creds.scoring_uri, backend.endpoints.secondary_key("tg-ep-test")).status_code == 200
    assert _post(creds.scoring_uri, creds.key, deployment="green").headers["azureml-model-deployment"] == "green"
    assert _post(creds.scoring_uri, creds.key, deployment="nope").status_code == 404
    two = {
        "input_data": {
            "input_string": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "bye"}]],
            "parameters": {"max_new_tokens": 2},
        }
    }
    both = _post(creds.scoring_uri, creds.key, body=two).json()
    assert isinstance(both, list) and len(both) == 2 and all(set(item) == {"0"} for item in both)
    served = {_post(creds.scoring_uri, creds.key).headers["azureml-model-deployment"] for _ in range(24)}
    assert served == {"blue", "green"}
    assert _post(creds.scoring_uri, creds.key, deployment="blue").json()["output"] is not None

    activity = backend.get_endpoint_activity("tg-ep-test", since=datetime.now(UTC) - timedelta(minutes=10))
    assert activity.requests == 29 and activity.last_request_at is not None  # the 401 and the 404 do not count
    assert backend.get_endpoint_activity("tg-ep-test", since=datetime.now(UTC) + timedelta(minutes=2)).requests == 0
    just_after = activity.last_request_at + timedelta(milliseconds=1)
    assert backend.get_endpoint_activity("tg-ep-test", since=just_after).requests == 0  # sub-minute idle windows

    with pytest.raises(BackendError, match="traffic"):
        backend.begin_delete_deployment("tg-ep-test", "green")
    backend.begin_set_traffic("tg-ep-test", {"blue": 100, "green": 0}, mirror_traffic={"green": 50})
    assert backend.get_endpoint("tg-ep-test").mirror_traffic == {"green": 50}
    served = {_post(creds.scoring_uri, creds.key).headers["azureml-model-deployment"] for _ in range(20)}
    assert served == {"blue"}  # mirrored copies never answer the caller

    def counters() -> dict:
        return httpx.get(creds.scoring_uri.replace("/score", "/-/activity"), headers=creds.headers(), timeout=10).json()

    wait_until(
        lambda: counters()["mirrored"].get("green", 0) > 0, timeout_s=30, what="a mirrored request answered by green"
    )
    with pytest.raises(BackendError, match="50"):
        backend.begin_set_traffic("tg-ep-test", {"blue": 100}, mirror_traffic={"green": 60})
    backend.begin_set_traffic("tg-ep-test", {"blue": 100})
    doc = read_json(backend.workspace / "endpoints" / "tg-ep-test" / "endpoint.json")
    green_server = doc["deployments"]["green"]["server"]
    assert backend.begin_delete_deployment("tg-ep-test", "green").done
    assert _dead(green_server) and backend.get_deployment("tg-ep-test", "green") is None
    assert backend.get_endpoint("tg-ep-test").traffic == {"blue": 100}

    # A new backend over the same workspace (an app restart) finds the running processes again.
    again = LocalBackend(backend.workspace, base_model="tiny-phi3", model_cache_dir=backend.model_cache_dir)
    seen = again.get_endpoint("tg-ep-test")
    assert seen.created_at == endpoint.created_at and seen.tags == endpoint.tags
    assert seen.deployments[0].provisioning_state == ProvisioningState.SUCCEEDED
    fresh = again.get_credentials("tg-ep-test")
    assert _post(fresh.scoring_uri, fresh.key).json()["output"] is not None
    assert again.get_job(JOB).state == JobState.COMPLETED

    # Counters survive the router: persisted on shutdown, and unreadable only when nothing was saved.
    doc = read_json(backend.workspace / "endpoints" / "tg-ep-test" / "endpoint.json")
    router = ProcessHandle.from_dict(doc["router"])
    router.stop(grace_s=5)
    persisted = again.get_endpoint_activity("tg-ep-test", since=datetime.now(UTC) - timedelta(minutes=10))
    assert persisted.requests == 50 and "persisted" in persisted.source
    (backend.workspace / "endpoints" / "tg-ep-test" / "activity.json").unlink()
    with pytest.raises(MetricsUnavailable):
        again.get_endpoint_activity("tg-ep-test", since=datetime.now(UTC) - timedelta(minutes=10))
    wait_until(
        lambda: again.get_endpoint("tg-ep-test") and _health_ok(again), timeout_s=60, what="the router to be restarted"
    )

    # A model server that dies is reported Failed with a reason, not Succeeded.
    blue_server = read_json(backend.workspace / "endpoints" / "tg-ep-test" / "endpoint.json")["deployments"]["blue"][
        "server"
    ]
    os.killpg(blue_server["pid"], signal.SIGKILL)
    failed = wait_until(
        lambda: (
            (d := again.get_deployment("tg-ep-test", "blue")) and d.provisioning_state == ProvisioningState.FAILED and d
        ),
        timeout_s=20,
        what="blue Failed",
    )
    assert "no longer running" in failed.error

    doc = read_json(backend.workspace / "endpoints" / "tg-ep-test" / "endpoint.json")
    assert backend.begin_delete_endpoint("tg-ep-test").done
    assert _dead(doc["router"])
    assert backend.get_endpoint("tg-ep-test") is None
    assert "tg-ep-test" not in [e.name for e in backend.list_endpoints()]
    with pytest.raises(NotFound):
        backend.begin_delete_endpoint("tg-ep-test")


def _health_ok(backend: LocalBackend) -> bool:
    uri = backend.get_credentials("tg-ep-test").scoring_uri.replace("/score", "/health")
    try:
        return httpx.get(uri, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_cancel_stops_the_job(backend: LocalBackend, sink: EventSink, data: dict[str, DataRef]) -> None:
    """Cancel terminates the job process; the job ends Canceled with a Canceled event."""
    backend.submit_finetune(_request("tg-job-cancel", data, max_steps=5000))
    wait_until(lambda: backend.get_job("tg-job-cancel").raw_status == "Running", timeout_s=30, what="Running")
    op = backend.cancel_job("tg-job-cancel")
    assert op.kind == "cancel_job"
    status = _terminal(backend, "tg-job-cancel", timeout_s=30)
    assert (status.state, status.raw_status) == (JobState.CANCELED, "Canceled")
    state = read_json(backend.job_dir("tg-job-cancel") / "state.json")
    assert _dead(state["trainer"])
    wait_until(lambda: _dead(state["supervisor"]), timeout_s=15, what="the job process to exit")
    assert backend.cancel_job("tg-job-cancel").done
    wait_until(lambda: "Canceled" in _statuses(sink, "tg-job-cancel"), timeout_s=30, what="the Canceled event")


def test_killed_trainer_is_failed(backend: LocalBackend, data: dict[str, DataRef]) -> None:
    """A trainer killed from outside (OOM killer, kill -9) ends the job Failed, naming the signal."""
    backend.submit_finetune(_request("tg-job-killed", data, max_steps=5000))
    trainer = wait_until(
        lambda: read_json(backend.job_dir("tg-job-killed") / "state.json").get("trainer"),
        timeout_s=30,
        what="the trainer",
    )
    os.kill(trainer["pid"], signal.SIGKILL)
    status = _terminal(backend, "tg-job-killed", timeout_s=30)
    assert status.state == JobState.FAILED and "SIGKILL" in status.error


def test_dead_job_process_is_detected_after_a_restart(
    backend: LocalBackend, sink: EventSink, data: dict[str, DataRef]
) -> None:
    """If the whole job process dies with no final status, a new backend instance marks it Failed."""
    backend.submit_finetune(_request("tg-job-lost", data, max_steps=5000))
    state = wait_until(
        lambda: (s := read_json(backend.job_dir("tg-job-lost") / "state.json")).get("trainer") and s,
        timeout_s=30,
        what="the trainer",
    )
    os.killpg(state["supervisor"]["pid"], signal.SIGKILL)
    wait_until(
        lambda: _dead(state["supervisor"]) and _dead(state["trainer"]), timeout_s=10, what="the processes to die"
    )
    restarted = LocalBackend(backend.workspace)
    status = restarted.get_job("tg-job-lost")
    assert status.state == JobState.FAILED and "without a final status" in status.error
    backend.deliver_events()
    wait_until(lambda: "Failed" in _statuses(sink, "tg-job-lost"), timeout_s=30, what="the Failed event")


def test_outbox_redelivers_when_the_webhook_comes_up(
    tmp_path: Path, data: dict[str, DataRef], tmp_path_factory: pytest.TempPathFactory, azurite: object
) -> None:
    """Events made while the app is down are delivered by a later backend call once it is up."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/runtime/webhooks/eventgrid?functionName=job_events"
    b = LocalBackend(
        tmp_path / "ws",
        base_model="tiny-phi3",
        webhook_url=url,
        event_key=EVENT_KEY,
        fetch_data=blob_fetcher({"": azurite.connection_string}),  # type: ignore[attr-defined]
        model_cache_dir=model_cache(tmp_path_factory),
        redeliver_for_s=0,
    )
    try:
        b.submit_finetune(_request("tg-job-outbox", data, max_steps=5000))
        b.cancel_job("tg-job-outbox")
        _terminal(b, "tg-job-outbox", timeout_s=30)
        wait_until(lambda: len(b.outbox.pending()) >= 2, timeout_s=10, what="events in the outbox")
        time.sleep(0.5)
        with event_sink(EVENT_KEY, port=port) as sink:
            wait_until(
                lambda: b.get_job("tg-job-outbox") and not b.outbox.pending() and sink.events,
                timeout_s=90,
                interval_s=0.5,
                what="redelivery",
            )
            statuses = [e["data"].get("runStatus") for e in sink.events]
        assert statuses[0] == "NotStarted" and statuses[-1] == "Canceled"
    finally:
        b.stop_processes()
