"""Azure ML backend, after training: register, endpoints, deployments, traffic, deletes, keys, scoring
and endpoint usage, as the HTTP requests azure-ai-ml (and our own pipeline) send. Nothing waits:
long-running operations are accepted and then polled by azure-core on its own thread."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from azure.core.polling import LROPoller

from shared.adapters.azureml.backend import AzureMLBackend
from shared.domain.resources import DeploymentSpec, ModelRef, ProvisioningState
from shared.errors import (
    BackendError,
    ComputeError,
    ConfigError,
    ConflictError,
    InvalidInput,
    NotFound,
)
from shared.ports import FineTuneBackend
from tests import azure_reference as ref
from tests import azureml_rig as rig_module
from tests.azureml_rig import (
    ARM,
    LOCATION,
    WS_PATH,
    AzureMLRig,
    Reply,
    error_reply,
    load,
)

azureml_rig = rig_module.azureml_rig  # fixtures: the rig (no socket may open) and the socket guard alone
no_sockets = rig_module.no_sockets

MODEL_ARM_ID = f"{WS_PATH}/models/phi3-chat/versions/r1"
MODEL = ModelRef(name="phi3-chat", version="r1", id=MODEL_ARM_ID)
SCORE_HOST = f"ep-chat.{LOCATION}.inference.ml.azure.com"
PHI4_INFERENCE_SKUS = ref.spec(ref.PHI4)["system_metadata"]["SKU"]["inferenceRecommendedSkus"]
"""Standard_NC24ads_A100_v4 first (tests/data/azure-reference/azureml-assets/model-Phi-4.spec.yaml)."""


def _spec(**kwargs: Any) -> DeploymentSpec:
    base: dict[str, Any] = {
        "endpoint": "ep-chat",
        "name": "green",
        "model": MODEL,
        "instance_type": "Standard_NC24ads_A100_v4",
        "tags": {"tunegridrunid": "r1"},
    }
    return DeploymentSpec(**{**base, **kwargs})


def _model_put_answer(call: Any) -> Reply:
    doc = load("model_finetuned.json", model_name="phi3-chat", model_version="r1", job_name="tunegrid-r1")
    doc["properties"].update(call.json["properties"])
    return Reply(201, doc)


@pytest.fixture
def never_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call to a waiting poller method fails the test."""

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("the adapter waited on a long-running operation")

    monkeypatch.setattr(LROPoller, "result", refuse)
    monkeypatch.setattr(LROPoller, "wait", refuse)


def test_the_adapter_implements_the_port(azureml_rig: AzureMLRig) -> None:
    """AzureMLBackend is a FineTuneBackend (every method of the port is there)."""
    assert isinstance(azureml_rig.backend(), FineTuneBackend)


def test_register_puts_an_mlflow_model_from_the_jobs_output(azureml_rig: AzureMLRig) -> None:
    """GET first (absent), the job must be completed, then PUT the MLFLOW_MODEL with lineage tags."""
    rig = azureml_rig
    rig.serve_registry()
    rig.serve_job("tunegrid-r1", status="Completed")
    rig.on("GET", re.escape(f"{WS_PATH}/models/phi3-chat/versions/r1"), error_reply(404, "UserError", "Not found"))
    rig.on("GET", re.escape(f"{WS_PATH}/models/phi3-chat/versions"), Reply(200, {"value": []}))
    put = rig.on("PUT", re.escape(f"{WS_PATH}/models/phi3-chat/versions/r1"), _model_put_answer)

    ref = rig.backend().register_model(
        job_name="tunegrid-r1",
        name="phi3-chat",
        version="r1",
        description="Fine-tuned by Tunegrid run r1",
        tags={"tunegridrunid": "r1"},
    )

    assert ref == ModelRef(name="phi3-chat", version="r1", id=MODEL_ARM_ID)
    body = put.calls[0].json["properties"]
    assert body["modelType"] == "mlflow_model"
    assert body["modelUri"] == "azureml://jobs/tunegrid-r1/outputs/trained_model"
    assert body["description"] == "Fine-tuned by Tunegrid run r1"
    tags = body["tags"]
    assert (
        tags["tunegridrunid"] == "r1" and tags["tunegrid-owner"] == "tunegrid" and tags["tunegridjob"] == "tunegrid-r1"
    )
    assert tags["tunegridbasemodelid"] == "azureml://registries/azureml/models/Phi-4/versions/8"
    # Phi-4 keeps its list in system_metadata.SKU.inferenceRecommendedSkus; the tag carries it to the deployment step
    assert tags["inference_compute_allow_list"] == str(PHI4_INFERENCE_SKUS)


