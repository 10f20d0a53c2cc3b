"""Azure ML backend, jobs: the exact HTTP requests azure-ai-ml sends, answered with service-shaped JSON.

Submission (check-before-act, compute checks, the pipeline job PUT field by field against the
notebook), status with the failed step's error, cancel, metrics, and the error and retry paths.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import stamina

from shared.domain.resources import DataRef, FineTuneRequest, JobState
from shared.errors import ComputeError, ConfigError, ConflictError, NotFound, PermissionDenied, TransientError
from tests import azure_reference as ref
from tests import azureml_rig as rig_module
from tests.azureml_rig import (
    API_HOST,
    MLFLOW_PATH,
    REGISTRY_PATH,
    SUBSCRIPTION,
    WS_PATH,
    AzureMLRig,
    Reply,
    error_reply,
    load,
)

azureml_rig = rig_module.azureml_rig  # fixtures: the rig (no socket may open) and the socket guard alone
no_sockets = rig_module.no_sockets

PHI4_ID = "azureml://registries/azureml/models/Phi-4/versions/8"
"""The shipped default base model, served from tests/data/azure-reference/azureml-assets/model-Phi-4.spec.yaml."""
NOTEBOOK_COMPONENT_ID = "azureml://registries/azureml/components/chat_completion_pipeline/versions/0.0.82"


def _request(**kwargs: Any) -> FineTuneRequest:
    base: dict[str, Any] = {
        "run_id": "r1",
        "job_name": "tunegrid-r1",
        "dataset": "ultrachat.jsonl",
        "train": DataRef(
            "prepared-data", "r1/train.jsonl", "https://sttunegrid.blob.core.windows.net/prepared-data/r1/train.jsonl"
        ),
        "test": DataRef(
            "prepared-data", "r1/test.jsonl", "https://sttunegrid.blob.core.windows.net/prepared-data/r1/test.jsonl"
        ),
        "tags": {"tunegridrunid": "r1", "tunegriddataset": "ultrachat.jsonl", "tunegrid-owner": "tunegrid"},
    }
    return FineTuneRequest(**{**base, **kwargs})


def _phi4(*, defaults: bool = True, skus: bool = True) -> Any:
    """Phi-4 as the registry answers it (from its spec), optionally without its model_specific_defaults
    tag or its system_metadata.SKU lists (the model then has no list at all)."""
    model = ref.model_version_doc(ref.PHI4)
    if not defaults:
        del model["properties"]["tags"]["model_specific_defaults"]
    if not skus:
        del model["properties"]["system_metadata"]["SKU"]
    return model


def _literals(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v.get("value", v.get("uri")) for k, v in node["inputs"].items()}


def test_submission_puts_the_notebooks_pipeline_job(azureml_rig: AzureMLRig) -> None:
    """The PUT body is the notebook's pipeline, field by field; the job name is ours and nothing waits."""
    rig = azureml_rig
    rig.serve_registry(model=_phi4(defaults=False))
    rig.serve_vm_sizes()
    put = rig.accept_job_submission()
    backend = rig.backend(rig.settings(AZUREML_DATASTORE="prepareddata"))

    job = backend.submit_finetune(_request())

    assert job.name == "tunegrid-r1" and job.base_model_id == PHI4_ID
    assert job.studio_url and "tunegrid-r1" in job.studio_url
    assert rig.summary() == [
        "GET {ws}/jobs/tunegrid-r1",  # check before act
        "GET /registrymanagement/v1.0/registries/azureml/discovery",
        "GET {registry}/models/Phi-4/versions",  # label latest
        "GET {registry}/models/Phi-4/versions/8",
        "GET {registry}/models/Phi-4/versions/8",  # again, as the REST document (isArchived, system_metadata)
        "GET {ws}",  # the workspace's location, for list_sizes
        f"GET /subscriptions/{SUBSCRIPTION}/providers/Microsoft.MachineLearningServices/locations/eastus/vmSizes",
        "GET {registry}/components/chat_completion_pipeline/versions",
        "GET {ws}",
        "PUT {ws}/jobs/tunegrid-r1",
    ]
    call = put.calls[0]
    assert call.query["api-version"] == "2024-01-01-preview"
    props = call.json["properties"]
    assert props["jobType"] == "Pipeline"
    assert props["experimentName"] == "chat_completion_Phi-4"
    assert props["displayName"] == "Phi-4-ultrachat-bs1-cosine-ds2-lora-save_limit-1-seqlen-1"
    assert props["settings"] == {"continue_on_step_failure": False, "force_rerun": True, "_source": "DSL"}
    assert props["tags"] == {
        "tunegridrunid": "r1",
        "tunegriddataset": "ultrachat.jsonl",
        "tunegrid-owner": "tunegrid",
        "tunegridbasemodelid": PHI4_ID,
    }
    assert props["outputs"] == {  # the description comes from the component's own mlflow_model_folder output
        "trained_model": {
            "mode": "ReadWriteMount",
            "jobOutputType": "mlflow_model",
            "description": "output folder containing _best_ finetuned model in mlflow format.",
        }
    }
    node = props["jobs"]["chat_completion_pipeline"]
    assert node["componentId"] == NOTEBOOK_COMPONENT_ID and node["type"] == "pipeline"
    assert node["outputs"] == {"mlflow_model_folder": {"value": "${{parent.outputs.trained_model}}", "type": "literal"}}
    assert node["inputs"]["mlflow_model_path"] == {"uri": PHI4_ID, "job_input_type": "mlflow_model"}
    assert node["inputs"]["train_file_path"] == {
        "uri": "azureml://datastores/prepareddata/paths/r1/train.jsonl",
        "job_input_type": "uri_file",
    }
    assert node["inputs"]["test_file_path"] == {
        "uri": "azureml://datastores/prepareddata/paths/r1/test.jsonl",
        "job_input_type": "uri_file",
    }
    assert _literals(node) == {
        # the notebook's compute inputs (serverless here); the GPU sizes are the first of Phi-4's
        # system_metadata.SKU.finetuneRecommendedSkus, as no setting names one
        "compute_model_import": "serverless",
        "compute_preprocess": "serverless",
        "compute_finetune": "serverless",
        "compute_model_evaluation": "serverless",
        "instance_type_model_import": "Standard_d12_v2",
        "instance_type_preprocess": "Standard_d12_v2",
        "instance_type_finetune": "Standard_NC24ads_A100_v4",
        "instance_type_model_evaluation": "Standard_NC24ads_A100_v4",
        "mlflow_model_path": PHI4_ID,
        "train_file_path": "azureml://datastores/prepareddata/paths/r1/train.jsonl",
        "test_file_path": "azureml://datastores/prepareddata/paths/r1/test.jsonl",
        # GPUs per node from list_sizes() for Standard_NC24ads_A100_v4
        "number_of_gpu_to_use_finetuning": "1",
        "num_nodes_finetune": "1",
        # the notebook's finetune_parameters
        "num_train_epochs": "3",
        "per_device_train_batch_size": "1",
        "per_device_eval_batch_size": "1",
        "learning_rate": "5e-06",
        "lr_scheduler_type": "cosine",
        "apply_lora": "true",
        "apply_deepspeed": "true",
        "deepspeed_stage": "2",
    }


