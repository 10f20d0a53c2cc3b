"""Settings: parsed once with clear errors, documented everywhere, never printed with secrets."""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.settings import SETTINGS, SettingDoc, Settings, storage_connection_values

ROOT = Path(__file__).resolve().parent.parent
LOCAL_OVERRIDES = {"ROLLOUT_SCHEDULE", "PROXY_API_KEYS"}
"""Sample values that differ from the Azure defaults on purpose (a faster tick, a dev key)."""


def test_sample_settings_list_every_setting_with_its_default() -> None:
    """local.settings.sample.json has every app setting, with the code's default unless noted."""
    values = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    for s in SETTINGS:
        assert s.name in values, s.name
        if s.name not in LOCAL_OVERRIDES:
            assert values[s.name] == s.default, s.name
    assert Settings.from_env(values).backend == "local"


def test_readme_documents_every_setting() -> None:
    """The README's configuration table names every setting the code reads."""
    readme = (ROOT / "README.md").read_text()
    missing = [s.name for s in SETTINGS if f"`{s.name}`" not in readme]
    assert missing == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FINETUNE_BACKEND": "sagemaker"}, "FINETUNE_BACKEND must be"),
        ({"IDLE_MINUTES": "soon"}, "IDLE_MINUTES must be an integer"),
        ({"REQUEST_TIMEOUT_MS": "200000"}, "between 1 and 180000"),
        ({"MIRROR_TRAFFIC_PERCENT": "60"}, "between 0 and 50"),
        ({"PROXY_UPSTREAM_TIMEOUT_S": "230"}, "229"),
        ({"JANITOR_DRY_RUN": "maybe"}, "true or false"),
        ({"FINETUNE_BACKEND": "azureml"}, "AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, AZUREML_WORKSPACE_NAME"),
    ],
)
def test_bad_settings_fail_with_the_setting_name(env: dict[str, str], message: str) -> None:
    """A bad value names the setting and what is expected."""
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_repr_hides_keys_and_connection_strings() -> None:
    """Settings can be logged: keys and connection strings are never shown."""
    settings = Settings.from_env(
        {
            "PROXY_API_KEYS": "sk-one,sk-two",
            "DataStorage": "AccountKey=c2VjcmV0;",
            "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=abc",
        }
    )
    text = repr(settings)
    assert settings.proxy_api_keys == ("sk-one", "sk-two")
    for secret in ("sk-one", "sk-two", "c2VjcmV0", "InstrumentationKey=abc"):
        assert secret not in text


def test_connection_identity_form_and_fallback() -> None:
    """`DataStorage__*` identity settings are read; without them the host's storage is used."""
    env = {
        "DataStorage__blobServiceUri": "https://a.blob.core.windows.net",
        "DataStorage__credential": "managedidentity",
        "AzureWebJobsStorage": "UseDevelopmentStorage=true",
    }
    assert storage_connection_values(env, "DataStorage") == {
        "blobServiceUri": "https://a.blob.core.windows.net",
        "credential": "managedidentity",
    }
    assert storage_connection_values({"AzureWebJobsStorage": "x"}, "DataStorage") == {"": "x"}


INTEGER_SETTINGS = [s.name for s in SETTINGS if s.default.isdigit()]


@pytest.mark.parametrize("name", INTEGER_SETTINGS)
def test_every_integer_setting_rejects_a_non_integer(name: str) -> None:
    """Each integer setting answers a malformed value with the same clear error, naming it and the value."""
    with pytest.raises(ConfigError) as exc:
        Settings.from_env({name: "12 apples"})
    assert str(exc.value) == f"setting {name} must be an integer, got '12 apples'"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SMOKE_ROWS": "three"}, "setting SMOKE_ROWS must be an integer, got 'three'"),
        ({"AZUREML_GPUS_PER_NODE": "two"}, "setting AZUREML_GPUS_PER_NODE must be an integer, got 'two'"),
        ({"JANITOR_DRY_RUN": "Perhaps"}, "setting JANITOR_DRY_RUN must be true or false, got 'perhaps'"),
        ({"TEST_SPLIT_PERCENT": "0"}, "setting TEST_SPLIT_PERCENT must be between 1 and 50, got 0"),
        ({"TEST_SPLIT_PERCENT": "51"}, "setting TEST_SPLIT_PERCENT must be between 1 and 50, got 51"),
        ({"REQUEST_TIMEOUT_MS": "0"}, "setting REQUEST_TIMEOUT_MS must be between 1 and 180000, got 0"),
        ({"MIRROR_TRAFFIC_PERCENT": "-1"}, "setting MIRROR_TRAFFIC_PERCENT must be between 0 and 50, got -1"),
        (
            {"PROXY_UPSTREAM_TIMEOUT_S": "0"},
            "setting PROXY_UPSTREAM_TIMEOUT_S must be between 1 and 229 (the HTTP limit is 230 s), got 0",
        ),
        ({"FINETUNE_BACKEND": "SageMaker"}, "setting FINETUNE_BACKEND must be 'local' or 'azureml', got 'sagemaker'"),
    ],
)
def test_malformed_values_of_each_kind_give_one_clear_error(env: dict[str, str], message: str) -> None:
    """An integer, a flag, a range or a choice that is wrong: the whole message, exactly."""
    with pytest.raises(ConfigError) as exc:
        Settings.from_env(env)
    assert str(exc.value) == message