def test_registering_twice_is_a_no_op(azureml_rig: AzureMLRig) -> None:
    """The version exists: the GET answers it and nothing is written."""
    rig = azureml_rig
    rig.serve_model("phi3-chat", "r1", job_name="tunegrid-r1")
    ref = rig.backend().register_model(job_name="tunegrid-r1", name="phi3-chat", version="r1", description="d", tags={})
    assert ref.id == MODEL_ARM_ID
    assert rig.summary() == ["GET {ws}/models/phi3-chat/versions/r1"]


def test_register_refuses_a_job_that_did_not_complete(azureml_rig: AzureMLRig) -> None:
    """Only a completed job's trained_model is registered."""
    rig = azureml_rig
    rig.serve_job("tunegrid-r1", status="Failed")
    rig.on("GET", re.escape(f"{WS_PATH}/models/phi3-chat/versions/r1"), error_reply(404, "UserError", "Not found"))
    with pytest.raises(BackendError, match="job tunegrid-r1 is Failed"):
        rig.backend().register_model(job_name="tunegrid-r1", name="phi3-chat", version="r1", description="d", tags={})
    assert not rig.requests("PUT")


def test_create_endpoint_is_accepted_then_polled(azureml_rig: AzureMLRig, never_wait: None) -> None:
    """PUT onlineEndpoints (auth key, owner tag) returns 201 + Azure-AsyncOperation; the poller polls it."""
    rig = azureml_rig
    rig.on(
        "GET",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat"),
        error_reply(404, "EndpointNotFound", "Endpoint ep-chat not found"),
    )
    creating = load("endpoint.json", endpoint="ep-chat", provisioning_state="Creating")
    put = rig.lro(
        "PUT",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat"),
        initial_body=creating,
        final=load("endpoint.json", endpoint="ep-chat", provisioning_state="Succeeded"),
        then=lambda: rig.serve_endpoint("ep-chat", state="Succeeded"),
    )
    backend = rig.backend()

    op = backend.begin_create_endpoint(
        "ep-chat", tags={"tunegridmodel": "phi3-chat"}, description="Tunegrid endpoint for phi3-chat"
    )

    assert (op.kind, op.target, op.status, op.done) == ("create-endpoint", "ep-chat", "InProgress", False)
    call = put.calls[0]
    assert call.json == {
        "location": LOCATION,
        "properties": {
            "description": "Tunegrid endpoint for phi3-chat",
            "authMode": "Key",
            "properties": {},
            "traffic": {},
            "mirrorTraffic": {},
        },
        "identity": {"type": "SystemAssigned"},
        "tags": {"tunegrid-owner": "tunegrid", "tunegridmodel": "phi3-chat"},
    }
    polls = rig.wait_for("GET", r"/mfeOperationsStatus/", count=3)
    assert all(p.thread != "MainThread" for p in polls)  # azure-core's poller thread, not the caller
    info = backend.get_endpoint("ep-chat")
    assert info is not None and info.provisioning_state == ProvisioningState.SUCCEEDED


def test_an_existing_endpoint_is_not_put_again(azureml_rig: AzureMLRig) -> None:
    """Check before act: a second create reports the endpoint's state (a PUT would reset its traffic)."""
    rig = azureml_rig
    rig.serve_endpoint("ep-chat", state="Updating", traffic={"blue": 100})
    op = rig.backend().begin_create_endpoint("ep-chat", tags={})
    assert (op.status, op.done) == ("Updating", False)
    assert not rig.requests("PUT")


@pytest.mark.parametrize("name", ["ab", "1endpoint", "ep_chat", "ep-", "e" * 33])
def test_invalid_endpoint_names_are_refused_before_any_call(azureml_rig: AzureMLRig, name: str) -> None:
    """Azure's rules: 3-32 characters, a letter first, letters, digits and hyphens, no trailing hyphen."""
    with pytest.raises(InvalidInput, match="not valid in Azure"):
        azureml_rig.backend().begin_create_endpoint(name, tags={})
    assert not azureml_rig.calls