def test_model_specific_defaults_and_sidecar_values_reach_the_job(azureml_rig: AzureMLRig) -> None:
    """model_specific_defaults override the notebook's defaults; the user's sidecar values override both."""
    rig = azureml_rig
    rig.serve_registry()  # Phi-4's tag: deepspeed_stage 3, precision 16, num_train_epochs 1, learning_rate 5e-6, ...
    rig.serve_vm_sizes()
    put = rig.accept_job_submission()
    rig.backend().submit_finetune(_request(params={"max_seq_length": 1024, "learning_rate": 1e-4}))
    inputs = _literals(put.calls[0].json["properties"]["jobs"]["chat_completion_pipeline"])
    assert inputs["precision"] == "16" and inputs["deepspeed_stage"] == "3" and inputs["logging_strategy"] == "steps"
    assert inputs["max_seq_length"] == "1024" and inputs["learning_rate"] == "0.0001"
    assert inputs["num_train_epochs"] == "1"  # the model's default beats the notebook's 3


def test_an_existing_job_is_returned_not_resubmitted(azureml_rig: AzureMLRig) -> None:
    """Check before act: a job with our name exists, so nothing else is read or sent."""
    rig = azureml_rig
    rig.serve_job("tunegrid-r1", status="Running")
    job = rig.backend().submit_finetune(_request())
    assert job.name == "tunegrid-r1" and job.base_model_id == PHI4_ID
    assert rig.summary() == ["GET {ws}/jobs/tunegrid-r1", "GET {ws}"]
    assert not rig.requests("PUT")


