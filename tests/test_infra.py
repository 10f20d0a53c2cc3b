"""Drift between the code, `local.settings.sample.json` and `infra/`, and the azd template's own rules.

Bicep cannot be compiled offline here, so the templates are read as text. The rule for app settings:
every setting in `shared.settings.SETTINGS` is set on the Function App, except the embedded backend's
`LOCAL_*` ones, which are never set in Azure; every setting the deployed code reads from the environment is
either in SETTINGS, a connection (`NAME__*`) or a platform variable listed below; and every app setting in
the templates is read by the code or the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import settings as app_settings
from shared.domain.naming import RUN_TAG
from tests.deploy_package import packaged_sources

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
PARAMETERS = INFRA / "main.parameters.json"
API = INFRA / "app" / "api.bicep"
RUN_EVENTS_TOPIC = INFRA / "app" / "run-events-topic.bicep"
EVENT_SUBSCRIPTIONS = INFRA / "event-subscriptions.bicep"
JOB_EVENTS_SUBSCRIPTION = INFRA / "app" / "job-events-subscription.bicep"
SAMPLE_SETTINGS = ROOT / "local.settings.sample.json"
HOOK_SH = ROOT / "scripts" / "post-deploy.sh"
HOOK_PS1 = ROOT / "scripts" / "post-deploy.ps1"

# Where the Function App's app settings live: main.bicep's own settings, and the connection and monitoring
# settings that app/api.bicep adds (`union(appSettings, identitySettings)`).
SETTINGS_OBJECTS = ((MAIN, "appSettings"), (API, "identitySettings"))

# Environment variables the code may read that are set by the platform or the libraries, not app settings.
RUNTIME_ENV = {
    # managed identity endpoint of App Service / Functions
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    # set by the Functions platform on every instance
    "WEBSITE_SITE_NAME",
    "WEBSITE_HOSTNAME",
    "WEBSITE_INSTANCE_ID",
    "WEBSITE_OWNER_NAME",
    "WEBSITE_RESOURCE_GROUP",
    "WEBSITE_SKU",
    "CONTAINER_NAME",
    "FUNCTIONS_WORKER_RUNTIME",
    "AZURE_FUNCTIONS_ENVIRONMENT",
    "AzureWebJobsScriptRoot",
    # process and ML-library switches (offline Hugging Face, tokenizer threads)
    "HOME",
    "PATH",
    "TMPDIR",
    "PYTHONPATH",
    "HF_HUB_OFFLINE",
    "HF_ENDPOINT",  # the hub client's own mirror setting, read by download-dataset
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    # the CA bundle the endpoint client trusts, read as requests / azure-core read it (shared/adapters/http_client.py)
    "REQUESTS_CA_BUNDLE",
    "SSL_CERT_FILE",
}

# App settings the templates set that no code of ours reads: the host and the azure-monitor exporter do.
# PYTHON_ENABLE_INIT_INDEXING: the Python worker reads it (HTTP streams need it), not our code.
HOST_SETTINGS = {"APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "PYTHON_ENABLE_INIT_INDEXING"}

# Settings whose Azure value deliberately differs from the SETTINGS default.
AZURE_VALUES = {"FINETUNE_BACKEND": "azureml"}

# Settings computed by the templates (identity, subscription, Key Vault reference, App Insights, run-events topic).
COMPUTED_SETTINGS = {
    "AZURE_SUBSCRIPTION_ID",
    "AZURE_CLIENT_ID",
    "PROXY_API_KEYS",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "RUN_EVENTS_TOPIC_ENDPOINT",
}

# Values local.settings.sample.json deliberately sets differently from the SETTINGS default, for local runs.
SAMPLE_LOCAL_VALUES = {"ROLLOUT_SCHEDULE", "PROXY_API_KEYS"}

# Settings Flex Consumption rejects or that would carry a connection string.
FORBIDDEN_APP_SETTINGS = {
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_EXTENSION_VERSION",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_CONTENTSHARE",
    "AzureWebJobsStorage",
    app_settings.STORAGE_CONNECTION,
}

IDENTITY_CONNECTION_KEYS = ("credential", "clientId", "blobServiceUri", "queueServiceUri", "tableServiceUri")
HOST_CONNECTION = "AzureWebJobsStorage"

ROLES = {
    "AzureML Data Scientist": "f6c7c914-8db3-469d-8ca1-694a8f32e121",
    "AzureML Registry User": "1823dd4f-9b8c-4ab6-ab4e-7397a3684615",
    "Monitoring Reader": "43d0d8ad-25c7-4714-9337-8ba259a9fe05",
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "Storage Blob Data Contributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
    "Storage Queue Data Contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "Storage Table Data Contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "Key Vault Secrets User": "4633458b-17de-408a-b874-0445c86b69e6",
    "EventGrid Data Sender": "d5a91429-5739-47e2-a06b-3470a27159e7",
}

COMPLETE_UPLOAD_APIS = {"CopyBlob", "PutBlob", "PutBlockList", "FlushWithClose"}


# ---------------------------------------------------------------- reading Bicep as text


def _strip_comments(text: str) -> str:
    """Drop `//` and `/* */` comments, keeping strings (single-quoted, `\\'` escapes) intact."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "'":
            j = i + 1
            while j < n and text[j] != "'":
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _bicep(path: Path) -> str:
    return _strip_comments(path.read_text(encoding="utf-8"))


def _block(text: str, start: int) -> str:
    """The text between the bracket at `start` and its match (strings skipped)."""
    opening = text[start]
    closing = {"{": "}", "[": "]"}[opening]
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "'":
            i += 1
            while text[i] != "'":
                i += 2 if text[i] == "\\" else 1
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                assert ch == closing, f"unbalanced brackets near offset {i}"
                return text[start + 1 : i]
        i += 1
    raise AssertionError(f"no closing {closing!r} for the bracket at offset {start}")


def _var_block(text: str, name: str) -> str:
    match = re.search(rf"^var {re.escape(name)} = ([{{\[])", text, re.MULTILINE)
    assert match, f"var {name} not found"
    return _block(text, match.start(1))


