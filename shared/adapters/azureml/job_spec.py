"""The fine-tune pipeline job as plain data: built once, then either rendered as the YAML that
`az ml job create --file` accepts (the dry run) or turned into the notebook's `@pipeline` job (the
real submission). Both paths call `build_job_spec`, so a test of one guards the other.

No Azure SDK import here: the dry run needs no network and starts fast.
"""

from __future__ import annotations

import textwrap
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import yaml

from shared.domain.naming import DATASET_TAG, OWNER_TAG, RUN_TAG
from shared.domain.resources import DataRef, FineTuneRequest
from shared.domain.sidecar import merge_finetune_params
from shared.errors import InvalidInput
from shared.settings import Settings

PIPELINE_JOB_SCHEMA = "https://azuremlschemas.azureedge.net/latest/pipelineJob.schema.json"
NODE_NAME = "chat_completion_pipeline"
"""The node's name in the pipeline job: the notebook's variable name."""
TRAINED_MODEL_OUTPUT = "trained_model"
MODEL_OUTPUT_OF_COMPONENT = "mlflow_model_folder"
BASE_MODEL_ID_TAG = "tunegridbasemodelid"
"""Job tag with the base model's full asset id; registration reads it to carry the inference allow list."""
SERVERLESS = "serverless"
COMPUTE_INPUTS = ("compute_model_import", "compute_preprocess", "compute_finetune", "compute_model_evaluation")
INSTANCE_TYPE_INPUTS = (
    "instance_type_model_import",
    "instance_type_preprocess",
    "instance_type_finetune",
    "instance_type_model_evaluation",
)
INSTANCE_TYPE_SETTINGS = {
    "instance_type_model_import": "AZUREML_INSTANCE_TYPE_MODEL_IMPORT",
    "instance_type_preprocess": "AZUREML_INSTANCE_TYPE_PREPROCESS",
    "instance_type_finetune": "AZUREML_INSTANCE_TYPE_FINETUNE",
    "instance_type_model_evaluation": "AZUREML_INSTANCE_TYPE_MODEL_EVALUATION",
}
MODEL_LISTED_INPUTS = ("instance_type_finetune", "instance_type_model_evaluation")
"""Serverless sizes that, when not set, are the base model's first recommended fine-tune SKU."""
FROM_MODEL_LIST = "the base model's fine-tune SKU list"
EXPERIMENT_MODEL_PLACEHOLDER = "{model}"


def registry_asset_id(
    registry: str, kind: str, name: str, *, version: str | None = None, label: str | None = None
) -> str:
    """`azureml://registries/R/{models|components}/N/versions/V` (or `/labels/L`)."""
    if version:
        return f"azureml://registries/{registry}/{kind}/{name}/versions/{version}"
    return f"azureml://registries/{registry}/{kind}/{name}/labels/{label or 'latest'}"


@dataclass(frozen=True)
class UriFile:
    path: str


@dataclass(frozen=True)
class MlflowModel:
    path: str


@dataclass(frozen=True)
class ComputePlan:
    """Where the four pipeline steps run. `gpus_per_node` is None until known (settings, sidecar
    or the cluster's size via `list_sizes()`). An empty instance type is one the base model's list
    decides at submission; `sources` says where each one came from."""

    target: str
    instance_types: Mapping[str, str]
    num_nodes: int
    gpus_per_node: int | None
    gpus_source: str
    sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def serverless(self) -> bool:
        return self.target.lower() == SERVERLESS


def compute_plan(settings: Settings, overrides: Mapping[str, Any]) -> ComputePlan:
    """Settings, overridden by the sidecar's `compute` section (cluster, instance_type_*,
    num_nodes_finetune, gpus_per_node). The fine-tune and evaluation sizes stay empty unless set:
    the submission takes them from the base model's list (`model_lifecycle.default_sku`)."""
    defaults = {
        "instance_type_model_import": settings.instance_type_model_import,
        "instance_type_preprocess": settings.instance_type_preprocess,
        "instance_type_finetune": settings.instance_type_finetune,
        "instance_type_model_evaluation": settings.instance_type_model_evaluation,
    }
    instance_types: dict[str, str] = {}
    sources: dict[str, str] = {}
    for key, value in defaults.items():
        if overrides.get(key):
            instance_types[key], sources[key] = str(overrides[key]), f"the sidecar's compute.{key}"
        elif value:
            instance_types[key], sources[key] = value, INSTANCE_TYPE_SETTINGS[key]
        else:
            instance_types[key], sources[key] = "", FROM_MODEL_LIST
    gpus = overrides.get("gpus_per_node")
    source = "sidecar compute.gpus_per_node"
    if not gpus:
        gpus, source = settings.gpus_per_node, "AZUREML_GPUS_PER_NODE"
    return ComputePlan(
        target=str(overrides.get("cluster") or settings.compute or SERVERLESS),
        instance_types=instance_types,
        num_nodes=int(overrides.get("num_nodes_finetune") or settings.num_nodes_finetune or 1),
        gpus_per_node=int(gpus) if gpus else None,
        gpus_source=source if gpus else "unknown",
        sources=sources,
    )