def test_a_concurrent_submission_409_reads_the_job_created_first(azureml_rig: AzureMLRig) -> None:
    """A 409 on the PUT (someone submitted it meanwhile) returns the existing job."""
    rig = azureml_rig
    rig.serve_registry()
    rig.serve_vm_sizes()
    job = load("job_pipeline.json", job_name="tunegrid-r1", status="NotStarted", run_id="r1")
    rig.on("GET", re.escape(f"{WS_PATH}/jobs/tunegrid-r1"), error_reply(404, "UserError", "not found"), Reply(200, job))
    rig.on(
        "PUT",
        re.escape(f"{WS_PATH}/jobs/tunegrid-r1"),
        error_reply(409, "Conflict", "A job with this name already exists"),
    )
    assert rig.backend().submit_finetune(_request()).name == "tunegrid-r1"
    assert len(rig.requests("PUT")) == 1


@pytest.mark.parametrize(
    ("cluster_state", "vm_size", "listed", "error"),
    [
        (None, "", True, "compute cluster 'gpu-cluster-big' does not exist"),
        ("Failed", "STANDARD_ND96ASR_V4", True, "failed provisioning state"),
        ("Succeeded", "Standard_NC6", False, r"Standard_NC6 \(cluster gpu-cluster-big\) has K80 GPUs"),
        (
            "Succeeded",
            "STANDARD_NC6S_V3",
            True,
            r"STANDARD_NC6S_V3 \(cluster gpu-cluster-big\) is in the NCv3 family, retired on 2025-09-30",
        ),
        ("Succeeded", "Standard_E4s_v3", True, r"Standard_E4s_v3 .*not on the fine-tune SKU list of Phi-4:8"),
        ("Succeeded", "Standard_E4s_v3", False, r"GPUs of VM size Standard_E4s_v3 .*not found"),
    ],
)
def test_compute_checks_refuse_before_submitting(
    azureml_rig: AzureMLRig, cluster_state: str | None, vm_size: str, listed: bool, error: str
) -> None:
    """Missing or failed clusters, K80 and retired sizes, and sizes off the model's list stop the submission."""
    rig = azureml_rig
    rig.serve_registry(model=_phi4(skus=listed))
    rig.serve_vm_sizes()
    rig.accept_job_submission()
    if cluster_state is None:
        rig.on(
            "GET",
            re.escape(f"{WS_PATH}/computes/gpu-cluster-big"),
            error_reply(404, "NotFound", "The compute gpu-cluster-big was not found"),
        )
    else:
        rig.serve_cluster("gpu-cluster-big", vm_size=vm_size, state=cluster_state)
    with pytest.raises(ComputeError, match=error):
        rig.backend(rig.settings(AZUREML_COMPUTE="gpu-cluster-big")).submit_finetune(_request())
    assert not rig.requests("PUT")


def test_a_cluster_in_the_allow_list_gets_all_four_steps_and_its_gpu_count(azureml_rig: AzureMLRig) -> None:
    """As in the notebook: the cluster name for the four compute inputs, GPUs from list_sizes(), no instance types."""
    rig = azureml_rig
    rig.serve_registry()
    rig.serve_vm_sizes()
    rig.serve_cluster("a100", vm_size="STANDARD_ND96ASR_V4")
    put = rig.accept_job_submission()
    rig.backend().submit_finetune(_request(compute={"cluster": "a100"}))
    inputs = _literals(put.calls[0].json["properties"]["jobs"]["chat_completion_pipeline"])
    assert {k: v for k, v in inputs.items() if k.startswith(("compute_", "instance_type_"))} == {
        "compute_model_import": "a100",
        "compute_preprocess": "a100",
        "compute_finetune": "a100",
        "compute_model_evaluation": "a100",
    }
    assert inputs["number_of_gpu_to_use_finetuning"] == "8"


def test_plan_training_reuses_the_checked_plan_for_the_cost_estimate(azureml_rig: AzureMLRig) -> None:
    """After check_finetune, plan_training answers from the same plan (only the workspace is read, for its
    region): the serverless size from Phi-4's list, the merged epochs and batch, Phi-4's first inference size."""
    rig = azureml_rig
    rig.serve_registry()
    rig.serve_vm_sizes()
    backend = rig.backend()
    request = _request(params={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4})
    assert not [f for f in backend.check_finetune(request) if f.is_error]
    reads = len(rig.summary())
    plan = backend.plan_training(request)
    assert rig.summary()[reads:] == ["GET {ws}"]
    assert (plan.sku, plan.region, plan.nodes, plan.gpus_per_node) == ("Standard_NC24ads_A100_v4", "eastus", 1, 1)
    assert plan.epochs == 1.0  # Phi-4's model_specific_defaults beat the notebook's 3
    assert (plan.rows_per_step, plan.max_steps, plan.priced) == (8, -1, True)
    assert plan.inference_sku == "Standard_NC24ads_A100_v4"