def _object_entries(body: str) -> dict[str, str]:
    """Top-level `key: value` entries of an object body (values as written, one line each)."""
    entries: dict[str, str] = {}
    depth = 0
    for line in body.splitlines():
        match = re.match(r"^\s*'?([A-Za-z_][A-Za-z0-9_-]*)'?\s*:\s*(.+?)\s*$", line)
        if match and depth == 0:
            entries[match.group(1)] = match.group(2)
        unquoted = re.sub(r"'(?:[^'\\]|\\.)*'", "", line)
        depth += unquoted.count("{") + unquoted.count("[") - unquoted.count("}") - unquoted.count("]")
    return entries


def _array_strings(body: str) -> list[str]:
    return re.findall(r"'([^'\\]*)'", body)


_LITERAL = re.compile(r"^'((?:[^'\\]|\\.)*)'$")


def _literal(value: str) -> str | None:
    """The string a Bicep value stands for when it is a plain literal (no interpolation), else None."""
    match = _LITERAL.match(value)
    if not match or "${" in match.group(1):
        return None
    return match.group(1).replace("\\'", "'").replace("\\\\", "\\")


def _params(text: str) -> dict[str, dict[str, Any]]:
    """`param` declarations: type, default (as written) and the decorator lines above each."""
    lines = text.splitlines()
    params: dict[str, dict[str, Any]] = {}
    for index, line in enumerate(lines):
        match = re.match(r"^param (\w+) (\w+)(?: = (.+))?$", line.strip()) if line.startswith("param ") else None
        if not match:
            continue
        decorators: list[str] = []
        j = index - 1
        while (
            j >= 0 and lines[j].strip() and not re.match(r"^(param|var|resource|module|output|targetScope)\b", lines[j])
        ):
            decorators.insert(0, lines[j])
            j -= 1
        params[match.group(1)] = {"type": match.group(2), "default": match.group(3), "decorators": decorators}
    return params


def _app_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    for path, var in SETTINGS_OBJECTS:
        entries = _object_entries(_var_block(_bicep(path), var))
        overlap = settings.keys() & entries.keys()
        assert not overlap, f"settings set twice: {sorted(overlap)}"
        settings.update(entries)
    return settings


def _bicep_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicep"))


# ---------------------------------------------------------------- reading the code

# The code the Function App runs is the package's Python files (the project minus `.funcignore`, see
# tests/deploy_package.py). The local kit (tunegrid/) stays out: what it reads from the environment is not an
# Azure app setting.

_ENV_READ = re.compile(
    r"""(?:\benviron|\benv|\bgetenv)\s*(?:\.get\(|\[|\.setdefault\(|\()\s*["']([A-Za-z_][A-Za-z0-9_]*)["']"""
)


def _env_literals() -> dict[str, list[str]]:
    """Environment variable names the deployed code reads by literal, with where."""
    found: dict[str, list[str]] = {}
    for path in packaged_sources():
        for match in _ENV_READ.finditer(path.read_text(encoding="utf-8")):
            name = match.group(1)
            if name.isupper() or "__" in name or name.startswith("AzureWebJobs"):
                found.setdefault(name, []).append(path.relative_to(ROOT).as_posix())
    return found


@pytest.fixture(scope="module")
def bindings() -> dict[str, list[dict[str, Any]]]:
    """The exact binding JSON of every function the app registers, by function name."""
    import function_app
    from tunegrid.appindex import functions_of, raw_bindings

    return {fn.get_function_name(): raw_bindings(fn) for fn in functions_of(function_app.app)}


def _binding_values(bindings: dict[str, list[dict[str, Any]]], key: str) -> set[str]:
    return {b[key] for bs in bindings.values() for b in bs if isinstance(b.get(key), str)}


def _setting_references(bindings: dict[str, list[dict[str, Any]]]) -> set[str]:
    """App settings named in binding values as %NAME% (schedules, paths)."""
    refs: set[str] = set()
    for bs in bindings.values():
        for b in bs:
            for value in b.values():
                if isinstance(value, str):
                    refs.update(re.findall(r"%([A-Za-z_][A-Za-z0-9_]*)%", value))
    return refs


def _azure_setting_names() -> set[str]:
    return {s.name for s in app_settings.SETTINGS if not s.name.startswith("LOCAL_")}


# ---------------------------------------------------------------- app settings


def test_app_settings_include_every_setting_the_code_reads(bindings: dict[str, list[dict[str, Any]]]) -> None:
    """Every non-local setting, env literal, binding %SETTING% and connection the app reads is set in infra."""
    have = set(_app_settings())
    required = set(_azure_setting_names()) | _setting_references(bindings)
    required |= {n for n in _env_literals() if n not in RUNTIME_ENV}
    for connection in _binding_values(bindings, "connection") | {HOST_CONNECTION}:
        required |= {f"{connection}__{key}" for key in IDENTITY_CONNECTION_KEYS}
    missing = sorted(required - have)
    assert not missing, f"read by the code but not set in infra/: {missing}"


def test_app_settings_are_all_read_by_the_code(bindings: dict[str, list[dict[str, Any]]]) -> None:
    """Every app setting in infra is a setting, a connection or a host setting: nothing stale is deployed."""
    known = {s.name for s in app_settings.SETTINGS} | set(_env_literals()) | HOST_SETTINGS
    connections = _binding_values(bindings, "connection") | {HOST_CONNECTION}
    stale = sorted(name for name in _app_settings() if name not in known and name.split("__")[0] not in connections)
    assert not stale, f"set in infra/ but read by nobody: {stale}"


def test_env_reads_of_the_deployed_code_are_known_settings() -> None:
    """An environment literal in the deployed code is a SETTINGS entry, a connection or a platform variable."""
    unknown = {
        name: where
        for name, where in _env_literals().items()
        if name not in RUNTIME_ENV and name not in {s.name for s in app_settings.SETTINGS} and "__" not in name
    }
    assert not unknown, f"add these to shared.settings.SETTINGS or to RUNTIME_ENV here: {unknown}"


