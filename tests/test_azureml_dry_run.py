"""`tunegrid submit PATH --backend azureml --dry-run`: the YAML for `az ml job create --file`, checked
field by field against the seed notebook's parameters (azure-facts.md), and against the real
submission's PUT body (both come from `build_job_spec`). No socket is opened."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.domain.resources import DataRef, FineTuneRequest
from shared.domain.sidecar import parse_sidecar
from shared.settings import Settings
from tests import azure_reference as ref
from tests import azureml_rig as rig_module
from tests.azureml_rig import AzureMLRig
from tunegrid.cli import main
from tunegrid.commands.submit import blob_base_url, dry_run_spec, to_yaml

azureml_rig = rig_module.azureml_rig  # fixtures: the rig (no socket may open) and the socket guard alone
no_sockets = rig_module.no_sockets

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
SAMPLE = SAMPLES / "ultrachat_small.jsonl"

NOTEBOOK_FINETUNE_PARAMETERS = {
    # azure-facts.md, "Fine-tune parameters in the sample"
    "num_train_epochs": 3,
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "learning_rate": 5e-6,
    "lr_scheduler_type": "cosine",
    "apply_lora": "true",
    "apply_deepspeed": "true",
    "deepspeed_stage": "2",
}


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """The notebook's dataset (a few ultrachat rows), named as in the notebook's display name."""
    path = tmp_path / "ultrachat.jsonl"
    shutil.copyfile(SAMPLE, path)
    return path


@pytest.fixture
def azure_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "FINETUNE_BACKEND",
        "AZUREML_DATASTORE",
        "AZUREML_GPUS_PER_NODE",
        "AZUREML_COMPUTE",
        "DataStorage",
        "AzureWebJobsStorage",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(
        "DataStorage",
        "DefaultEndpointsProtocol=https;AccountName=sttunegrid;AccountKey=a2V5;EndpointSuffix=core.windows.net",
    )


def _dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["submit", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_yaml_matches_the_notebook_field_by_field(
    dataset: Path, azure_env: None, capsys: pytest.CaptureFixture[str], no_sockets: list[Any]
) -> None:
    """Every notebook parameter is in the job the dry run prints, with registry ids and settings."""
    code, out, err = _dry_run(capsys, str(dataset), "--backend", "azureml", "--dry-run")
    assert code == 0, err
    assert out.startswith("# Tunegrid dry run")
    assert "GPUs per node are unknown without a network call, so 1 is shown" in out
    assert "# instance_type_finetune, instance_type_model_evaluation: not set, so the submission takes the base" in out
    job = yaml.safe_load(out)
    assert job["$schema"] == "https://azuremlschemas.azureedge.net/latest/pipelineJob.schema.json"
    assert job["type"] == "pipeline"
    assert job["experiment_name"] == "chat_completion_Phi-4"
    assert job["settings"] == {"force_rerun": True, "continue_on_step_failure": False}
    assert job["display_name"] == "Phi-4-ultrachat-bs1-cosine-ds2-lora-save_limit-1-seqlen-1"
    assert re.fullmatch(r"tunegrid-r[0-9a-f]{15}", job["name"])
    assert job["outputs"] == {"trained_model": {"type": "mlflow_model", "mode": "rw_mount"}}
    run_id = job["name"].removeprefix("tunegrid-")
    assert job["tags"] == {
        "tunegridrunid": run_id,
        "tunegriddataset": "ultrachat.jsonl",
        "tunegrid-owner": "tunegrid",
        "tunegridbasemodelid": "azureml://registries/azureml/models/Phi-4/labels/latest",
    }
    [(node_name, node)] = job["jobs"].items()
    assert node_name == "chat_completion_pipeline" and node["type"] == "pipeline"
    assert node["component"] == "azureml://registries/azureml/components/chat_completion_pipeline/labels/latest"
    assert node["outputs"] == {"mlflow_model_folder": "${{parent.outputs.trained_model}}"}
    inputs = node["inputs"]
    assert inputs.pop("mlflow_model_path") == {
        "type": "mlflow_model",
        "path": "azureml://registries/azureml/models/Phi-4/labels/latest",
    }
    base = f"https://sttunegrid.blob.core.windows.net/prepared-data/{run_id}"
    assert inputs.pop("train_file_path") == {"type": "uri_file", "path": f"{base}/train.jsonl"}
    assert inputs.pop("test_file_path") == {"type": "uri_file", "path": f"{base}/test.jsonl"}
    assert inputs == {
        "compute_model_import": "serverless",
        "compute_preprocess": "serverless",
        "compute_finetune": "serverless",
        "compute_model_evaluation": "serverless",
        "instance_type_model_import": "Standard_d12_v2",
        "instance_type_preprocess": "Standard_d12_v2",
        # no GPU sizes: the submission reads them from the model's list (a note above says so)
        "number_of_gpu_to_use_finetuning": 1,
        "num_nodes_finetune": 1,
        **NOTEBOOK_FINETUNE_PARAMETERS,
    }


def test_dry_run_follows_settings_and_the_sidecar(
    dataset: Path, azure_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cluster, pinned versions, a datastore, the GPU count and the sidecar's values all show up."""
    monkeypatch.setenv("AZUREML_COMPUTE", "gpu-cluster-big")
    monkeypatch.setenv("AZUREML_GPUS_PER_NODE", "8")
    monkeypatch.setenv("AZUREML_DATASTORE", "prepareddata")
    monkeypatch.setenv("AZUREML_PIPELINE_COMPONENT_VERSION", "0.0.82")
    (dataset.parent / "ultrachat.config.json").write_text(
        json.dumps({"model_version": "8", "finetune": {"learning_rate": 2e-5, "apply_lora": False}})
    )
    code, out, err = _dry_run(capsys, str(dataset), "--backend", "azureml", "--dry-run")
    assert code == 0, err
    job = yaml.safe_load(out)
    node = job["jobs"]["chat_completion_pipeline"]
    assert node["component"] == "azureml://registries/azureml/components/chat_completion_pipeline/versions/0.0.82"
    inputs = node["inputs"]
    assert inputs["mlflow_model_path"]["path"] == "azureml://registries/azureml/models/Phi-4/versions/8"
    assert inputs["compute_finetune"] == "gpu-cluster-big" and "instance_type_finetune" not in inputs
    assert inputs["number_of_gpu_to_use_finetuning"] == 8 and "from AZUREML_GPUS_PER_NODE" in out
    assert inputs["train_file_path"]["path"].startswith("azureml://datastores/prepareddata/paths/r")
    assert (inputs["learning_rate"], inputs["apply_lora"], inputs["num_train_epochs"]) == (2e-5, "false", 3)
    assert job["display_name"] == "Phi-4-ultrachat-bs8-cosine-ds2-nolora-save_limit-1-seqlen-1"