def data_uri(settings: Settings, ref: DataRef) -> str:
    """The datastore URI when a datastore on the prepared-data container is configured, else the
    blob's https URL (the compute's identity then needs read access to the account)."""
    if settings.datastore:
        return f"azureml://datastores/{settings.datastore}/paths/{ref.blob}"
    return ref.url


def display_name_for(
    model_name: str, dataset: str, params: Mapping[str, Any], *, gpus_per_node: int, num_nodes: int
) -> str:
    """The notebook's display name; its literal `ultrachat` is the dataset, so we put the dataset's
    name there (for the notebook's dataset the result is identical)."""
    batch_size = (
        int(params.get("per_device_train_batch_size", 1))
        * int(params.get("gradient_accumulation_steps", 1))
        * int(gpus_per_node)
        * int(num_nodes)
    )
    scheduler = params.get("lr_scheduler_type", "linear")
    ds_string = (
        f"ds{params.get('deepspeed_stage', '2')}" if str(params.get("apply_deepspeed", "false")) == "true" else "nods"
    )
    lora_string = "lora" if str(params.get("apply_lora", "false")) == "true" else "nolora"
    save_limit = params.get("save_total_limit", -1)
    seq_len = params.get("max_seq_length", -1)
    return f"{model_name}-{dataset_label(dataset)}-bs{batch_size}-{scheduler}-{ds_string}-{lora_string}-save_limit{save_limit}-seqlen{seq_len}"