def test_create_deployment_sends_the_notebooks_deployment(azureml_rig: AzureMLRig, never_wait: None) -> None:
    """PUT deployments/green: model id, instance type and count, liveness delay, request settings."""
    rig = azureml_rig
    rig.serve_endpoint("ep-chat", traffic={"blue": 100})
    rig.serve_model("phi3-chat", "r1")
    rig.on(
        "GET",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments/green"),
        error_reply(404, "NotFound", "Deployment not found"),
    )
    put = rig.lro(
        "PUT",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments/green"),
        initial_body=rig.deployment_doc(
            "ep-chat", "green", state="Creating", model_name="phi3-chat", model_version="r1"
        ),
        final=rig.deployment_doc("ep-chat", "green", model_name="phi3-chat", model_version="r1"),
    )
    op = rig.backend().begin_create_deployment(
        _spec(
            instance_count=2,
            request_timeout_ms=90_000,
            liveness_initial_delay_s=600,
            max_concurrent_requests_per_instance=4,
        )
    )
    assert (op.kind, op.target, op.done) == ("create-deployment", "ep-chat/green", False)
    assert rig.summary() == [
        "GET {ws}/onlineEndpoints/ep-chat/deployments/green",  # check before act
        "GET {ws}/models/phi3-chat/versions/r1",  # the inference allow list carried on the model
        "GET {ws}/onlineEndpoints/ep-chat",  # the SDK checks the endpoint exists
        "GET {ws}",  # and reads the workspace's location
        "PUT {ws}/onlineEndpoints/ep-chat/deployments/green",
    ]
    assert put.calls[0].json == {
        "location": LOCATION,
        "properties": {
            "model": MODEL_ARM_ID,
            "properties": {},
            "environmentVariables": {},
            "appInsightsEnabled": False,
            "requestSettings": {"maxConcurrentRequestsPerInstance": 4, "requestTimeout": "PT1M30S"},
            "livenessProbe": {"initialDelay": "PT10M"},
            "instanceType": "Standard_NC24ads_A100_v4",
            "endpointComputeType": "Managed",
        },
        "tags": {"tunegrid-owner": "tunegrid", "tunegridrunid": "r1"},
        "sku": {"name": "Default", "capacity": 2},
    }


def test_request_timeout_is_capped_at_180_seconds(azureml_rig: AzureMLRig) -> None:
    """request_timeout_ms above Azure's maximum is sent as 180000 ms."""
    rig = azureml_rig
    rig.serve_endpoint("ep-chat")
    rig.serve_model("phi3-chat", "r1")
    rig.on(
        "GET",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments/green"),
        error_reply(404, "NotFound", "Deployment not found"),
    )
    put = rig.lro(
        "PUT",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments/green"),
        final=rig.deployment_doc("ep-chat", "green"),
    )
    rig.backend().begin_create_deployment(_spec(request_timeout_ms=500_000))
    assert put.calls[0].json["properties"]["requestSettings"]["requestTimeout"] == "PT3M"


def test_an_instance_type_outside_the_inference_allow_list_is_refused(azureml_rig: AzureMLRig) -> None:
    """The base model's inference_compute_allow_list (carried on the registered model) is enforced."""
    rig = azureml_rig
    rig.serve_model("phi3-chat", "r1")
    rig.on(
        "GET",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments/green"),
        error_reply(404, "NotFound", "Deployment not found"),
    )
    with pytest.raises(
        ComputeError, match=r"Standard_DS3_v2 \(deployment ep-chat/green\) is not on the inference SKU list"
    ):
        rig.backend().begin_create_deployment(_spec(instance_type="Standard_DS3_v2"))
    assert not rig.requests("PUT")


def _deployment_routes(rig: AzureMLRig, *, tags: dict[str, str] | None = None) -> Any:
    rig.serve_endpoint("ep-chat")
    rig.serve_model("phi3-chat", "r1", tags=tags)
    rig.on(
        "GET",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments/green"),
        error_reply(404, "NotFound", "Deployment not found"),
    )
    return rig.lro(
        "PUT",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments/green"),
        final=rig.deployment_doc("ep-chat", "green"),
    )


