"""The Azure ML job's parameters as plain data: model tags, precedence, display name, compute inputs."""

from __future__ import annotations

from typing import Any

import pytest

from shared.adapters.azureml.job_spec import (
    INSTANCE_TYPE_INPUTS,
    ComputePlan,
    UriFile,
    build_job_spec,
    compute_plan,
    display_name_for,
    registry_asset_id,
)
from shared.adapters.azureml.model_tags import parse_allow_list, parse_model_defaults
from shared.domain.resources import DataRef, FineTuneRequest
from shared.domain.sidecar import NOTEBOOK_DEFAULTS
from shared.errors import ConfigError, InvalidInput
from shared.settings import Settings


def _settings(**env: str) -> Settings:
    return Settings.from_env(
        {
            "FINETUNE_BACKEND": "azureml",
            "AZURE_SUBSCRIPTION_ID": "s",
            "AZURE_RESOURCE_GROUP": "g",
            "AZUREML_WORKSPACE_NAME": "w",
            **env,
        }
    )


def _request(**kwargs: Any) -> FineTuneRequest:
    base: dict[str, Any] = {
        "run_id": "r1",
        "job_name": "tunegrid-r1",
        "dataset": "ultrachat.jsonl",
        "train": DataRef(
            "prepared-data", "r1/train.jsonl", "https://acct.blob.core.windows.net/prepared-data/r1/train.jsonl"
        ),
        "test": DataRef(
            "prepared-data", "r1/test.jsonl", "https://acct.blob.core.windows.net/prepared-data/r1/test.jsonl"
        ),
    }
    return FineTuneRequest(**{**base, **kwargs})


def _plan(target: str = "serverless", gpus: int | None = 4, nodes: int = 1) -> ComputePlan:
    return compute_plan(
        _settings(AZUREML_COMPUTE=target),
        {"gpus_per_node": gpus, "num_nodes_finetune": nodes} if gpus else {"num_nodes_finetune": nodes},
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("['Standard_NC24ads_A100_v4', 'Standard_ND96asr_v4']", ("Standard_NC24ads_A100_v4", "Standard_ND96asr_v4")),
        ('["Standard_NC24ads_A100_v4"]', ("Standard_NC24ads_A100_v4",)),
        ("'Standard_NC24ads_A100_v4'", ("Standard_NC24ads_A100_v4",)),
        (["Standard_NC24ads_A100_v4", " Standard_ND96asr_v4 "], ("Standard_NC24ads_A100_v4", "Standard_ND96asr_v4")),
        (None, None),
    ],
)
def test_allow_list_tags_parse(raw: Any, expected: tuple[str, ...] | None) -> None:
    """Allow lists are Python or JSON list literals (a spec file's YAML list as it is); a missing tag means no list."""
    assert parse_allow_list("m", "finetune_compute_allow_list", raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["['Standard_NC24rs_v3'", "__import__('os').system('true')", "{'a': 1}", "[1, 2]", "['']", "x" * 70_000],
)
def test_malformed_allow_list_is_a_config_error(raw: str) -> None:
    """A tag that is not a list of sizes gives ConfigError naming the model and the tag; nothing is evaluated."""
    with pytest.raises(ConfigError, match=r"model Phi-3:15.*finetune_compute_allow_list"):
        parse_allow_list("Phi-3:15", "finetune_compute_allow_list", raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "{'apply_lora': 'true', 'deepspeed_stage': 2, 'precision': 16}",
            {"apply_lora": "true", "deepspeed_stage": "2", "precision": "16"},
        ),
        (
            "ordereddict({'num_train_epochs': '1', 'learning_rate': '2e-5'})",
            {"num_train_epochs": 1, "learning_rate": 2e-5},
        ),
        (
            "OrderedDict([('apply_deepspeed', 'true'), ('max_seq_length', 2048)])",
            {"apply_deepspeed": "true", "max_seq_length": 2048},
        ),
        ('{"apply_lora": "true", "some_new_input": "x"}', {"apply_lora": "true", "some_new_input": "x"}),
        (  # a spec file's YAML mapping (model-Phi-4.spec.yaml's form), PyYAML reading 5e-6 as text
            {"deepspeed_stage": 3, "precision": 16, "learning_rate": "5e-6", "logging_strategy": "steps"},
            {"deepspeed_stage": "3", "precision": "16", "learning_rate": 5e-6, "logging_strategy": "steps"},
        ),
    ],
)
def test_model_specific_defaults_parse(raw: Any, expected: dict[str, Any]) -> None:
    """Defaults in the registry's literal forms become component input values of the sidecar's kinds."""
    assert parse_model_defaults("m", raw) == expected


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("{'apply_lora': 'maybe'}", "apply_lora"),
        ("{'num_train_epochs': 'many'}", "num_train_epochs"),
        ("['apply_lora']", "must be a dict"),
        ("{'apply_lora': 'true',", "not a Python or JSON literal"),
        ("{'x': [1, 2]}", "must be a string or a number"),
    ],
)
def test_malformed_model_defaults_are_config_errors(raw: str, match: str) -> None:
    """A `model_specific_defaults` tag that cannot be used gives a clear ConfigError."""
    with pytest.raises(ConfigError, match=match):
        parse_model_defaults("m", raw)