def test_local_only_and_platform_managed_settings_stay_out_of_azure() -> None:
    """LOCAL_* settings, connection strings and settings Flex Consumption rejects are never deployed."""
    names = set(_app_settings())
    local = sorted(n for n in names if n.startswith("LOCAL_"))
    assert not local, f"local-only settings in infra/: {local}"
    forbidden = sorted(names & FORBIDDEN_APP_SETTINGS)
    assert not forbidden, f"not allowed on Flex Consumption or not identity-based: {forbidden}"


@pytest.mark.parametrize("connection", [HOST_CONNECTION, app_settings.STORAGE_CONNECTION])
def test_storage_connections_use_the_managed_identity(connection: str) -> None:
    """Both storage connections are in the identity form, bound to the user-assigned identity."""
    settings = _app_settings()
    assert _literal(settings[f"{connection}__credential"]) == "managedidentity"
    assert settings[f"{connection}__clientId"] == "identityClientId"
    for service in ("blob", "queue", "table"):
        assert settings[f"{connection}__{service}ServiceUri"] == f"stg.properties.primaryEndpoints.{service}"
    assert settings["AZURE_CLIENT_ID"] == "identityClientId"


def test_the_app_module_deploys_both_settings_objects() -> None:
    """main.bicep hands its settings to app/api.bicep, which merges them with the connection settings."""
    assert re.search(r"^\s*appSettings: appSettings$", _bicep(MAIN), re.MULTILINE)
    assert "appSettingsKeyValuePairs: union(appSettings, identitySettings)" in _bicep(API)


@pytest.mark.parametrize(
    "doc", [s for s in app_settings.SETTINGS if not s.name.startswith("LOCAL_")], ids=lambda s: s.name
)
def test_setting_values_match_the_defaults(doc: app_settings.SettingDoc) -> None:
    """A literal equals the SETTINGS default (and the sample's value); a parameter's defaults do too."""
    value = _app_settings()[doc.name]
    expected = AZURE_VALUES.get(doc.name, doc.default)
    main_params = _params(_bicep(MAIN))
    literal = _literal(value)
    if literal is not None:
        assert literal == expected, f"infra sets {doc.name}={literal!r}, expected {expected!r}"
        sample = json.loads(SAMPLE_SETTINGS.read_text(encoding="utf-8"))["Values"]
        if doc.name not in SAMPLE_LOCAL_VALUES and doc.name not in AZURE_VALUES:
            assert sample[doc.name] == literal, "local.settings.sample.json and infra/ disagree"
    elif value in main_params:
        default = main_params[value]["default"]
        if default is not None:
            assert _literal(default) == expected, f"param {value} default"
        env_default = _parameters_file_defaults().get(value)
        if env_default is not None:
            assert env_default == expected, f"main.parameters.json default of {value}"
    elif doc.name == "PROXY_API_KEYS":
        assert value.startswith("'@Microsoft.KeyVault(SecretUri=${"), "the proxy keys come from Key Vault"
    else:
        assert doc.name in COMPUTED_SETTINGS, (
            f"{doc.name} = {value}: not a literal, a parameter or a known computed value"
        )


def test_sample_settings_list_every_setting_with_its_default() -> None:
    """local.settings.sample.json has every setting, with the SETTINGS default unless it is a local choice."""
    sample = json.loads(SAMPLE_SETTINGS.read_text(encoding="utf-8"))["Values"]
    missing = sorted({s.name for s in app_settings.SETTINGS} - set(sample))
    assert not missing, f"missing from local.settings.sample.json: {missing}"
    differing = sorted(
        s.name for s in app_settings.SETTINGS if s.name not in SAMPLE_LOCAL_VALUES and sample[s.name] != s.default
    )
    assert not differing, f"sample differs from shared.settings defaults: {differing}"


# ---------------------------------------------------------------- storage


def test_every_container_and_table_the_code_uses_is_declared(bindings: dict[str, list[dict[str, Any]]]) -> None:
    """CONTAINERS, TABLES, trigger paths and container literals in the code all exist in the storage account."""
    main = _bicep(MAIN)
    containers = set(_array_strings(_var_block(main, "dataContainers")))
    tables = set(_array_strings(_var_block(main, "dataTables")))
    used_containers = set(app_settings.CONTAINERS)
    used_containers |= {path.split("/")[0] for path in _binding_values(bindings, "path")}
    used_tables = set(app_settings.TABLES)
    for path in packaged_sources():
        text = path.read_text(encoding="utf-8")
        used_containers.update(
            re.findall(
                r"""(?:\bcontainer(?:_name)?\s*=\s*|get_container_client\(\s*|create_container\(\s*)["']([a-z0-9][a-z0-9-]{2,62})["']""",
                text,
            )
        )
        used_tables.update(
            re.findall(
                r"""(?:\btable(?:_name)?\s*=\s*|get_table_client\(\s*|create_table(?:_if_not_exists)?\(\s*)["']([A-Za-z][A-Za-z0-9]{2,62})["']""",
                text,
            )
        )
    assert used_containers <= containers, f"containers not declared: {sorted(used_containers - containers)}"
    assert used_tables <= tables, f"tables not declared: {sorted(used_tables - tables)}"
    assert "concat([deploymentStorageContainerName, deadLetterContainerName], dataContainers)" in main
    assert "tables: [for name in dataTables:" in main


def test_training_container_is_the_same_everywhere() -> None:
    """The trigger's container, the azd output and the subscription filter's default agree."""
    assert _literal(re.search(r"^var trainingContainerName = (.+)$", _bicep(MAIN), re.MULTILINE).group(1)) == (
        app_settings.TRAINING_CONTAINER
    )
    assert _literal(_params(_bicep(EVENT_SUBSCRIPTIONS))["trainingContainerName"]["default"]) == (
        app_settings.TRAINING_CONTAINER
    )


# ---------------------------------------------------------------- security rules


def test_no_keys_or_connection_strings_in_infra() -> None:
    """No listKeys(), account keys or connection strings anywhere in the templates."""
    for path in [*_bicep_files(), PARAMETERS]:
        text = path.read_text(encoding="utf-8")
        for needle in (
            "listKeys(",
            "listkeys(",
            "AccountKey=",
            "SharedAccessKey",
            "DefaultEndpointsProtocol",
            "primaryKey",
        ):
            assert needle not in text, f"{path.name}: {needle}"