def test_an_invalid_dataset_exits_1_with_the_summary(
    tmp_path: Path, azure_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file is validated locally first; an invalid one prints the report summary and exits 1."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    code, out, err = _dry_run(capsys, str(path), "--backend", "azureml", "--dry-run")
    assert code == 1 and out == ""
    assert f"invalid dataset {path}" in err and "invalid_json" in err and "line 2" in err


@pytest.mark.parametrize(
    ("args", "sidecar", "message"),
    [
        (["--backend", "azureml"], None, "only runs as --dry-run"),
        (["--backend", "azureml", "--dry-run", "--config", "missing.json"], None, "does not exist"),
        (["--backend", "azureml", "--dry-run"], '{"finetune": {"learning_rate": "fast"}}', "finetune.learning_rate"),
    ],
)
def test_usage_and_sidecar_errors_exit_2(
    dataset: Path,
    azure_env: None,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    sidecar: str | None,
    message: str,
) -> None:
    """No --dry-run, a missing --config or a bad sidecar is a usage/input error (exit 2)."""
    if sidecar is not None:
        (dataset.parent / "ultrachat.config.json").write_text(sidecar)
    code, out, err = _dry_run(capsys, str(dataset), *args)
    assert code == 2 and out == "" and message in err


@pytest.mark.parametrize(
    ("connection", "expected"),
    [
        (
            {"": "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=eA==;EndpointSuffix=core.windows.net"},
            "https://acct.blob.core.windows.net",
        ),
        ({"": "UseDevelopmentStorage=true"}, "http://127.0.0.1:10000/devstoreaccount1"),
        (
            {"blobServiceUri": "https://acct.blob.core.windows.net/", "credential": "managedidentity"},
            "https://acct.blob.core.windows.net",
        ),
        ({}, "https://<storage-account>.blob.core.windows.net"),
    ],
)
def test_blob_urls_come_from_the_data_connection(connection: dict[str, str], expected: str) -> None:
    """The prepared blobs' URLs are derived from the DataStorage connection without a network call."""
    assert blob_base_url(connection) == expected


def _sdk_rest_body(job_yaml: str, tmp_path: Path) -> dict[str, Any]:
    """What `az ml job create --file` would send: azure-ai-ml loads the YAML into a PipelineJob."""
    from azure.ai.ml import load_job

    path = tmp_path / "job.yml"
    path.write_text(job_yaml)
    return load_job(source=path)._to_rest_object().as_dict()


def test_the_dry_run_yaml_is_what_the_real_submission_puts(
    azureml_rig: AzureMLRig, dataset: Path, tmp_path: Path
) -> None:
    """azure-ai-ml loads the dry-run YAML (as the CLI does) into the same REST job the adapter PUTs,
    once the registry labels are pinned to the versions they resolve to; the submission adds the two
    GPU sizes, the first of Phi-4's list (the spec it is served from), which the dry run leaves out."""
    rig = azureml_rig
    settings = rig.settings(AZUREML_GPUS_PER_NODE="1", DataStorage="AccountName=sttunegrid;AccountKey=a2V5")
    sidecar = parse_sidecar(None)
    spec = dry_run_spec(dataset, sidecar, settings)
    from_yaml = _sdk_rest_body(to_yaml(spec), tmp_path)["properties"]

    model = ref.model_version_doc(ref.PHI4)
    del model["properties"]["tags"]["model_specific_defaults"]
    rig.serve_registry(model=model)
    rig.serve_vm_sizes()
    put = rig.accept_job_submission()
    rig.backend(settings).submit_finetune(
        FineTuneRequest(
            run_id=spec.tags["tunegridrunid"],
            job_name=spec.name,
            dataset=dataset.name,
            train=DataRef("prepared-data", "", spec.data_inputs["train_file_path"].path),
            test=DataRef("prepared-data", "", spec.data_inputs["test_file_path"].path),
        )
    )
    sent = put.calls[0].json["properties"]

    pinned = {
        "azureml://registries/azureml/models/Phi-4/labels/latest": "azureml://registries/azureml/models/Phi-4/versions/8",
        "azureml://registries/azureml/components/chat_completion_pipeline/labels/latest": "azureml://registries/azureml/components/chat_completion_pipeline/versions/0.0.82",
    }
    text = json.dumps(from_yaml)
    for label_id, version_id in pinned.items():
        text = text.replace(label_id, version_id)
    from_yaml = json.loads(text)
    yaml_node, sent_node = from_yaml["jobs"]["chat_completion_pipeline"], sent["jobs"]["chat_completion_pipeline"]
    chosen = {
        k: sent_node["inputs"].pop(k)["value"] for k in ("instance_type_finetune", "instance_type_model_evaluation")
    }
    assert chosen == dict.fromkeys(chosen, "Standard_NC24ads_A100_v4")
    assert yaml_node["inputs"] == sent_node["inputs"]
    assert (yaml_node["componentId"], yaml_node["outputs"], yaml_node["type"]) == (
        sent_node["componentId"],
        sent_node["outputs"],
        sent_node["type"],
    )
    # the SDK copies the component output's description onto the submitted job's output
    assert sent["outputs"]["trained_model"].pop("description").startswith("output folder containing _best_")
    for key in ("displayName", "experimentName", "tags", "outputs", "jobType"):
        assert from_yaml[key] == sent[key], key
    assert {k: v for k, v in from_yaml["settings"].items() if k != "_source"} == {
        k: v for k, v in sent["settings"].items() if k != "_source"
    }


def test_the_dry_run_needs_no_azure_settings(azure_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dry run needs no Azure settings at all (it sends nothing)."""
    monkeypatch.delenv("AZURE_SUBSCRIPTION_ID", raising=False)
    settings = Settings.from_env()
    spec = dry_run_spec(SAMPLE, parse_sidecar(None), settings)
    assert spec.component.endswith("/labels/latest") and spec.name.startswith("tunegrid-r")
