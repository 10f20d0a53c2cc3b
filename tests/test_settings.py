"""Settings: parsed once with clear errors, documented everywhere, never printed with secrets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.settings import SETTINGS, Settings, storage_connection_values

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