@pytest.mark.parametrize(
    ("path", "setting"),
    [
        (MAIN, "allowSharedKeyAccess: false"),
        (MAIN, "disableLocalAuth: true"),
        (MAIN, "allowBlobPublicAccess: false"),
        (INFRA / "app" / "keyvault.bicep", "enableRbacAuthorization: true"),
        (RUN_EVENTS_TOPIC, "disableLocalAuth: true"),
    ],
)
def test_local_auth_is_disabled(path: Path, setting: str) -> None:
    """Storage, Application Insights and the run-events topic take Entra ID only; Key Vault uses RBAC."""
    assert re.search(rf"^\s*{re.escape(setting)}\s*$", _bicep(path), re.MULTILINE), f"{path.name}: {setting}"


def test_role_assignments_are_named_with_guid() -> None:
    """Every role assignment has a deterministic guid(...) name, so re-provisioning is idempotent."""
    count = 0
    for path in _bicep_files():
        text = _bicep(path)
        for match in re.finditer(r"'Microsoft\.Authorization/roleAssignments@[\w-]+'", text):
            name = re.search(r"^\s*name: (.+)$", text[match.end() :], re.MULTILINE)
            assert name and name.group(1).startswith("guid("), f"{path.name}: role assignment not named with guid()"
            count += 1
    assert count >= 10


@pytest.mark.parametrize(
    ("role", "path"),
    [
        ("AzureML Data Scientist", "app/ml-workspace.bicep"),
        ("Monitoring Reader", "app/ml-workspace.bicep"),
        ("AzureML Registry User", "app/registry-access.bicep"),
        ("Storage Blob Data Owner", "app/rbac.bicep"),
        ("Storage Queue Data Contributor", "app/rbac.bicep"),
        ("Storage Table Data Contributor", "app/rbac.bicep"),
        ("Monitoring Metrics Publisher", "app/rbac.bicep"),
        ("Storage Blob Data Contributor", "app/rbac.bicep"),
        ("Key Vault Secrets User", "app/keyvault.bicep"),
        ("EventGrid Data Sender", "app/rbac.bicep"),
    ],
)
def test_expected_roles_are_assigned(role: str, path: str) -> None:
    """Each role the app needs is assigned by id in the module that owns its scope."""
    text = _bicep(INFRA / path)
    assert f"'{ROLES[role]}'" in text
    assert "subscriptionResourceId('Microsoft.Authorization/roleDefinitions'" in text


def test_registry_role_only_for_private_registries() -> None:
    """Reading Microsoft's public azureml registry needs no role: the assignment is opt-in."""
    main = _bicep(MAIN)
    assert _literal(_params(main)["mlRegistryName"]["default"]) == "azureml"
    assert _params(main)["assignRegistryRole"]["default"] == "false"
    assert "module registryAccess 'app/registry-access.bicep' = if (assignRegistryRole)" in main


# ---------------------------------------------------------------- Bicep hygiene


@pytest.mark.parametrize("path", _bicep_files(), ids=lambda p: p.relative_to(INFRA).as_posix())
def test_every_parameter_is_described(path: Path) -> None:
    """Each param carries @description; secrets carry @secure."""
    for name, param in _params(_bicep(path)).items():
        decorators = "\n".join(param["decorators"])
        assert "@description(" in decorators, f"{path.name}: param {name} has no @description"
        if re.search(r"(Key|Keys|endpointUrl)$", name):
            assert "@secure()" in decorators, f"{path.name}: param {name} should be @secure()"


@pytest.mark.parametrize("path", _bicep_files(), ids=lambda p: p.relative_to(INFRA).as_posix())
def test_modules_resolve_and_are_pinned(path: Path) -> None:
    """Local modules exist; registry modules are Azure Verified Modules pinned to a version."""
    for ref in re.findall(r"^\s*module \w+ '([^']+)'", _bicep(path), re.MULTILINE):
        if ref.startswith("br/"):
            assert re.fullmatch(r"br/public:avm/(res|ptn|utl)/[\w/-]+:\d+\.\d+\.\d+", ref), ref
        else:
            assert (path.parent / ref).is_file(), f"{path.name}: module {ref} not found"


def test_parameters_file_matches_main_bicep() -> None:
    """main.parameters.json names real params, supplies the required ones, and its defaults match."""
    params = _params(_bicep(MAIN))
    supplied = json.loads(PARAMETERS.read_text(encoding="utf-8"))["parameters"]
    assert set(supplied) <= set(params), sorted(set(supplied) - set(params))
    generated = {n for n, p in params.items() if "type: 'generate'" in "\n".join(p["decorators"])}
    assert generated == {"proxyApiKeys"} and "proxyApiKeys" not in supplied, "azd generates the proxy key"
    required = {n for n, p in params.items() if p["default"] is None} - generated
    assert required <= set(supplied), sorted(required - set(supplied))
    for name, default in _parameters_file_defaults().items():
        declared = params[name]["default"]
        assert declared is not None, f"{name}: main.parameters.json has a default but main.bicep none"
        literal = _literal(declared)
        assert (declared if literal is None else literal) == default, f"{name}: {declared} vs {default}"


def _parameters_file_defaults() -> dict[str, str]:
    """`${VAR=default}` defaults of main.parameters.json, by parameter."""
    supplied = json.loads(PARAMETERS.read_text(encoding="utf-8"))["parameters"]
    out: dict[str, str] = {}
    for name, entry in supplied.items():
        match = re.fullmatch(r"\$\{\w+=(.*)\}", str(entry["value"]))
        if match:
            out[name] = match.group(1)
    return out


# ---------------------------------------------------------------- Event Grid