def test_precedence_app_defaults_then_model_defaults_then_sidecar() -> None:
    """Notebook defaults < model_specific_defaults < the user's sidecar values."""
    spec = build_job_spec(
        _settings(),
        _request(params={"learning_rate": 1e-4}),
        model_name="Phi-3-mini-4k-instruct",
        model_path="azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/15",
        component="azureml://registries/azureml/components/chat_completion_pipeline/versions/0.0.82",
        compute=_plan(),
        model_defaults={"learning_rate": 2e-5, "num_train_epochs": 1, "precision": "16"},
    )
    assert spec.training_inputs["learning_rate"] == 1e-4  # sidecar beats the model's default
    assert spec.training_inputs["num_train_epochs"] == 1  # the model's default beats the notebook's 3
    assert spec.training_inputs["precision"] == "16"
    assert spec.training_inputs["lr_scheduler_type"] == NOTEBOOK_DEFAULTS["lr_scheduler_type"]


@pytest.mark.parametrize(
    ("params", "gpus", "nodes", "expected"),
    [
        (NOTEBOOK_DEFAULTS, 8, 1, "Phi-3-mini-4k-instruct-ultrachat-bs8-cosine-ds2-lora-save_limit-1-seqlen-1"),
        (
            {**NOTEBOOK_DEFAULTS, "gradient_accumulation_steps": 2, "apply_deepspeed": "false"},
            4,
            2,
            "Phi-3-mini-4k-instruct-ultrachat-bs16-cosine-nods-lora-save_limit-1-seqlen-1",
        ),
        (
            {"apply_lora": "false", "save_total_limit": 2, "max_seq_length": 1024},
            1,
            1,
            "Phi-3-mini-4k-instruct-ultrachat-bs1-linear-nods-nolora-save_limit2-seqlen1024",
        ),
    ],
)
def test_display_name_has_the_notebooks_format(params: dict[str, Any], gpus: int, nodes: int, expected: str) -> None:
    """The notebook's display name; for its dataset (ultrachat) it is the same string."""
    assert (
        display_name_for("Phi-3-mini-4k-instruct", "ultrachat.jsonl", params, gpus_per_node=gpus, num_nodes=nodes)
        == expected
    )


def test_serverless_passes_instance_types_and_a_cluster_does_not() -> None:
    """`serverless` sends the four instance_type_* inputs; a cluster name goes to all four compute inputs only."""
    common = {
        "model_name": "m",
        "model_path": "azureml://registries/azureml/models/m/versions/1",
        "component": "azureml://registries/azureml/components/c/versions/1",
    }
    pinned = _settings(
        AZUREML_INSTANCE_TYPE_FINETUNE="Standard_NC24ads_A100_v4",
        AZUREML_INSTANCE_TYPE_MODEL_EVALUATION="Standard_NC48ads_A100_v4",
    )
    serverless = build_job_spec(pinned, _request(), compute=compute_plan(pinned, {"gpus_per_node": 1}), **common)
    cluster = build_job_spec(_settings(), _request(), compute=_plan("gpu-cluster-big"), **common)
    assert {k: serverless.compute_inputs[k] for k in INSTANCE_TYPE_INPUTS} == {
        "instance_type_model_import": "Standard_d12_v2",
        "instance_type_preprocess": "Standard_d12_v2",
        "instance_type_finetune": "Standard_NC24ads_A100_v4",
        "instance_type_model_evaluation": "Standard_NC48ads_A100_v4",
    }
    assert cluster.compute_inputs == dict.fromkeys(
        ("compute_model_import", "compute_preprocess", "compute_finetune", "compute_model_evaluation"),
        "gpu-cluster-big",
    )


def test_unset_gpu_sizes_are_left_to_the_models_list_with_a_note() -> None:
    """With the shipped defaults the fine-tune and evaluation sizes are not in the spec (the submission
    takes them from the model's list); the note says so, and what the component would use instead."""
    plan = _plan()
    assert plan.instance_types["instance_type_finetune"] == "" and plan.sources["instance_type_finetune"] == (
        "the base model's fine-tune SKU list"
    )
    spec = build_job_spec(_settings(), _request(), model_name="m", model_path="p", component="c", compute=plan)
    assert "instance_type_finetune" not in spec.compute_inputs
    assert "instance_type_model_evaluation" not in spec.compute_inputs
    assert spec.compute_inputs["instance_type_preprocess"] == "Standard_d12_v2"
    [note] = [n for n in spec.notes if n.startswith("instance_type_finetune, instance_type_model_evaluation")]
    assert "first fine-tune SKU that is not retired" in note and "Standard_nc24rs_v3 (NCv3, retired 2025-09-30)" in note