def test_plan_training_of_a_cluster_is_its_size(azureml_rig: AzureMLRig) -> None:
    """On a cluster, the estimate prices the cluster's VM size with its GPU count."""
    rig = azureml_rig
    rig.serve_registry()
    rig.serve_vm_sizes()
    rig.serve_cluster("a100", vm_size="STANDARD_ND96ASR_V4")
    plan = rig.backend().plan_training(_request(compute={"cluster": "a100"}))
    assert (plan.sku, plan.gpus_per_node, plan.rows_per_step) == ("STANDARD_ND96ASR_V4", 8, 8)


def test_more_gpus_than_the_size_has_is_refused(azureml_rig: AzureMLRig) -> None:
    """An explicit gpus_per_node above what list_sizes() reports for the serverless size is a ComputeError."""
    rig = azureml_rig
    rig.serve_registry()
    rig.serve_vm_sizes()
    rig.accept_job_submission()
    with pytest.raises(ComputeError, match="more than the 1 GPUs of Standard_NC24ads_A100_v4"):
        rig.backend(rig.settings(AZUREML_GPUS_PER_NODE="8")).submit_finetune(_request())


def test_malformed_model_tags_are_a_config_error(azureml_rig: AzureMLRig) -> None:
    """A registry model whose tags cannot be parsed stops the submission with a clear ConfigError."""
    rig = azureml_rig
    model = _phi4()
    model["properties"]["tags"]["model_specific_defaults"] = "{'apply_lora': 'true'"
    rig.serve_registry(model=model)
    rig.serve_vm_sizes()
    rig.accept_job_submission()
    with pytest.raises(ConfigError, match=r"Phi-4:8: tag 'model_specific_defaults'"):
        rig.backend().submit_finetune(_request())
    assert not rig.requests("PUT")


@pytest.mark.parametrize(
    ("route", "match"),
    [
        (
            re.escape(REGISTRY_PATH) + "/models/Phi-4/versions",
            r"base model Phi-4 \(label latest\) in registry azureml: not found",
        ),
        (
            re.escape(REGISTRY_PATH) + "/components/chat_completion_pipeline/versions",
            r"pipeline component chat_completion_pipeline \(label latest\) in registry azureml: not found",
        ),
    ],
)
def test_a_missing_model_or_component_is_not_found_with_its_name(
    azureml_rig: AzureMLRig, route: str, match: str
) -> None:
    """404 for the registry model or component is NotFound naming it."""
    rig = azureml_rig
    rig.serve_registry()
    rig.serve_vm_sizes()
    rig.accept_job_submission()
    rig.on("GET", route, error_reply(404, "NotFound", "Could not find asset"))
    with pytest.raises(NotFound, match=match):
        rig.backend().submit_finetune(_request())


def test_a_pinned_model_version_is_read_directly(azureml_rig: AzureMLRig) -> None:
    """A pinned base model version skips the label lookup; 404 on it is NotFound with the version."""
    rig = azureml_rig
    rig.serve_registry()
    rig.accept_job_submission()
    rig.on(
        "GET",
        re.escape(REGISTRY_PATH) + "/models/Phi-4/versions/99",
        error_reply(404, "NotFound", "no such version"),
    )
    with pytest.raises(NotFound, match=r"base model Phi-4 \(version 99\)"):
        rig.backend().submit_finetune(_request(base_model_version="99"))
    assert not rig.requests("GET", r"/models/Phi-4/versions$")


@pytest.mark.parametrize(
    ("status", "route_registry", "role", "scope"),
    [
        (403, False, "AzureML Data Scientist", f"workspace {WS_PATH}"),
        (401, False, "AzureML Data Scientist", f"workspace {WS_PATH}"),
        (403, True, "AzureML Registry User", "registry azureml"),
    ],
)
def test_permission_errors_name_the_missing_role_and_scope(
    azureml_rig: AzureMLRig, status: int, route_registry: bool, role: str, scope: str
) -> None:
    """401/403 become PermissionDenied saying which role the identity lacks on which scope."""
    rig = azureml_rig
    rig.serve_registry()
    code = "AuthorizationFailed" if status == 403 else "InvalidAuthenticationToken"
    denied = error_reply(status, code, "The client 'tunegrid' does not have authorization to perform this action")
    if route_registry:
        rig.accept_job_submission()
        rig.on("GET", re.escape(REGISTRY_PATH) + "/models/.*", denied)
    else:
        rig.on("GET", re.escape(f"{WS_PATH}/jobs/tunegrid-r1"), denied)
    with pytest.raises(PermissionDenied) as info:
        rig.backend().submit_finetune(_request())
    message = str(info.value)
    assert f"lacks the role '{role}' on the {scope}" in message and f"HTTP {status}" in message and code in message