def test_blob_created_subscription_filters() -> None:
    """Only complete uploads of .jsonl files under training-data/ reach the ingest webhook."""
    text = _bicep(EVENT_SUBSCRIPTIONS)
    assert "'Microsoft.Storage.BlobCreated'" in text
    assert "subjectBeginsWith: '/blobServices/default/containers/${trainingContainerName}/'" in text
    assert "subjectEndsWith: '.jsonl'" in text
    api_filter = re.search(r"key: 'data\.api'\s+values: \[([^\]]*)\]", text)
    assert api_filter and set(_array_strings(api_filter.group(1))) == COMPLETE_UPLOAD_APIS
    assert "/runtime/webhooks/blobs?functionName=Host.Functions.${ingestFunctionName}&code=${blobsExtensionKey}" in text


def test_job_events_subscription_filters() -> None:
    """Run events of our parent pipeline jobs only, selected by the dot-free run tag, with retries."""
    assert "." not in RUN_TAG, "Event Grid advanced filter keys cannot contain a dot"
    text = _bicep(JOB_EVENTS_SUBSCRIPTION)
    assert "'Microsoft.MachineLearningServices.RunCompleted'" in text
    assert "'Microsoft.MachineLearningServices.RunStatusChanged'" in text
    assert re.search(rf"operatorType: 'IsNotNull'\s+key: 'data\.runTags\.{RUN_TAG}'", text)
    run_type = re.search(r"operatorType: 'StringIn'\s+key: 'data\.runType'\s+values: \[([^\]]*)\]", text)
    assert run_type and _array_strings(run_type.group(1)) == ["azureml.PipelineRun"]
    assert "/runtime/webhooks/eventgrid?functionName=${jobEventsFunctionName}&code=${eventGridExtensionKey}" in (
        _bicep(EVENT_SUBSCRIPTIONS)
    )


@pytest.mark.parametrize("path", [EVENT_SUBSCRIPTIONS, JOB_EVENTS_SUBSCRIPTION], ids=lambda p: p.name)
def test_subscriptions_retry_and_dead_letter_with_identity(path: Path) -> None:
    """24 h of retries, then the event lands in the dead-letter container, written with the topic's identity."""
    text = _bicep(path)
    params = _params(text)
    assert params["eventTimeToLiveInMinutes"]["default"] == "1440"
    assert int(params["maxDeliveryAttempts"]["default"]) >= 10
    assert "maxDeliveryAttempts: maxDeliveryAttempts" in text
    assert "eventTimeToLiveInMinutes: eventTimeToLiveInMinutes" in text
    assert "deadLetterWithResourceIdentity:" in text
    assert "endpointType: 'StorageBlob'" in text or "deadLetterWithResourceIdentity: deadLetter" in text


def test_subscriptions_target_the_app_functions(bindings: dict[str, list[dict[str, Any]]]) -> None:
    """The webhook function names are the app's Event Grid blob trigger and Event Grid trigger."""
    params = _params(_bicep(EVENT_SUBSCRIPTIONS))
    ingest = _literal(params["ingestFunctionName"]["default"])
    job_events = _literal(params["jobEventsFunctionName"]["default"])
    assert ingest in bindings and job_events in bindings
    (trigger,) = [b for b in bindings[ingest] if b["type"] == "blobTrigger"]
    assert trigger["source"] == "EventGrid"
    assert trigger["connection"] == app_settings.STORAGE_CONNECTION
    assert trigger["path"].split("/")[0] == app_settings.TRAINING_CONTAINER
    assert any(b["type"] == "eventGridTrigger" for b in bindings[job_events])


def test_run_events_topic_takes_cloud_events_from_the_app_identity_only() -> None:
    """The app publishes CloudEvents v1.0 with its identity: no key (local auth off), the sender role on the
    topic, and the topic's endpoint as RUN_EVENTS_TOPIC_ENDPOINT."""
    topic = _bicep(RUN_EVENTS_TOPIC)
    assert "'Microsoft.EventGrid/topics@" in topic and "inputSchema: 'CloudEventSchemaV1_0'" in topic
    assert "minimumTlsVersionAllowed: '1.2'" in topic and "output endpoint string = topic.properties.endpoint" in topic
    assert _app_settings()["RUN_EVENTS_TOPIC_ENDPOINT"] == "runEventsTopic.outputs.endpoint"
    assert "module runEventsTopic 'app/run-events-topic.bicep'" in _bicep(MAIN)
    assert "runEventsTopicName: runEventsTopic.outputs.name" in _bicep(MAIN)
    rbac = _bicep(INFRA / "app" / "rbac.bicep")
    sender = rbac[rbac.index("resource appRunEventsSender") :]
    assert "scope: runEventsTopic" in sender and "eventGridDataSenderRoleId" in sender
    assert "principalId: managedIdentityPrincipalId" in sender


def test_system_topics_have_an_identity_with_dead_letter_rights() -> None:
    """Both topics get a system identity, and that identity may write the dead-letter container."""
    assert "type: 'SystemAssigned'" in _bicep(INFRA / "app" / "system-topic.bicep")
    main = _bicep(MAIN)
    assert "storageTopic.outputs.principalId" in main and "ml.outputs.systemTopicPrincipalId" in main
    rbac = _bicep(INFRA / "app" / "rbac.bicep")
    assert "scope: storageAccount::blobService::deadLetterContainer" in rbac


# ---------------------------------------------------------------- azd template and hooks


def test_azure_yaml_declares_the_function_service_and_hooks() -> None:
    """Service api: Python on Functions from the repo root; postdeploy hooks for POSIX and Windows."""
    spec = yaml.safe_load((ROOT / "azure.yaml").read_text(encoding="utf-8"))
    assert spec["services"] == {"api": {"project": ".", "language": "python", "host": "function"}}
    hook = spec["hooks"]["postdeploy"]
    posix = ROOT / hook["posix"]["run"]
    assert hook["posix"]["shell"] == "sh" and posix == HOOK_SH
    assert posix.stat().st_mode & stat.S_IXUSR, "the POSIX hook must be executable"
    assert posix.read_text(encoding="utf-8").startswith("#!/bin/sh\n")
    assert hook["windows"]["shell"] == "pwsh" and ROOT / hook["windows"]["run"] == HOOK_PS1
    assert HOOK_PS1.is_file()
    assert hook["posix"]["continueOnError"] is False