def test_an_unset_instance_type_is_the_models_first_inference_sku(azureml_rig: AzureMLRig) -> None:
    """INFERENCE_INSTANCE_TYPE empty (the shipped default): the first size of the list the model carries."""
    put = _deployment_routes(azureml_rig)
    azureml_rig.backend().begin_create_deployment(_spec(instance_type=""))
    assert put.calls[0].json["properties"]["instanceType"] == PHI4_INFERENCE_SKUS[0] == "Standard_NC24ads_A100_v4"


def test_a_retired_size_is_refused_even_where_a_stale_list_names_it(azureml_rig: AzureMLRig) -> None:
    """Phi-3-mini's (tags form) inference list still starts with Standard_NC6s_v3: explicit, it is refused
    with the NCv3 retirement date; unset, the first size that is not retired is taken."""
    phi3 = ref.spec(ref.PHI3_MINI_TAGS)["tags"]["inference_compute_allow_list"]
    tags = {"inference_compute_allow_list": str(phi3)}
    put = _deployment_routes(azureml_rig, tags=tags)
    backend = azureml_rig.backend()
    with pytest.raises(ComputeError, match=r"Standard_NC6s_v3 .*NCv3 family, retired on 2025-09-30"):
        backend.begin_create_deployment(_spec(instance_type="Standard_NC6s_v3"))
    assert not put.calls
    backend.begin_create_deployment(_spec(instance_type=""))
    assert put.calls[0].json["properties"]["instanceType"] == "Standard_ND40rs_v2"  # the first not in a retired family


def test_a_model_without_an_inference_list_is_warned_about(
    azureml_rig: AzureMLRig, caplog: pytest.LogCaptureFixture
) -> None:
    """No list on the model: an explicit size is deployed with a warning; no size at all is refused."""
    put = _deployment_routes(azureml_rig, tags={"tunegrid-owner": "tunegrid"})
    backend = azureml_rig.backend()
    with pytest.raises(ComputeError, match=r"lists no inference SKUs.*set INFERENCE_INSTANCE_TYPE"):
        backend.begin_create_deployment(_spec(instance_type=""))
    backend.begin_create_deployment(_spec(instance_type="Standard_NC48ads_A100_v4"))
    assert put.calls[0].json["properties"]["instanceType"] == "Standard_NC48ads_A100_v4"
    assert "lists no inference SKUs" in caplog.text and "is not checked against a list" in caplog.text


def test_a_malformed_inference_allow_list_is_a_config_error(azureml_rig: AzureMLRig) -> None:
    """The allow list tag must parse; otherwise the deployment is not started."""
    rig = azureml_rig
    rig.serve_model("phi3-chat", "r1", tags={"inference_compute_allow_list": "['Standard_NC6s_v3'"})
    rig.on(
        "GET",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments/green"),
        error_reply(404, "NotFound", "Deployment not found"),
    )
    with pytest.raises(ConfigError, match="inference_compute_allow_list"):
        rig.backend().begin_create_deployment(_spec())


def test_a_failed_provisioning_state_is_reported_with_the_operations_error(azureml_rig: AzureMLRig) -> None:
    """The LRO ends Failed: get_deployment says FAILED with the operation's error message."""
    rig = azureml_rig
    rig.serve_endpoint("ep-chat")
    rig.serve_model("phi3-chat", "r1")
    rig.on(
        "GET",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments/green"),
        error_reply(404, "NotFound", "Deployment not found"),
    )
    rig.lro(
        "PUT",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments/green"),
        initial_body=rig.deployment_doc("ep-chat", "green", state="Creating"),
        statuses=("InProgress", "Failed"),
        error={"code": "ResourceNotReady", "message": "User container has crashed or terminated: out of GPU memory"},
        then=lambda: rig.serve_deployment("ep-chat", "green", state="Failed"),
    )
    backend = rig.backend()
    backend.begin_create_deployment(_spec())
    rig.wait_for("GET", r"/mfeOperationsStatus/", count=2)
    deadline = datetime.now(UTC).timestamp() + 10
    info = backend.get_deployment("ep-chat", "green")
    while (
        info is not None
        and info.error is not None
        and "ResourceNotReady" not in info.error
        and datetime.now(UTC).timestamp() < deadline
    ):
        info = backend.get_deployment("ep-chat", "green")
    assert info is not None and info.provisioning_state == ProvisioningState.FAILED
    assert (
        info.error
        == "deployment green of endpoint ep-chat is in provisioning state Failed: ResourceNotReady: User container has crashed or terminated: out of GPU memory"
    )