def dataset_label(dataset: str) -> str:
    name = PurePosixPath(dataset).name
    for suffix in (".jsonl", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return "-".join(name.split()) or "dataset"


def experiment_name_for(settings: Settings, model_name: str) -> str:
    """AZUREML_EXPERIMENT_NAME with `{model}` filled in (the default `chat_completion_{model}` gives
    the notebook's `chat_completion_<model>`)."""
    return settings.experiment_name.replace(EXPERIMENT_MODEL_PLACEHOLDER, model_name) or f"chat_completion_{model_name}"


def job_tags(settings: Settings, request: FineTuneRequest, *, model_path: str) -> dict[str, str]:
    """Our dot-free tags (Event Grid advanced filters cannot use keys with dots) over the defaults."""
    tags = {
        RUN_TAG: request.run_id,
        DATASET_TAG: request.dataset[:256],
        OWNER_TAG: settings.instance,
        BASE_MODEL_ID_TAG: model_path,
        **{str(k): str(v) for k, v in request.tags.items()},
    }
    dotted = sorted(k for k in tags if "." in k)
    if dotted:
        raise InvalidInput(
            f"job tag keys must not contain dots (Event Grid filters cannot use them): {', '.join(dotted)}"
        )
    return tags


@dataclass(frozen=True)
class FineTuneJobSpec:
    name: str
    display_name: str
    experiment_name: str
    component: str
    model_path: str
    compute_inputs: Mapping[str, Any]
    data_inputs: Mapping[str, UriFile]
    training_inputs: Mapping[str, Any]
    tags: Mapping[str, str]
    notes: tuple[str, ...] = ()
    settings: Mapping[str, bool] = field(
        default_factory=lambda: {"force_rerun": True, "continue_on_step_failure": False}
    )

    def inputs(self) -> dict[str, Any]:
        """The component call's keyword arguments, in the notebook's order."""
        return {
            "mlflow_model_path": MlflowModel(self.model_path),
            **self.compute_inputs,
            **self.data_inputs,
            **self.training_inputs,
        }


def build_job_spec(
    settings: Settings,
    request: FineTuneRequest,
    *,
    model_name: str,
    model_path: str,
    component: str,
    compute: ComputePlan,
    model_defaults: Mapping[str, Any] | None = None,
    component_inputs: Collection[str] | None = None,
    notes: Iterable[str] = (),
) -> FineTuneJobSpec:
    """The pipeline job for `request`. Fine-tune parameters: the app's (notebook) defaults, under the
    model's `model_specific_defaults`, under the user's sidecar values. `component_inputs`, when the
    component is known, drops defaults the component does not declare (a sidecar value it does not
    declare is an error, not silently lost)."""
    params = merge_finetune_params(user=request.params, model_defaults=model_defaults)
    notes = list(notes)
    if component_inputs is not None:
        unknown_user = sorted(k for k in request.params if k not in component_inputs)
        if unknown_user:
            raise InvalidInput(f"the component {component} has no inputs named {', '.join(unknown_user)}")
        dropped = sorted(k for k in params if k not in component_inputs)
        for name in dropped:
            del params[name]
        if dropped:
            notes.append(f"model defaults the component does not declare were dropped: {', '.join(dropped)}")
    gpus = compute.gpus_per_node or 1
    compute_inputs: dict[str, Any] = dict.fromkeys(COMPUTE_INPUTS, compute.target)
    if compute.serverless:
        chosen = {k: compute.instance_types[k] for k in INSTANCE_TYPE_INPUTS if compute.instance_types[k]}
        compute_inputs.update(chosen)
        unresolved = [k for k in MODEL_LISTED_INPUTS if k not in chosen]
        if unresolved:
            notes.append(
                f"{', '.join(unresolved)}: not set, so the submission takes the base model's first fine-tune SKU that "
                "is not retired (system_metadata.SKU.finetuneRecommendedSkus or the finetune_compute_allow_list tag). "
                "Set AZUREML_INSTANCE_TYPE_FINETUNE / AZUREML_INSTANCE_TYPE_MODEL_EVALUATION to pin one; without "
                "them this file gets the component's own default, Standard_nc24rs_v3 (NCv3, retired 2025-09-30)."
            )
    data_inputs = {
        "train_file_path": UriFile(data_uri(settings, request.train)),
        "test_file_path": UriFile(data_uri(settings, request.test)),
    }
    if request.validation is not None:
        data_inputs["validation_file_path"] = UriFile(data_uri(settings, request.validation))
    training_inputs = {"number_of_gpu_to_use_finetuning": gpus, "num_nodes_finetune": compute.num_nodes, **params}
    return FineTuneJobSpec(
        name=request.job_name,
        display_name=display_name_for(
            model_name, request.dataset, params, gpus_per_node=gpus, num_nodes=compute.num_nodes
        ),
        experiment_name=experiment_name_for(settings, model_name),
        component=component,
        model_path=model_path,
        compute_inputs=compute_inputs,
        data_inputs=data_inputs,
        training_inputs=training_inputs,
        tags=job_tags(settings, request, model_path=model_path),
        notes=tuple(notes),
    )


def _yaml_input(value: Any) -> Any:
    if isinstance(value, UriFile):
        return {"type": "uri_file", "path": value.path}
    if isinstance(value, MlflowModel):
        return {"type": "mlflow_model", "path": value.path}
    return value


def to_job_document(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The pipeline job in the CLI's YAML schema (as a dict)."""
    return {
        "$schema": PIPELINE_JOB_SCHEMA,
        "type": "pipeline",
        "name": spec.name,
        "display_name": spec.display_name,
        "experiment_name": spec.experiment_name,
        "tags": dict(spec.tags),
        "settings": dict(spec.settings),
        "outputs": {TRAINED_MODEL_OUTPUT: {"type": "mlflow_model", "mode": "rw_mount"}},
        "jobs": {
            NODE_NAME: {
                "type": "pipeline",
                "component": spec.component,
                "inputs": {k: _yaml_input(v) for k, v in spec.inputs().items()},
                "outputs": {MODEL_OUTPUT_OF_COMPONENT: "${{parent.outputs.%s}}" % TRAINED_MODEL_OUTPUT},  # noqa: UP031 - the braces are Azure's
            }
        },
    }


def to_yaml(spec: FineTuneJobSpec) -> str:
    """YAML for `az ml job create --file`, with the spec's notes as leading comments."""
    header = ["# Tunegrid dry run: the pipeline job Tunegrid would submit (`az ml job create --file` accepts it)."]
    header += [f"# {line}" for note in spec.notes for line in textwrap.wrap(note, width=100) or [""]]
    body = yaml.safe_dump(
        to_job_document(spec), sort_keys=False, default_flow_style=False, allow_unicode=True, width=4096
    )
    return "\n".join(header) + "\n" + body