@pytest.mark.parametrize("hook", [HOOK_SH, HOOK_PS1], ids=lambda p: p.name)
def test_hooks_read_only_azd_outputs_and_pass_only_template_params(hook: Path) -> None:
    """Every azd value a hook needs is a main.bicep output; every parameter it passes exists."""
    text = hook.read_text(encoding="utf-8")
    outputs = set(re.findall(r"^output (\w+) ", _bicep(MAIN), re.MULTILINE))
    if hook.suffix == ".sh":
        needed = set(re.search(r"for name in ([^;]+);", text, re.DOTALL).group(1).replace("\\", " ").split())
        passed = set(re.findall(r'^\s*"(\w+)": \{"value"', text, re.MULTILINE))
    else:
        needed = set(re.findall(r"'([A-Z_]+)'", re.search(r"\$required = @\(([^)]*)\)", text).group(1)))
        passed = set(re.findall(r"^\s*(\w+)\s*= @\{ value = ", text, re.MULTILINE))
    assert needed <= outputs, sorted(needed - outputs)
    params = _params(_bicep(EVENT_SUBSCRIPTIONS))
    assert passed <= set(params), sorted(passed - set(params))
    required = {n for n, p in params.items() if p["default"] is None}
    assert required <= passed, sorted(required - passed)


def test_funcignore_keeps_the_local_stack_out_of_the_package() -> None:
    """The deployment package leaves out the venv, tests, infra and local-only requirements, but not the app."""
    patterns = [
        line.strip()
        for line in (ROOT / ".funcignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (
        ".venv/",
        ".venv-deploy/",
        ".venv-checkov/",
        "tunegrid/",
        "node_modules/",
        "tests/",
        "bench/",
        "samples/",
        ".tunegrid/",
        "docs/",
        "infra/",
        "requirements-local.txt",
        "requirements-checkov.txt",
        "local.settings.json",
    ):
        assert needed in patterns, needed
    for shipped in ("function_app.py", "host.json", "requirements.txt", "functions/", "shared/"):
        assert shipped not in patterns and not any(p.rstrip("/") == shipped.rstrip("/") for p in patterns), shipped
    assert not any(p in ("*", "*.py", "*.json", "*.txt") for p in patterns)


# ---------------------------------------------------------------- the POSIX hook, run against a fake az


FAKE_AZ = r"""#!/bin/sh
printf '%s\n' "$*" >> "$FAKE_AZ_LOG"
case "$*" in
    *"functionapp keys list"*blobs_extension*) [ -z "$FAKE_BLOBS_KEY" ] || echo "$FAKE_BLOBS_KEY" ;;
    *"functionapp keys list"*eventgrid_extension*) [ -z "$FAKE_EVENTGRID_KEY" ] || echo "$FAKE_EVENTGRID_KEY" ;;
    *"deployment group create"*)
        for arg in "$@"; do
            case "$arg" in
                @*) cp "${arg#@}" "$FAKE_AZ_PARAMS"; stat -c %a "${arg#@}" > "$FAKE_AZ_PARAMS.mode"; echo "${arg#@}" > "$FAKE_AZ_PARAMS.path" ;;
            esac
        done ;;
esac
"""

HOOK_ENV = {
    "AZURE_FUNCTION_NAME": "func-api-abc",
    "RESOURCE_GROUP": "rg-dev",
    "AZURE_STORAGE_ACCOUNT_NAME": "stabc",
    "STORAGE_SYSTEM_TOPIC_NAME": "evgt-st-abc",
    "DEAD_LETTER_CONTAINER_NAME": "eventgrid-deadletter",
    "TRAINING_CONTAINER_NAME": "training-data",
    "AZUREML_RESOURCE_GROUP": "rg-ml",
    "AZUREML_SYSTEM_TOPIC_NAME": "evgt-ws-123456",
}


def _run_hook(shell: str, tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], Path]:
    if not shutil.which(shell):
        pytest.skip(f"{shell} not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in (("az", FAKE_AZ), ("azd", "#!/bin/sh\nexit 0\n")):
        (bin_dir / tool).write_text(body, encoding="utf-8")
        (bin_dir / tool).chmod(0o755)
    captured = tmp_path / "params.json"
    full_env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "TMPDIR": str(tmp_path),
        "FAKE_AZ_LOG": str(tmp_path / "az.log"),
        "FAKE_AZ_PARAMS": str(captured),
        "TUNEGRID_KEY_WAIT_SECONDS": "0",
        "TUNEGRID_KEY_WAIT_ATTEMPTS": "3",
        **env,
    }
    proc = subprocess.run(
        [shutil.which(shell), str(HOOK_SH)], env=full_env, capture_output=True, text=True, timeout=60, check=False
    )
    return proc, captured


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_post_deploy_hook_deploys_the_subscriptions_without_leaking_keys(shell: str, tmp_path: Path) -> None:
    """The hook passes both system keys through a private file that it deletes, and never prints them."""
    keys = {"FAKE_BLOBS_KEY": "blobs-SECRET-key==", "FAKE_EVENTGRID_KEY": "eventgrid-SECRET-key=="}
    proc, captured = _run_hook(shell, tmp_path, {**HOOK_ENV, **keys})
    assert proc.returncode == 0, proc.stderr
    params = {k: v["value"] for k, v in json.loads(captured.read_text(encoding="utf-8"))["parameters"].items()}
    assert params["blobsExtensionKey"] == keys["FAKE_BLOBS_KEY"]
    assert params["eventGridExtensionKey"] == keys["FAKE_EVENTGRID_KEY"]
    assert params["functionAppName"] == HOOK_ENV["AZURE_FUNCTION_NAME"]
    assert params["mlSystemTopicName"] == HOOK_ENV["AZUREML_SYSTEM_TOPIC_NAME"]
    assert Path(f"{captured}.mode").read_text(encoding="utf-8").strip() == "600"
    assert not Path(Path(f"{captured}.path").read_text(encoding="utf-8").strip()).exists(), "params file left behind"
    az_log = (tmp_path / "az.log").read_text(encoding="utf-8")
    assert "--template-file infra/event-subscriptions.bicep" in az_log
    assert "--resource-group rg-dev" in az_log
    for secret in keys.values():
        assert secret not in proc.stdout + proc.stderr + az_log


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_post_deploy_hook_gives_up_clearly_when_keys_never_appear(shell: str, tmp_path: Path) -> None:
    """With no extension keys after the allowed tries, the hook fails, says why, and deploys nothing."""
    proc, captured = _run_hook(shell, tmp_path, {**HOOK_ENV, "FAKE_BLOBS_KEY": "", "FAKE_EVENTGRID_KEY": "k"})
    assert proc.returncode == 1
    assert "blobs_extension" in proc.stderr and "after 3 tries" in proc.stderr
    assert "deployment group create" not in (tmp_path / "az.log").read_text(encoding="utf-8")
    assert not captured.exists()


