"""What the doctor checks: the app's settings plus where the app was deployed, from four layers.

Highest first: command-line flags; the process environment; the azd environment (`.azure/<env>/.env`,
the values `azd up` wrote: the template's outputs and the parameters it was given); `local.settings.json`
(else the sample), as every CLI command reads it. An empty value never hides one from a lower layer.

The azd environment names the workspace's resource group `AZUREML_RESOURCE_GROUP` (the app setting is
`AZURE_RESOURCE_GROUP`, which azd may also set, to the app's own group): it is read as the setting. The
Function App (`AZURE_FUNCTION_NAME`, `RESOURCE_GROUP`, `SERVICE_API_URI`), its data storage account
(`AZURE_STORAGE_ACCOUNT_NAME`) and the training container (`TRAINING_CONTAINER_NAME`) come from there too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values

from shared.errors import ConfigError
from shared.settings import TRAINING_CONTAINER, Settings
from tunegrid.devhost.config import load_local_settings

AZD_DIR = ".azure"


@dataclass(frozen=True)
class AppTarget:
    """The deployed Function App, as far as it is known (empty strings: unknown)."""

    function_name: str = ""
    resource_group: str = ""
    host: str = ""
    storage_account: str = ""
    training_container: str = TRAINING_CONTAINER
    principal_id: str = ""
    principal_source: str = ""


@dataclass(frozen=True)
class Target:
    settings: Settings
    app: AppTarget
    sources: tuple[str, ...] = ()
    flags: Mapping[str, str] = field(default_factory=dict)

    @property
    def subscription(self) -> str:
        return self.settings.subscription_id

    @property
    def workspace_id(self) -> str:
        s = self.settings
        return (
            f"/subscriptions/{s.subscription_id}/resourceGroups/{s.resource_group}"
            f"/providers/Microsoft.MachineLearningServices/workspaces/{s.workspace_name}"
        )

    @property
    def storage_id(self) -> str:
        a = self.app
        if not (a.storage_account and a.resource_group):
            return ""
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{a.resource_group}"
            f"/providers/Microsoft.Storage/storageAccounts/{a.storage_account}"
        )

    @property
    def site_id(self) -> str:
        a = self.app
        if not (a.function_name and a.resource_group):
            return ""
        return f"/subscriptions/{self.subscription}/resourceGroups/{a.resource_group}/providers/Microsoft.Web/sites/{a.function_name}"


def azd_environment(root: Path, name: str | None) -> tuple[dict[str, str], str]:
    """The values of azd environment `name` (default: `AZURE_ENV_NAME`, else the default environment of
    `.azure/config.json`) and a label for it; nothing when there is no azd environment and none was asked."""
    folder = root / AZD_DIR
    chosen = name
    if not chosen:
        config = folder / "config.json"
        if config.is_file():
            try:
                chosen = str(json.loads(config.read_text(encoding="utf-8")).get("defaultEnvironment") or "")
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read {config}: {exc}") from exc
    if not chosen:
        return {}, ""
    path = folder / chosen / ".env"
    if not path.is_file():
        if name:
            raise ConfigError(f"azd environment {name!r} has no {path} (run `azd env list` to see the environments)")
        return {}, ""
    values = {k: v for k, v in dotenv_values(path).items() if v is not None}
    return values, f"azd env {chosen} ({path.relative_to(root)})"


def _nonempty(values: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in values.items() if v is not None and str(v).strip()}


def _from_azd(values: Mapping[str, str]) -> dict[str, str]:
    out = dict(values)
    out.pop("AZURE_RESOURCE_GROUP", None)
    if values.get("AZUREML_RESOURCE_GROUP"):
        out["AZURE_RESOURCE_GROUP"] = values["AZUREML_RESOURCE_GROUP"]
    return out


FLAG_SETTINGS = {
    "subscription": "AZURE_SUBSCRIPTION_ID",
    "resource_group": "AZURE_RESOURCE_GROUP",
    "workspace": "AZUREML_WORKSPACE_NAME",
}


def resolve_target(
    *,
    root: Path,
    environ: Mapping[str, str],
    azd_env: str | None = None,
    flags: Mapping[str, str | None] | None = None,
    principal_id: str = "",
) -> Target:
    """Merge the layers (see the module docstring); a missing workspace coordinate is a ConfigError
    naming the flag and the setting."""
    local = load_local_settings(root=root, fallback_level=logging.DEBUG)
    azd, azd_label = azd_environment(root, azd_env or environ.get("AZURE_ENV_NAME"))
    given = {FLAG_SETTINGS[k]: str(v) for k, v in (flags or {}).items() if v and k in FLAG_SETTINGS}
    merged = {
        **_nonempty(local.values),
        **_nonempty(_from_azd(azd)),
        **_nonempty(dict(environ)),
        **given,
    }
    merged["FINETUNE_BACKEND"] = "local"  # the azure-only checks below name the flags too
    settings = Settings.from_env(merged)
    missing = [
        f"{setting} (--{flag.replace('_', '-')})"
        for flag, setting in FLAG_SETTINGS.items()
        if not getattr(settings, _ATTRS[setting])
    ]
    if missing:
        raise ConfigError(
            f"which workspace? missing {', '.join(missing)}: run in the folder of `azd up` (its .azure/ "
            "environment), set them in local.settings.json or the environment, or pass the flags"
        )
    sources = [s for s in ("flags" if given else "", "environment", azd_label) if s]
    if local.source is not None:
        sources.append(local.source.name)
    uri = merged.get("SERVICE_API_URI", "")
    app = AppTarget(
        function_name=merged.get("AZURE_FUNCTION_NAME", ""),
        resource_group=merged.get("RESOURCE_GROUP", ""),
        host=(urlsplit(uri).hostname or "") if uri else "",
        storage_account=merged.get("AZURE_STORAGE_ACCOUNT_NAME", ""),
        training_container=merged.get("TRAINING_CONTAINER_NAME", TRAINING_CONTAINER),
        principal_id=principal_id,
        principal_source="--principal-id" if principal_id else "",
    )
    return Target(settings=settings, app=app, sources=tuple(sources), flags=given)


_ATTRS = {
    "AZURE_SUBSCRIPTION_ID": "subscription_id",
    "AZURE_RESOURCE_GROUP": "resource_group",
    "AZUREML_WORKSPACE_NAME": "workspace_name",
}