def test_a_failed_deployment_found_later_still_says_failed(azureml_rig: AzureMLRig) -> None:
    """Read in another process (no poller): FAILED, with where to find the logs."""
    rig = azureml_rig
    rig.serve_deployment("ep-chat", "green", state="Failed")
    info = rig.backend().get_deployment("ep-chat", "green")
    assert info is not None and info.provisioning_state == ProvisioningState.FAILED
    assert info.error is not None and "az ml online-deployment get-logs -e ep-chat -n green" in info.error


def test_traffic_is_set_with_a_put_of_the_endpoint(azureml_rig: AzureMLRig, never_wait: None) -> None:
    """As the SDK does it: GET the endpoint, then PUT it with the new traffic and mirror traffic."""
    rig = azureml_rig
    rig.serve_endpoint(
        "ep-chat",
        traffic={"blue": 100},
        deployments=[rig.deployment_doc("ep-chat", "blue"), rig.deployment_doc("ep-chat", "green")],
    )
    put = rig.lro(
        "PUT",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat"),
        final=load("endpoint.json", endpoint="ep-chat", provisioning_state="Succeeded"),
        then=lambda: None,
    )
    op = rig.backend().begin_set_traffic("ep-chat", {"blue": 100, "green": 0}, mirror_traffic={"green": 20})
    assert (op.kind, op.done) == ("set-traffic", False)
    assert put.calls[0].json == {
        "location": LOCATION,
        "properties": {
            "description": "Tunegrid endpoint",
            "authMode": "Key",
            "properties": {},
            "traffic": {"blue": 100},
            "mirrorTraffic": {"green": 20},
        },
        "identity": {"type": "SystemAssigned"},
        "tags": {"tunegrid-owner": "tunegrid"},
    }


def test_traffic_already_in_place_is_not_put_again(azureml_rig: AzureMLRig) -> None:
    """A repeated shift is a no-op."""
    rig = azureml_rig
    rig.serve_endpoint(
        "ep-chat",
        traffic={"blue": 0, "green": 100},
        deployments=[rig.deployment_doc("ep-chat", "blue"), rig.deployment_doc("ep-chat", "green")],
    )
    op = rig.backend().begin_set_traffic("ep-chat", {"green": 100}, mirror_traffic={})
    assert (op.status, op.done) == ("Succeeded", True)
    assert not rig.requests("PUT")


@pytest.mark.parametrize(
    ("traffic", "mirror", "error", "match"),
    [
        ({"blue": 60, "green": 30}, {}, InvalidInput, "add up to 0 or 100"),
        ({"blue": 100}, {"green": 60}, InvalidInput, "at most 50"),
        ({"blue": 100}, {"blue": 10}, InvalidInput, "live and mirrored"),
        ({"yellow": 100}, {}, NotFound, "no deployment named yellow"),
    ],
)
def test_bad_traffic_is_refused_before_the_put(
    azureml_rig: AzureMLRig, traffic: dict[str, int], mirror: dict[str, int], error: type[Exception], match: str
) -> None:
    """Shares must add up to 0 or 100, mirror at most 50 and only to a deployment without live traffic."""
    rig = azureml_rig
    rig.serve_endpoint(
        "ep-chat",
        traffic={"blue": 100},
        deployments=[rig.deployment_doc("ep-chat", "blue"), rig.deployment_doc("ep-chat", "green")],
    )
    with pytest.raises(error, match=match):
        rig.backend().begin_set_traffic("ep-chat", traffic, mirror_traffic=mirror)
    assert not rig.requests("PUT")


def test_delete_deployment_sends_delete_without_waiting(azureml_rig: AzureMLRig, never_wait: None) -> None:
    """DELETE deployments/blue once it has no traffic; accepted (202 + Location), not waited on."""
    rig = azureml_rig
    rig.serve_deployment("ep-chat", "blue")
    rig.serve_endpoint("ep-chat", traffic={"blue": 0, "green": 100})
    rig.lro(
        "DELETE",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments/blue"),
        initial_status=202,
        header="Location",
    )
    op = rig.backend().begin_delete_deployment("ep-chat", "blue")
    assert (op.kind, op.target, op.done) == ("delete-deployment", "ep-chat/blue", False)
    delete = rig.one("DELETE", r"/deployments/blue$")
    assert delete.url.startswith(f"{ARM}{WS_PATH}/onlineEndpoints/ep-chat/deployments/blue?api-version=")