@pytest.fixture
def retry_waits() -> Any:
    """The waits stamina decided on, recorded through its instrumentation hook."""
    waits: list[float] = []
    previous = stamina.instrumentation.get_on_retry_hooks()
    stamina.instrumentation.set_on_retry_hooks([lambda details: waits.append(details.wait_for)])
    yield waits
    stamina.instrumentation.set_on_retry_hooks(previous)


def test_429_and_503_with_retry_after_are_retried_then_succeed(
    azureml_rig: AzureMLRig, retry_waits: list[float]
) -> None:
    """Throttling is retried with the server's Retry-After as the wait, then the call succeeds."""
    rig = azureml_rig
    job = load("job_pipeline.json", job_name="tunegrid-r1", status="Running", run_id="r1")
    rig.on(
        "GET",
        re.escape(f"{WS_PATH}/jobs/tunegrid-r1"),
        error_reply(429, "TooManyRequests", "throttled", headers={"retry-after-ms": "20"}),
        error_reply(503, "ServiceUnavailable", "busy", headers={"Retry-After": "0"}),
        Reply(200, job),
    )
    status = rig.backend().get_job("tunegrid-r1")
    assert status is not None and status.state == JobState.RUNNING
    assert len(rig.requests("GET", r"/jobs/tunegrid-r1$")) == 3
    assert retry_waits == [0.02, 0.0]


def test_retries_are_bounded_then_transient(azureml_rig: AzureMLRig) -> None:
    """A service that stays unavailable ends in TransientError after the configured attempts."""
    rig = azureml_rig
    rig.on(
        "GET",
        re.escape(f"{WS_PATH}/jobs/tunegrid-r1"),
        error_reply(503, "ServiceUnavailable", "busy", headers={"retry-after-ms": "1"}),
    )
    with pytest.raises(TransientError, match=r"HTTP 503.*gave up after 3 attempts"):
        rig.backend(attempts=3).get_job("tunegrid-r1")
    assert len(rig.requests("GET", r"/jobs/tunegrid-r1$")) == 3


def test_a_retry_after_longer_than_the_cap_is_not_slept(azureml_rig: AzureMLRig) -> None:
    """Retry-After beyond the cap fails at once (the event or timer retries later) instead of blocking."""
    rig = azureml_rig
    rig.on(
        "GET",
        re.escape(f"{WS_PATH}/jobs/tunegrid-r1"),
        error_reply(429, "TooManyRequests", "throttled", headers={"Retry-After": "600"}),
    )
    with pytest.raises(TransientError, match="HTTP 429"):
        rig.backend(max_wait_s=30.0).get_job("tunegrid-r1")
    assert len(rig.requests("GET", r"/jobs/tunegrid-r1$")) == 1


def test_a_failed_job_reports_the_failed_steps_error(azureml_rig: AzureMLRig) -> None:
    """The reason is the error of the deepest failed step (the pipeline node's failed child)."""
    rig = azureml_rig
    root = "tunegrid-r1"
    rig.serve_job(root, status="Failed")
    rig.serve_failed_pipeline_steps(root)

    status = rig.backend().get_job(root)

    assert status is not None and status.state == JobState.FAILED and status.raw_status == "Failed"
    assert status.error == (
        "step chat_completion_finetune failed: UserError: torch.OutOfMemoryError: CUDA out of memory. "
        "Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.77 GiB of which 1.02 GiB is free."
    )
    assert status.tags["tunegridrunid"] == "run-1"


def test_a_missing_job_reads_as_none(azureml_rig: AzureMLRig) -> None:
    """get_job on an unknown name is None (the rollout then logs and waits)."""
    rig = azureml_rig
    rig.on("GET", re.escape(f"{WS_PATH}/jobs/nope"), error_reply(404, "UserError", "not found"))
    assert rig.backend().get_job("nope") is None


