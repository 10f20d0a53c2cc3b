"""azure-ai-ml's own recordings of the live service, replayed through `AzureMLBackend` at the transport.

Captures (tests/data/azure-reference/azure-sdk-recordings, see its README):
- `test_online_endpoint_e2e`: endpoint create (201 + Azure-AsyncOperation, polls Updating -> Succeeded),
  get, an `AMLToken` endpoint's `POST .../token`, delete (202, polls Updating -> Succeeded);
- `test_online_endpoint_mir_e2e`: delete answered 204;
- `test_online_deployment_create_when_registry_assets`: the registry's discovery refusing access (403);
- `test_pipeline_job_create_with_registries`: a pipeline job PUT rejected with 400.
Only what a recording lacks is written here: the 404 of a check-before-act read that comes before the
recorded create, and the base model and component of the 400 case (built from the registry's specs).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from azure.core.polling import LROPoller

from shared.domain.resources import DataRef, FineTuneRequest, ProvisioningState
from shared.errors import BackendError, PermissionDenied
from tests import azure_reference as ref
from tests import azureml_rig as rig_module
from tests.azureml_rig import WS_PATH, AzureMLRig, Reply, error_reply

azureml_rig = rig_module.azureml_rig  # fixtures: the rig (no socket may open) and the socket guard alone
no_sockets = rig_module.no_sockets

ENDPOINT = "online-ept-19282f598c8c49a"
"""The endpoint of the e2e recording."""
ENDPOINT_PATH = f"{WS_PATH}/onlineEndpoints/{ENDPOINT}"
NOT_FOUND = error_reply(404, "ResourceNotFound", "not found")
"""Hand-written: the read before the recorded create (ARM's error shape; no capture of a 404)."""


@pytest.fixture
def never_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call to a waiting poller method fails the test."""

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("the adapter waited on a long-running operation")

    monkeypatch.setattr(LROPoller, "result", refuse)
    monkeypatch.setattr(LROPoller, "wait", refuse)


def _recorded_endpoint(name: str = ENDPOINT) -> dict[str, Any]:
    """The endpoint as the e2e recording's GET after provisioning answered it (renamed when asked)."""
    body = ref.Recording.load(ref.RECORDED_ENDPOINT_E2E).first("GET", rf"/onlineEndpoints/{ENDPOINT}$").body
    return json.loads(json.dumps(body).replace(ENDPOINT, name))


def _recorded_existing(rig: AzureMLRig, filename: str, name: str = ENDPOINT) -> ref.Replayer:
    """A recording replayed on an endpoint that already exists (its create is not part of the test)."""
    deployments = ref.Recording.load(ref.RECORDED_ENDPOINT_E2E).first("GET", r"/deployments$").body
    path = f"{WS_PATH}/onlineEndpoints/{name}"
    return ref.replay(
        rig,
        filename,
        before={
            ("GET", path): Reply(200, _recorded_endpoint(name)),
            ("GET", f"{path}/deployments"): Reply(200, deployments),
        },
    )


def test_endpoint_create_is_accepted_then_polled_from_updating_to_succeeded(
    azureml_rig: AzureMLRig, never_wait: None
) -> None:
    """The recorded 201 + Azure-AsyncOperation, three polls (Updating, Updating, Succeeded) on azure-core's
    thread, then the recorded endpoint: Succeeded, with its scoring URI."""
    rig = azureml_rig
    replay = ref.replay(rig, ref.RECORDED_ENDPOINT_E2E, before={("GET", ENDPOINT_PATH): NOT_FOUND})
    backend = rig.backend()

    op = backend.begin_create_endpoint(ENDPOINT, tags={"tunegridmodel": "m"})

    # returned at once (never_wait); how far azure-core's thread has polled by then is its business
    assert (op.kind, op.target) == ("create-endpoint", ENDPOINT) and op.status in (
        "InProgress",
        "Updating",
        "Succeeded",
    )
    put = rig.one("PUT", rf"/onlineEndpoints/{ENDPOINT}$")
    assert put.json["properties"]["authMode"] == "Key"  # our body; the answer is the recorded one
    polls = rig.wait_for("GET", r"/mfeOperationsStatus/", count=3)
    assert all(p.thread != "MainThread" for p in polls)
    rig.wait_for("GET", rf"/onlineEndpoints/{ENDPOINT}$", count=2)  # the poller's final read of the resource
    info = backend.get_endpoint(ENDPOINT)
    assert info is not None and info.provisioning_state == ProvisioningState.SUCCEEDED
    assert info.scoring_uri == f"https://{ENDPOINT}.eastus.inference.ml.azure.com/score"
    assert info.created_at == datetime(2025, 2, 26, 11, 11, 41, 547871, tzinfo=UTC)
    statuses = [e.body["status"] for e in replay.served if "/mfeOperationsStatus/" in e.path]
    assert statuses == ["Updating", "Updating", "Succeeded"]


def test_an_aml_token_endpoint_has_no_keys_and_gets_the_recorded_token(azureml_rig: AzureMLRig) -> None:
    """authMode AMLToken: the SDK posts `.../token` (never listKeys); the token's expiry is the recorded
    expiryTimeUtc (1740654709)."""
    rig = azureml_rig
    replay = _recorded_existing(rig, ref.RECORDED_ENDPOINT_E2E)

    creds = rig.backend().get_credentials(ENDPOINT)

    assert creds.scoring_uri == f"https://{ENDPOINT}.eastus.inference.ml.azure.com/score"
    assert creds.key == "Sanitized"  # the recording's sanitised accessToken
    assert creds.expires_at == datetime.fromtimestamp(1740654709, UTC)
    assert "Sanitized" not in repr(creds)
    assert not rig.requests("POST", "listKeys")
    assert [(e.method, e.status) for e in replay.served if e.path == f"{ENDPOINT_PATH}/token"] == [("POST", 200)]


def test_endpoint_delete_is_accepted_202_and_polled_without_waiting(azureml_rig: AzureMLRig, never_wait: None) -> None:
    """The recorded DELETE 202 + Azure-AsyncOperation; the adapter returns at once, azure-core polls
    Updating, Updating, Succeeded."""
    rig = azureml_rig
    replay = _recorded_existing(rig, ref.RECORDED_ENDPOINT_E2E)

    op = rig.backend().begin_delete_endpoint(ENDPOINT)

    assert (op.kind, op.target) == ("delete-endpoint", ENDPOINT)
    rig.wait_for("GET", r"/mfeOperationsStatus/", count=3)
    statuses = [e.body["status"] for e in replay.served if "/mfeOperationsStatus/" in e.path]
    assert statuses == ["Updating", "Updating", "Succeeded"]
    assert rig.one("DELETE", rf"/onlineEndpoints/{ENDPOINT}$")


def test_a_delete_answered_204_is_done_at_once(azureml_rig: AzureMLRig) -> None:
    """The endpoint went away between our read and the DELETE: the recorded 204 ends the operation."""
    rig = azureml_rig
    name = "online-ept-d0d00f0f73a2406"
    replay = _recorded_existing(rig, ref.RECORDED_ENDPOINT_DELETE_204, name=name)

    op = rig.backend().begin_delete_endpoint(name)

    assert (op.kind, op.target, op.done) == ("delete-endpoint", name, True)
    assert [(e.method, e.status) for e in replay.served] == [("DELETE", 204)]
    assert not rig.requests("GET", r"/mfeOperationsStatus/")


def _request(job_name: str = "tunegrid-r1") -> FineTuneRequest:
    return FineTuneRequest(
        run_id="r1",
        job_name=job_name,
        dataset="ultrachat.jsonl",
        train=DataRef(
            "prepared-data", "r1/train.jsonl", "https://st.blob.core.windows.net/prepared-data/r1/train.jsonl"
        ),
        test=DataRef("prepared-data", "r1/test.jsonl", "https://st.blob.core.windows.net/prepared-data/r1/test.jsonl"),
    )


def test_a_registry_403_names_the_missing_role_and_the_services_reason(azureml_rig: AzureMLRig) -> None:
    """The recorded discovery 403 ('not allowed to access registry'): PermissionDenied naming the role,
    the registry, and what the service said; nothing is retried or submitted."""
    rig = azureml_rig
    ref.replay(rig, ref.RECORDED_REGISTRY_403)

    with pytest.raises(PermissionDenied) as info:
        rig.backend().check_finetune(_request())

    message = str(info.value)
    assert "HTTP 403" in message
    assert "lacks the role 'AzureML Registry User' on the registry azureml" in message
    assert "User/tenant/subscription is not allowed to access registry azureml" in message
    assert len(rig.requests("GET", r"/discovery$")) == 1 and not rig.requests("PUT")


def test_a_pipeline_job_400_carries_the_services_message(azureml_rig: AzureMLRig) -> None:
    """The recorded 400 on the job PUT: BackendError with the service's code and message, sent once."""
    rig = azureml_rig
    job = "test_672362765375"  # the recorded job's name
    rig.serve_registry()
    rig.serve_vm_sizes()
    ref.replay(rig, ref.RECORDED_PIPELINE_JOB_400, before={("GET", f"{WS_PATH}/jobs/{job}"): NOT_FOUND})

    with pytest.raises(BackendError) as info:
        rig.backend().submit_finetune(_request(job))

    message = str(info.value)
    assert message.startswith(f"submit the pipeline job {job}: Azure ML refused the request (HTTP 400): BadRequest: ")
    assert "Invalid region eastus2 for operation consume in registry 00000-test" in message
    assert len(rig.requests("PUT", re.escape(f"/jobs/{job}") + "$")) == 1