def test_post_deploy_hook_names_missing_azd_values(tmp_path: Path) -> None:
    """Run before provisioning, the hook lists the azd values it lacks and calls nothing."""
    env = {k: v for k, v in HOOK_ENV.items() if k not in ("AZURE_FUNCTION_NAME", "AZUREML_SYSTEM_TOPIC_NAME")}
    proc, _ = _run_hook("sh", tmp_path, env)
    assert proc.returncode == 1
    assert "AZURE_FUNCTION_NAME" in proc.stderr and "AZUREML_SYSTEM_TOPIC_NAME" in proc.stderr
    assert not (tmp_path / "az.log").exists()


def test_hook_scripts_have_no_bashisms_for_sh() -> None:
    """The POSIX hook runs under `sh` (azd's posix shell), so it parses with dash as well as bash."""
    for shell in ("dash", "bash"):
        path = shutil.which(shell)
        if path:
            proc = subprocess.run([path, "-n", str(HOOK_SH)], capture_output=True, text=True, check=False)
            assert proc.returncode == 0, proc.stderr
    assert os.access(HOOK_SH, os.X_OK)


# ---------------------------------------------------------------- static analysis: pycep and checkov (docs/deploy.md)

CHECKOV_VENV = ROOT / ".venv-checkov"
CHECKOV_REQUIREMENTS = ROOT / "requirements-checkov.txt"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