def test_cancel_starts_the_cancellation_without_waiting(azureml_rig: AzureMLRig) -> None:
    """A running job gets POST .../cancel (an LRO, accepted); a finished one is left alone."""
    rig = azureml_rig
    rig.serve_job("tunegrid-r1", status="Running")
    rig.serve_job("tunegrid-r2", status="Completed")
    rig.lro("POST", re.escape(f"{WS_PATH}/jobs/tunegrid-r1/cancel"), initial_status=202, header="Location")
    backend = rig.backend()
    op = backend.cancel_job("tunegrid-r1")
    assert (op.kind, op.target, op.done) == ("cancel-job", "tunegrid-r1", False)
    done = backend.cancel_job("tunegrid-r2")
    assert done.done and done.status == "Completed"
    assert [c.path for c in rig.requests("POST")] == [f"{WS_PATH}/jobs/tunegrid-r1/cancel"]


def test_metrics_come_from_the_jobs_mlflow_run(azureml_rig: AzureMLRig) -> None:
    """runs/get lists the metric keys, get-history gives each series, with an ARM token."""
    rig = azureml_rig
    rig.on(
        "GET",
        re.escape(f"{MLFLOW_PATH}/runs/get"),
        Reply(200, load("mlflow_run.json", run_id="tunegrid-r1")),
        host=API_HOST.removeprefix("https://"),
    )

    def history(call: Any) -> Reply:
        key = call.query["metric_key"]
        points = {
            "loss": [(10, 1.61), (20, 1.22), (30, 0.98)],
            "eval_loss": [(30, 1.04)],
            "learning_rate": [(10, 5e-6), (30, 0.0)],
        }[key]
        return Reply(
            200,
            {
                "metrics": [
                    {"key": key, "value": v, "timestamp": 1717230000000 + s, "step": s} for s, v in reversed(points)
                ]
            },
        )

    rig.on("GET", re.escape(f"{MLFLOW_PATH}/metrics/get-history"), history, host=API_HOST.removeprefix("https://"))
    metrics = rig.backend().get_job_metrics("tunegrid-r1")
    assert sorted(metrics) == ["eval_loss", "learning_rate", "loss"]
    assert [(p.step, p.value) for p in metrics["loss"]] == [(10, 1.61), (20, 1.22), (30, 0.98)]
    history_call = rig.requests("GET", "get-history")[0]
    assert history_call.query["run_id"] == "tunegrid-r1"
    assert history_call.headers["Authorization"].startswith("Bearer ")
    assert ("https://management.azure.com/.default",) in rig.credential.scopes


def test_unreadable_metrics_are_empty_not_an_error(azureml_rig: AzureMLRig, caplog: pytest.LogCaptureFixture) -> None:
    """Metrics are for the report: a run MLflow does not know gives {} and a log line saying why."""
    rig = azureml_rig
    rig.on(
        "GET",
        re.escape(f"{MLFLOW_PATH}/runs/get"),
        error_reply(404, "RESOURCE_DOES_NOT_EXIST", "Run 'x' not found"),
        host=API_HOST.removeprefix("https://"),
    )
    assert rig.backend().get_job_metrics("x") == {}
    assert "metrics of job x unavailable" in caplog.text


def test_conflict_maps_to_conflict_error(azureml_rig: AzureMLRig) -> None:
    """Any other 409 becomes ConflictError (here: cancelling a job the service says cannot be)."""
    rig = azureml_rig
    rig.serve_job("tunegrid-r1", status="Running")
    rig.on(
        "POST",
        re.escape(f"{WS_PATH}/jobs/tunegrid-r1/cancel"),
        error_reply(409, "Conflict", "The job is already being canceled"),
    )
    with pytest.raises(ConflictError, match="already being canceled"):
        rig.backend().cancel_job("tunegrid-r1")


def test_no_token_for_the_identity_is_permission_denied_with_what_to_do(azureml_rig: AzureMLRig) -> None:
    """A credential that cannot produce a token fails with a message saying how to sign in."""
    from azure.identity import CredentialUnavailableError

    rig = azureml_rig

    class NoToken(type(rig.credential)):  # type: ignore[misc]
        def get_token(self, *scopes: str, **kwargs: Any) -> Any:
            raise CredentialUnavailableError(
                "ManagedIdentityCredential authentication unavailable, no response from the IMDS endpoint."
            )

        get_token_info = get_token

    rig.credential = NoToken()
    with pytest.raises(PermissionDenied, match=r"could not get a token .*IMDS endpoint\. Locally run `az login`"):
        rig.backend().get_job("tunegrid-r1")
    assert not rig.calls