def test_a_deployment_with_traffic_is_not_deleted(azureml_rig: AzureMLRig) -> None:
    """Deleting a deployment that still takes traffic is a ConflictError, with nothing sent."""
    rig = azureml_rig
    rig.serve_deployment("ep-chat", "blue")
    rig.serve_endpoint("ep-chat", traffic={"blue": 100})
    with pytest.raises(ConflictError, match="still takes 100 % live"):
        rig.backend().begin_delete_deployment("ep-chat", "blue")
    assert not rig.requests("DELETE")


def test_deleting_what_is_gone_is_a_no_op(azureml_rig: AzureMLRig) -> None:
    """A repeated delete finds nothing and reports done."""
    rig = azureml_rig
    rig.on(
        "GET", re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments/blue"), error_reply(404, "NotFound", "gone")
    )
    rig.on("GET", re.escape(f"{WS_PATH}/onlineEndpoints/ep-old"), error_reply(404, "NotFound", "gone"))
    backend = rig.backend()
    assert backend.begin_delete_deployment("ep-chat", "blue").done
    assert backend.begin_delete_endpoint("ep-old").done
    assert not rig.requests("DELETE")


def test_delete_endpoint_sends_delete_without_waiting(azureml_rig: AzureMLRig, never_wait: None) -> None:
    """DELETE onlineEndpoints/ep-chat, accepted and polled in the background."""
    rig = azureml_rig
    rig.serve_endpoint("ep-chat")
    rig.lro("DELETE", re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat"), initial_status=202, header="Location")
    op = rig.backend().begin_delete_endpoint("ep-chat")
    assert (op.kind, op.done) == ("delete-endpoint", False)
    rig.one("DELETE", r"/onlineEndpoints/ep-chat$")


def test_keys_come_from_list_keys_and_stay_out_of_repr(azureml_rig: AzureMLRig) -> None:
    """POST listKeys gives the primary key; the credentials' repr does not show it."""
    rig = azureml_rig
    rig.serve_endpoint("ep-chat")
    rig.on("POST", re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/listKeys"), Reply(200, load("endpoint_keys.json")))
    creds = rig.backend().get_credentials("ep-chat")
    assert creds.key == "pk-0123456789abcdef0123456789abcdef"
    assert creds.scoring_uri == f"https://{SCORE_HOST}/score"
    assert "pk-0123" not in repr(creds)
    assert rig.one("POST", "listKeys").body == b""


def test_list_endpoints_reads_tags_traffic_creation_time_and_deployments(azureml_rig: AzureMLRig) -> None:
    """The janitor's view: every endpoint with its tags, traffic, created_at and deployments."""
    rig = azureml_rig
    ep = load("endpoint.json", endpoint="ep-chat", provisioning_state="Succeeded")
    ep["properties"]["traffic"] = {"blue": 100}
    rig.on("GET", re.escape(f"{WS_PATH}/onlineEndpoints"), Reply(200, {"value": [ep]}))
    rig.on(
        "GET",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments"),
        Reply(200, {"value": [rig.deployment_doc("ep-chat", "blue")]}),
    )
    [info] = rig.backend().list_endpoints()
    assert info.name == "ep-chat" and info.tags == {"tunegrid-owner": "tunegrid"} and info.traffic == {"blue": 100}
    assert info.created_at == datetime(2025, 6, 1, 9, 0, tzinfo=UTC)
    [deployment] = info.deployments
    assert (deployment.name, deployment.provisioning_state, deployment.created_at) == (
        "blue",
        ProvisioningState.SUCCEEDED,
        datetime(2025, 6, 1, 9, 10, tzinfo=UTC),
    )


def test_a_rollout_sends_these_calls_in_this_order(azureml_rig: AzureMLRig, never_wait: None) -> None:
    """Register, endpoint, deployment at 0 %, smoke by name, shift traffic, retire the old deployment."""
    rig = azureml_rig
    rig.serve_registry()
    rig.serve_job("tunegrid-r1", status="Completed")
    rig.on("GET", re.escape(f"{WS_PATH}/models/phi3-chat/versions/r1"), error_reply(404, "UserError", "Not found"))
    rig.on("GET", re.escape(f"{WS_PATH}/models/phi3-chat/versions"), Reply(200, {"value": []}))
    rig.on(
        "PUT",
        re.escape(f"{WS_PATH}/models/phi3-chat/versions/r1"),
        lambda call: (rig.serve_model("phi3-chat", "r1"), _model_put_answer(call))[1],
    )
    rig.serve_endpoint("ep-chat", traffic={"blue": 100}, deployments=[rig.deployment_doc("ep-chat", "blue")])
    rig.on(
        "GET",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments/green"),
        error_reply(404, "NotFound", "Deployment not found"),
    )
    rig.lro(
        "PUT",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments/green"),
        final=rig.deployment_doc("ep-chat", "green"),
        then=lambda: (
            rig.serve_deployment("ep-chat", "green"),
            rig.serve_endpoint(
                "ep-chat",
                traffic={"blue": 100, "green": 0},
                deployments=[rig.deployment_doc("ep-chat", "blue"), rig.deployment_doc("ep-chat", "green")],
            ),
        ),
    )
    rig.on("POST", re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/listKeys"), Reply(200, load("endpoint_keys.json")))
    rig.lro(
        "PUT",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat"),
        final=load("endpoint.json", endpoint="ep-chat", provisioning_state="Succeeded"),
        then=lambda: (
            rig.serve_endpoint(
                "ep-chat",
                traffic={"blue": 0, "green": 100},
                deployments=[rig.deployment_doc("ep-chat", "blue"), rig.deployment_doc("ep-chat", "green")],
            ),
            rig.serve_deployment("ep-chat", "blue"),
        ),
    )
    rig.lro(
        "DELETE",
        re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat/deployments/blue"),
        initial_status=202,
        header="Location",
    )
    backend = rig.backend()

    model = backend.register_model(job_name="tunegrid-r1", name="phi3-chat", version="r1", description="d", tags={})
    assert backend.begin_create_endpoint("ep-chat", tags={}).done  # exists already (blue is live)
    backend.begin_create_deployment(_spec(model=model))
    assert backend.get_deployment("ep-chat", "green").provisioning_state == ProvisioningState.SUCCEEDED  # type: ignore[union-attr]
    backend.get_credentials("ep-chat")  # what the smoke test's caller fetches (its POST is not the adapter's)
    backend.begin_set_traffic("ep-chat", {"blue": 0, "green": 100}, mirror_traffic={})
    backend.begin_delete_deployment("ep-chat", "blue")

    writes = [line for line in rig.summary() if not line.startswith("GET")]
    assert writes == [
        "PUT {ws}/models/phi3-chat/versions/r1",
        "PUT {ws}/onlineEndpoints/ep-chat/deployments/green",
        "POST {ws}/onlineEndpoints/ep-chat/listKeys",
        "PUT {ws}/onlineEndpoints/ep-chat",
        "DELETE {ws}/onlineEndpoints/ep-chat/deployments/blue",
    ]
    assert rig.one("PUT", r"/onlineEndpoints/ep-chat$").json["properties"]["traffic"] == {"green": 100}


def test_from_settings_uses_managed_identity_in_azure_and_developer_credentials_locally(no_sockets: list[Any]) -> None:
    """IDENTITY_ENDPOINT (or a client id) picks ManagedIdentityCredential; else DefaultAzureCredential; no call is made."""
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    from shared.adapters.azureml.clients import build_credential
    from tests.azureml_rig import AzureMLRig as Rig

    settings = Rig().settings()
    in_azure = build_credential(
        settings, env={"IDENTITY_ENDPOINT": "http://localhost:42356/msi/token", "IDENTITY_HEADER": "x"}
    )
    assert isinstance(in_azure, ManagedIdentityCredential)
    assert isinstance(
        build_credential(Rig().settings(AZURE_CLIENT_ID="11111111-2222-3333-4444-555555555555"), env={}),
        ManagedIdentityCredential,
    )
    assert isinstance(build_credential(settings, env={}), DefaultAzureCredential)
    backend = AzureMLBackend.from_settings(settings, env={})
    assert backend.name == "azureml"
    assert not no_sockets


def test_the_backend_needs_its_workspace_settings() -> None:
    """Without subscription, resource group and workspace the backend refuses to start."""
    from shared.settings import Settings

    with pytest.raises(ConfigError, match="AZURE_SUBSCRIPTION_ID"):
        AzureMLBackend(Settings.from_env({}), credential=object())  # type: ignore[arg-type]