@pytest.mark.parametrize(
    ("setting", "expected"),
    [(None, "chat_completion_Phi-4"), ("tunegrid-{model}-runs", "tunegrid-Phi-4-runs"), ("fixed", "fixed")],
)
def test_the_experiment_name_fills_in_the_model(setting: str | None, expected: str) -> None:
    """AZUREML_EXPERIMENT_NAME's `{model}` (the default `chat_completion_{model}`) is the base model's name."""
    settings = _settings(**({"AZUREML_EXPERIMENT_NAME": setting} if setting is not None else {}))
    spec = build_job_spec(settings, _request(), model_name="Phi-4", model_path="p", component="c", compute=_plan())
    assert spec.experiment_name == expected


def test_sidecar_compute_overrides_settings() -> None:
    """The sidecar's compute section wins over the settings, key by key."""
    plan = compute_plan(
        _settings(AZUREML_GPUS_PER_NODE="2"),
        {
            "cluster": "a100",
            "instance_type_finetune": "Standard_NC24ads_A100_v4",
            "num_nodes_finetune": 2,
            "gpus_per_node": 1,
        },
    )
    assert (plan.target, plan.instance_types["instance_type_finetune"], plan.num_nodes, plan.gpus_per_node) == (
        "a100",
        "Standard_NC24ads_A100_v4",
        2,
        1,
    )
    assert compute_plan(_settings(AZUREML_GPUS_PER_NODE="2"), {}).gpus_per_node == 2


@pytest.mark.parametrize(
    ("datastore", "expected"),
    [
        ("", "https://acct.blob.core.windows.net/prepared-data/r1/train.jsonl"),
        ("prepareddata", "azureml://datastores/prepareddata/paths/r1/train.jsonl"),
    ],
)
def test_data_inputs_use_the_datastore_when_set(datastore: str, expected: str) -> None:
    """Prepared blobs are passed as uri_file inputs: datastore URIs when configured, else https URLs."""
    validation = DataRef(
        "prepared-data", "r1/validation.jsonl", "https://acct.blob.core.windows.net/prepared-data/r1/validation.jsonl"
    )
    spec = build_job_spec(
        _settings(AZUREML_DATASTORE=datastore),
        _request(validation=validation),
        model_name="m",
        model_path="azureml://registries/azureml/models/m/versions/1",
        component="azureml://registries/azureml/components/c/versions/1",
        compute=_plan(),
    )
    assert spec.data_inputs["train_file_path"] == UriFile(expected)
    assert set(spec.data_inputs) == {"train_file_path", "test_file_path", "validation_file_path"}


def test_job_tags_are_dot_free_and_carry_run_and_dataset() -> None:
    """Our tags are on the job; a dotted key is refused (Event Grid filters cannot use it)."""
    common = {
        "model_name": "m",
        "model_path": "azureml://registries/azureml/models/m/versions/1",
        "component": "c",
        "compute": _plan(),
    }
    spec = build_job_spec(_settings(TUNEGRID_INSTANCE="prod"), _request(), **common)
    assert (
        spec.tags["tunegridrunid"] == "r1"
        and spec.tags["tunegriddataset"] == "ultrachat.jsonl"
        and spec.tags["tunegrid-owner"] == "prod"
    )
    with pytest.raises(InvalidInput, match=r"azureml\.runsource"):
        build_job_spec(_settings(), _request(tags={"azureml.runsource": "x"}), **common)


def test_component_inputs_filter_model_defaults_but_not_user_values() -> None:
    """A model default the component does not declare is dropped (and noted); a user value is an error."""
    common = {"model_name": "m", "model_path": "p", "component": "c", "compute": _plan()}
    known = {
        "mlflow_model_path",
        "num_train_epochs",
        "learning_rate",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "lr_scheduler_type",
        "apply_lora",
        "apply_deepspeed",
        "deepspeed_stage",
    }
    spec = build_job_spec(
        _settings(), _request(), model_defaults={"future_knob": "x"}, component_inputs=known, **common
    )
    assert "future_knob" not in spec.training_inputs and any("future_knob" in n for n in spec.notes)
    with pytest.raises(InvalidInput, match="lora_r"):
        build_job_spec(_settings(), _request(params={"lora_r": 16}), component_inputs=known, **common)


@pytest.mark.parametrize(
    ("version", "label", "expected"),
    [
        ("0.0.82", None, "azureml://registries/azureml/components/chat_completion_pipeline/versions/0.0.82"),
        (None, "latest", "azureml://registries/azureml/components/chat_completion_pipeline/labels/latest"),
    ],
)
def test_registry_asset_ids(version: str | None, label: str | None, expected: str) -> None:
    """Registry assets are addressed by a pinned version or by a label."""
    assert (
        registry_asset_id("azureml", "components", "chat_completion_pipeline", version=version, label=label) == expected
    )