def test_every_bad_setting_is_named_at_once() -> None:
    """Several bad values give one error that lists each of them, in declaration order."""
    with pytest.raises(ConfigError) as exc:
        Settings.from_env({"IDLE_MINUTES": "soon", "TEST_SPLIT_PERCENT": "90", "JANITOR_DRY_RUN": "maybe"})
    assert str(exc.value) == (
        "setting TEST_SPLIT_PERCENT must be between 1 and 50, got 90; "
        "setting IDLE_MINUTES must be an integer, got 'soon'; "
        "setting JANITOR_DRY_RUN must be true or false, got 'maybe'"
    )


AZURE = {"AZURE_SUBSCRIPTION_ID": "sub", "AZURE_RESOURCE_GROUP": "rg", "AZUREML_WORKSPACE_NAME": "ws"}


def _other_value(name: str, default: str) -> str:
    if name == "FINETUNE_BACKEND":
        return "azureml"
    if name == "JANITOR_DRY_RUN":
        return "true"
    if default.isdigit():
        return str(int(default) + 1)
    if name == "MAX_RUN_COST_USD":
        return "25"
    if default.replace(".", "", 1).isdigit():
        return str(float(default) / 2)
    return "7" if name == "AZUREML_GPUS_PER_NODE" else default + "-x"


@pytest.mark.parametrize("doc", SETTINGS, ids=lambda s: s.name)
def test_each_setting_feeds_exactly_one_attribute(doc: SettingDoc) -> None:
    """Declared once: changing one setting changes one attribute of Settings, and unset means the default."""
    base = Settings.from_env(AZURE)
    changed = Settings.from_env({**AZURE, doc.name: _other_value(doc.name, doc.default)})
    differing = [f.name for f in fields(Settings) if getattr(base, f.name) != getattr(changed, f.name)]
    assert len(differing) == 1, differing
    assert Settings.from_env({doc.name: doc.default}) == Settings.from_env({})


def test_settings_list_and_dataclass_agree() -> None:
    """SETTINGS names each setting once; every Settings field but the storage connection is one of them."""
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    assert len(fields(Settings)) == len(SETTINGS) + 1
    assert "storage_connection" in {f.name for f in fields(Settings)}


def test_blank_values() -> None:
    """A blank number, flag or instance means the default; blank text stays blank (no webhook, no keys)."""
    settings = Settings.from_env(
        {"SMOKE_ROWS": " ", "JANITOR_DRY_RUN": "", "TUNEGRID_INSTANCE": "", "LOCAL_EVENT_WEBHOOK_URL": ""}
    )
    assert (settings.smoke_rows, settings.janitor_dry_run, settings.instance) == (3, False, "tunegrid")
    assert settings.local_event_webhook_url == ""
    assert Settings.from_env({"SMOKE_ROWS": " 5 ", "JANITOR_DRY_RUN": " YES"}).smoke_rows == 5
    assert Settings.from_env({"AZUREML_GPUS_PER_NODE": ""}).gpus_per_node is None


def test_azureml_needs_the_workspace_settings_even_when_blank() -> None:
    """FINETUNE_BACKEND=azureml with a blank workspace setting names the missing one."""
    with pytest.raises(ConfigError, match=r"needs settings: AZUREML_WORKSPACE_NAME$"):
        Settings.from_env({**AZURE, "FINETUNE_BACKEND": "azureml", "AZUREML_WORKSPACE_NAME": " "})
    assert Settings.from_env({**AZURE, "FINETUNE_BACKEND": "AzureML"}).backend == "azureml"


def test_an_unresolved_key_vault_reference_is_no_key(caplog: pytest.LogCaptureFixture) -> None:
    """App Service passes an unresolvable Key Vault reference through as text: it must not become a key."""
    reference = "@Microsoft.KeyVault(SecretUri=https://kv.vault.azure.net/secrets/proxy-keys/)"
    with caplog.at_level(logging.ERROR, logger="shared.settings"):
        settings = Settings.from_env({"PROXY_API_KEYS": reference})
    assert settings.proxy_api_keys == ()
    assert "unresolved Key Vault reference" in caplog.text
    assert reference not in caplog.text
    assert Settings.from_env({"PROXY_API_KEYS": " a , b "}).proxy_api_keys == ("a", "b")