# Offline: `--skip-download` stops the guideline download from the Prisma Cloud API, this variable the PyPI release
# check (with both, strace shows no connect()). The proxies point at the closed discard port, so a call that slipped
# through fails here instead of leaving the machine.
CHECKOV_OFFLINE_ENV = {
    "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true",
    **{name: "http://127.0.0.1:9" for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
    "NO_PROXY": "",
    "no_proxy": "",
}

# The checks suppressed on purpose (`// checkov:skip=` in the resource, a row in docs/deploy.md), by resource.
SUPPRESSED_CHECKS = {
    ("CKV_AZURE_189", "Microsoft.KeyVault/vaults.vault"),
    ("CKV_AZURE_109", "Microsoft.KeyVault/vaults.vault"),
    ("CKV_AZURE_41", "Microsoft.KeyVault/vaults/secrets.proxyKeys"),
    ("CKV_AZURE_193", "Microsoft.EventGrid/topics.topic"),
}

# Run by the checkov venv's interpreter: parse each file with pycep on its own, as checkov's Bicep runner does, and
# write, per file, the parse error (or null) and where pycep's tree has `!(a ? b : c)`: pycep reads `!a ? b : c`
# that way, while Bicep reads `(!a) ? b : c`, so the analyser would see another expression than Azure does.
PYCEP_SCRIPT = """
import json, sys
from pathlib import Path
from pycep import BicepParser

def negated_conditionals(node, where):
    if isinstance(node, dict):
        operator = node.get("operator")
        if isinstance(operator, dict) and operator.get("type") == "not":
            inner = (operator.get("operands") or {}).get("bool_value")
            if isinstance(inner, dict) and (inner.get("operator") or {}).get("type") == "conditional":
                yield where
        for key, value in node.items():
            yield from negated_conditionals(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from negated_conditionals(value, f"{where}/{index}")

found = {}
for name in sys.argv[2:]:
    try:
        tree = BicepParser().parse(file_path=Path(name))
    except Exception as exc:
        found[name] = {"error": f"{type(exc).__name__}: {exc}", "negated_conditionals": []}
    else:
        found[name] = {"error": None, "negated_conditionals": list(negated_conditionals(tree, ""))}
Path(sys.argv[1]).write_text(json.dumps(found), encoding="utf-8")
"""


def checkov_requirements_hash() -> str:
    """The key of the checkov venv; the Makefile names its stamp `.installed-<this>` the same way."""
    return hashlib.sha256(CHECKOV_REQUIREMENTS.read_bytes()).hexdigest()[:16]


def _offline_env() -> dict[str, str]:
    return {**os.environ, **CHECKOV_OFFLINE_ENV}


@pytest.fixture(scope="module")
def checkov_bin() -> Path:
    """The bin/ of `.venv-checkov/`, current with requirements-checkov.txt."""
    stamp = CHECKOV_VENV / f".installed-{checkov_requirements_hash()}"
    if not stamp.is_file():
        pytest.fail(f"{CHECKOV_VENV.name}/ is missing or stale (no {stamp.name}): run `make checkov-venv`")
    return CHECKOV_VENV / "bin"


@pytest.fixture(scope="module")
def pycep_results(checkov_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """For each .bicep file under infra/: pycep's parse error (None: parsed) and its negated conditionals."""
    out = tmp_path_factory.mktemp("pycep") / "errors.json"
    names = [path.relative_to(ROOT).as_posix() for path in _bicep_files()]
    subprocess.run(
        [str(checkov_bin / "python"), "-c", PYCEP_SCRIPT, str(out), *names],
        cwd=ROOT,
        env=_offline_env(),
        check=True,
        timeout=300,
    )
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def checkov_report(checkov_bin: Path) -> dict[str, Any]:
    """checkov's JSON report of `--framework bicep` on infra/, run offline."""
    command = [
        str(checkov_bin / "checkov"),
        *("--directory", "infra", "--framework", "bicep", "--skip-download", "--output", "json"),
    ]
    proc = subprocess.run(command, cwd=ROOT, env=_offline_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), f"checkov exited {proc.returncode}: {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    (bicep,) = [r for r in reports if r.get("check_type") == "bicep"]
    return bicep


@pytest.mark.checkov
@pytest.mark.parametrize("path", _bicep_files(), ids=lambda p: p.relative_to(INFRA).as_posix())
def test_every_template_parses_with_pycep(path: Path, pycep_results: dict[str, dict[str, Any]]) -> None:
    """checkov reads Bicep with pycep, checks nothing in a file it cannot parse, and must read what Bicep reads."""
    result = pycep_results[path.relative_to(ROOT).as_posix()]
    assert result["error"] is None, f"pycep cannot parse {path.relative_to(ROOT)}: {result['error']}"
    assert not result["negated_conditionals"], (
        f"{path.relative_to(ROOT)}: pycep reads `!a ? b : c` as `!(a ? b : c)`; write `a ? c : b` "
        f"(at {result['negated_conditionals']})"
    )


@pytest.mark.checkov
def test_checkov_finds_no_failed_check_and_no_parsing_error(checkov_report: dict[str, Any]) -> None:
    """Zero failed checks and zero parsing errors on infra/: a finding is fixed or suppressed with its reason."""
    results, summary = checkov_report["results"], checkov_report["summary"]
    failed = [
        f"{c['check_id']} {c['check_name']!r} on {c['resource']} ({c['file_path']}:{c['file_line_range']})"
        for c in results["failed_checks"]
    ]
    assert not failed, "checkov failed checks:\n" + "\n".join(failed)
    assert summary["failed"] == 0
    assert results["parsing_errors"] == [] and summary["parsing_errors"] == 0, results["parsing_errors"]


@pytest.mark.checkov
def test_checkov_checked_the_key_vault_recovery_settings(checkov_report: dict[str, Any]) -> None:
    """The vault's soft delete and purge protection pass, so checkov read the resources (not an empty run)."""
    passed = {(c["check_id"], c["resource"]) for c in checkov_report["results"]["passed_checks"]}
    for check in ("CKV_AZURE_42", "CKV_AZURE_110", "CKV_AZURE_111"):
        assert (check, "Microsoft.KeyVault/vaults.vault") in passed, check
    assert checkov_report["summary"]["checkov_version"] == "3.3.30"


@pytest.mark.checkov
def test_checkov_suppressions_are_the_documented_ones(checkov_report: dict[str, Any]) -> None:
    """Each skipped check is one of the known suppressions, says why, and has its row in docs/deploy.md."""
    skipped = checkov_report["results"]["skipped_checks"]
    assert {(c["check_id"], c["resource"]) for c in skipped} == SUPPRESSED_CHECKS
    for check in skipped:
        reason = check["check_result"].get("suppress_comment", "").strip()
        assert reason and reason != "No comment provided", check["check_id"]
    doc = DEPLOY_DOC.read_text(encoding="utf-8")
    for check_id, _ in SUPPRESSED_CHECKS:
        assert re.search(rf"^\| `{check_id}` ", doc, re.MULTILINE), f"{check_id} has no row in docs/deploy.md"


# ---------------------------------------------------------------- references between files


# Files whose paths and links must resolve: the docs, the azd template and its hooks.
REFERENCING_FILES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "azure.yaml")
TOP_LEVEL_FOLDERS = ("bench", "docs", "functions", "infra", "samples", "scripts", "shared", "tests", "tunegrid")
# A path in one of our folders (or README.md), optionally with an anchor: `infra/main.bicep`, `README.md#tear-down`.
_PATH_MENTION = re.compile(
    rf"(?<![\w./@-])(?:\./)?((?:{'|'.join(TOP_LEVEL_FOLDERS)})/[\w./-]*[\w/]|README\.md)(?:#([\w-]+))?"
)
_MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
# Mentions of a path that is not in a fresh clone, on purpose: another repository's file, or an output folder.
FOREIGN_PATHS = {
    ("README.md", "infra/app/processor.bicep"): "the Azure-Samples quickstart's module our app module follows",
    ("docs/run-page.md", "tests/artifacts/"): "where the browser tests write their screenshots (gitignored)",
}


def _referencing_files() -> list[Path]:
    return [*REFERENCING_FILES, *sorted(p for p in (ROOT / "scripts").iterdir() if p.is_file())]


def _heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (code blocks skipped; repeats get -1, -2, ...)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _references(path: Path) -> list[tuple[Path, str | None, str]]:
    """(target, anchor, as written) of every path and link in `path`: links relative to the file, paths to the root."""
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(ROOT).as_posix()
    found: list[tuple[Path, str | None, str]] = []
    for match in _PATH_MENTION.finditer(text):
        if (rel, match.group(1)) not in FOREIGN_PATHS:
            found.append((ROOT / match.group(1), match.group(2), match.group(0)))
    if path.suffix == ".md":
        for match in _MARKDOWN_LINK.finditer(text):
            target = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            found.append(((path.parent / file_part) if file_part else path, anchor or None, target))
    return found


@pytest.mark.parametrize("path", _referencing_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_path_and_link_resolves(path: Path) -> None:
    """Each path, link and Markdown anchor in the README, docs/, azure.yaml and scripts/ names something that exists."""
    broken: list[str] = []
    for target, anchor, written in _references(path):
        if not target.exists():
            broken.append(f"{written}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _heading_anchors(target):
            broken.append(f"{written}: no heading #{anchor} in {target.relative_to(ROOT).as_posix()}")
    assert not broken, f"{path.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_reference_scan_sees_the_deploy_pointers() -> None:
    """The scan finds what the hooks and azure.yaml point at, so a broken pointer cannot slip past it."""
    written = {w for p in _referencing_files() for _, _, w in _references(p)}
    assert {"README.md#prerequisites", "README.md#deploy-to-azure", "docs/deploy.md"} <= written
    assert "./scripts/post-deploy.sh" in written
    assert "docs/deploy.md#the-key-vault-soft-delete-and-purge-protection" in written
