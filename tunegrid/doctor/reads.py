"""The doctor's only I/O: GETs (and one POST, `getFullUrl`) against ARM and the registry, as the caller.

One azure-core pipeline with an ARM bearer token (`observability.http_client`, as the backend builds
it), no retry policy of its own: throttling and 5xx go through `ServiceCaller` (bounded backoff,
Retry-After); any other error answer becomes `ReadError` with the service's code and message (never
the request, whose headers carry the token). A token that cannot be had at all is `SignInError`.

The registry is read the way azure-ai-ml reads it (discovery, then the registry's management front
end with api-version 2021-10-01-dataplanepreview; the label `latest` is the newest version by
creation time), so a registry answer seen here is the one the backend sees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

from azure.core.credentials import TokenCredential
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ODataV4Format
from azure.core.pipeline.transport import HttpTransport
from azure.core.rest import HttpRequest

from shared.adapters.azureml.observability import ARM_ENDPOINT, ARM_SCOPE, http_client
from shared.adapters.azureml.service_calls import RETRY_STATUSES, Scope, ServiceCaller
from shared.errors import TunegridError
from tunegrid.doctor.events import WebhookTarget, webhook_target

T = TypeVar("T")

ML_API = "2024-04-01"
AUTHORIZATION_API = "2022-04-01"
EVENTGRID_API = "2025-02-15"
WEB_API = "2023-12-01"
REGISTRY_API = "2021-10-01-dataplanepreview"
REGISTRY_DISCOVERY = "https://eastus.api.azureml.ms"
"""azure-ai-ml's registry discovery endpoint for the public cloud (`_azure_environments`, AzureCloud)."""
MFE_PATH = "mferp/managementfrontend"
MAX_PAGES = 20

_SCOPE = Scope("Reader", "resource", "(doctor read)", "read it")
"""`ServiceCaller.call` wants a scope for the errors it translates; the doctor raises its own first."""


class SignInError(Exception):
    """No token for the caller (not signed in, or a credential that cannot reach Entra ID). Not a
    `TunegridError` on purpose: each check turns those into a row, while this one ends the run."""


class ReadError(TunegridError):
    """Azure answered an error; `status` and `code` say which."""

    def __init__(self, message: str, *, status: int, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def refused(self) -> bool:
        return self.status in (401, 403)

    @property
    def not_found(self) -> bool:
        return self.status == 404


def _error(response: Any, action: str) -> ReadError:
    exc = HttpResponseError(response=response, error_format=ODataV4Format)
    code = str(getattr(exc.error, "code", "") or "")
    message = str(getattr(exc.error, "message", "") or "") or (response.reason or "")
    said = f"{code}: {message}" if code else message
    return ReadError(f"{action}: HTTP {response.status_code} ({said.strip()})", status=response.status_code, code=code)


@dataclass(frozen=True)
class Registry:
    """Where a registry's assets are read (from its discovery answer)."""

    name: str
    base: str
    """`https://<region host>/mferp/managementfrontend/subscriptions/.../registries/<name>`."""


class AzureReads:
    """Typed reads for the checks; every method returns the service's JSON document (or a reduced
    value where the full answer holds a secret)."""

    def __init__(
        self,
        credential: TokenCredential,
        *,
        transport: HttpTransport | None = None,
        caller: ServiceCaller | None = None,
    ) -> None:
        self._client = http_client(transport, credential=credential, scope=ARM_SCOPE)
        self._caller = caller or ServiceCaller(attempts=3, timeout_s=60.0, max_wait_s=20.0)

    # -- transport ------------------------------------------------------------------------------------
    def _send(self, method: str, url: str, params: Mapping[str, str] | None, action: str) -> Any:
        def once() -> Any:
            absolute = url if url.startswith("https://") else f"{ARM_ENDPOINT}{url}"
            try:
                response = self._client.send_request(HttpRequest(method, absolute, params=dict(params or {})))
            except ClientAuthenticationError as exc:
                if exc.response is None:
                    first = (str(exc).splitlines() or [type(exc).__name__])[0]
                    raise SignInError(f"could not get a token to {action}: {first}") from None
                raise
            if response.status_code in RETRY_STATUSES:
                raise HttpResponseError(response=response, error_format=ODataV4Format)
            if response.status_code >= 400:
                raise _error(response, action)
            return response.json() if response.content else {}

        return self._call(once, action)

    def _call(self, fn: Callable[[], T], action: str) -> T:
        return self._caller.call(fn, action=action, scope=_SCOPE)

    def get(self, url: str, *, params: Mapping[str, str] | None = None, action: str) -> Any:
        return self._send("GET", url, params, action)

    def pages(self, url: str, *, params: Mapping[str, str] | None = None, action: str) -> list[Any]:
        """Every `value` item, following `nextLink` (which carries its own query) for a bounded number of pages."""
        items: list[Any] = []
        doc = self.get(url, params=params, action=action)
        for _ in range(MAX_PAGES):
            items += list(doc.get("value") or [])
            next_link = doc.get("nextLink")
            if not next_link:
                break
            doc = self.get(str(next_link), action=action)
        return items

    # -- ARM ------------------------------------------------------------------------------------------
    def workspace(self, workspace_id: str) -> Any:
        return self.get(workspace_id, params={"api-version": ML_API}, action="read the workspace")

    def permissions(self, scope: str) -> list[Any]:
        return self.pages(
            f"{scope}/providers/Microsoft.Authorization/permissions",
            params={"api-version": AUTHORIZATION_API},
            action="read your permissions on the workspace",
        )

    def role_assignments(self, scope: str, principal_id: str) -> list[Any]:
        return self.pages(
            f"{scope}/providers/Microsoft.Authorization/roleAssignments",
            params={"api-version": AUTHORIZATION_API, "$filter": f"principalId eq '{principal_id}'"},
            action=f"list the role assignments of {principal_id}",
        )

    def role_definition(self, role_definition_id: str) -> Any:
        return self.get(role_definition_id, params={"api-version": AUTHORIZATION_API}, action="read a role definition")

    def site(self, subscription: str, resource_group: str, name: str) -> Any:
        return self.get(
            f"/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Web/sites/{name}",
            params={"api-version": WEB_API},
            action=f"read the Function App {name}",
        )

    def usages(self, subscription: str, region: str) -> list[Any]:
        return self.pages(
            f"/subscriptions/{subscription}/providers/Microsoft.MachineLearningServices/locations/{region}/usages",
            params={"api-version": ML_API},
            action=f"read the Azure ML vCPU usages of {region}",
        )

    def vm_sizes(self, subscription: str, region: str) -> Any:
        return self.get(
            f"/subscriptions/{subscription}/providers/Microsoft.MachineLearningServices/locations/{region}/vmSizes",
            params={"api-version": ML_API},
            action=f"read the Azure ML VM sizes of {region}",
        )

    def compute(self, workspace_id: str, name: str) -> Any:
        return self.get(
            f"{workspace_id}/computes/{name}", params={"api-version": ML_API}, action=f"read compute {name}"
        )

    def system_topics(self, subscription: str) -> list[Any]:
        return self.pages(
            f"/subscriptions/{subscription}/providers/Microsoft.EventGrid/systemTopics",
            params={"api-version": EVENTGRID_API},
            action="list the Event Grid system topics",
        )

    def event_subscriptions(self, topic_id: str) -> list[Any]:
        return self.pages(
            f"{topic_id}/eventSubscriptions",
            params={"api-version": EVENTGRID_API},
            action=f"list the event subscriptions of {topic_id.rsplit('/', 1)[-1]}",
        )

    def webhook_target(self, topic_id: str, subscription_name: str) -> WebhookTarget:
        """Where a webhook subscription delivers, from `getFullUrl`, reduced at once (the URL's `code` is a key)."""
        doc = self._send(
            "POST",
            f"{topic_id}/eventSubscriptions/{subscription_name}/getFullUrl",
            {"api-version": EVENTGRID_API},
            f"read where {subscription_name} delivers (getFullUrl)",
        )
        return webhook_target(str(doc.get("endpointUrl") or ""))

    # -- registry -------------------------------------------------------------------------------------
    def registry(self, name: str) -> Registry:
        doc = self.get(
            f"{REGISTRY_DISCOVERY}/registrymanagement/v1.0/registries/{quote(name)}/discovery",
            params={"api-version": "v1.0"},
            action=f"find registry {name}",
        )
        host = str(doc.get("primaryRegionResourceProviderUri") or "").rstrip("/")
        if not host.startswith("https://"):
            raise ReadError(f"registry {name}: its discovery answer names no resource provider URI", status=200)
        base = (
            f"{host}/{MFE_PATH}/subscriptions/{doc.get('subscriptionId')}/resourceGroups/{doc.get('resourceGroup')}"
            f"/providers/Microsoft.MachineLearningServices/registries/{name}"
        )
        return Registry(name=name, base=base)

    def _asset_version(self, registry: Registry, kind: str, name: str, *, version: str, label: str) -> Any:
        path = f"{registry.base}/{kind}/{quote(name)}/versions"
        what = (
            f"{kind[:-1]} {name} ({f'version {version}' if version else f'label {label}'}) in registry {registry.name}"
        )
        if version:
            return self.get(f"{path}/{quote(version)}", params={"api-version": REGISTRY_API}, action=f"read {what}")
        if label != "latest":
            raise ReadError(f"{what}: a registry resolves only the label latest; pin a version instead", status=400)
        doc = self.get(
            path,
            params={"api-version": REGISTRY_API, "$orderBy": "createdtime desc", "$top": "1"},
            action=f"read {what}",
        )
        newest = list(doc.get("value") or [])
        if not newest:
            raise ReadError(f"read {what}: the registry lists no version", status=404)
        return newest[0]

    def model_version(self, registry: Registry, name: str, *, version: str = "", label: str = "latest") -> Any:
        return self._asset_version(registry, "models", name, version=version, label=label)

    def component_version(self, registry: Registry, name: str, *, version: str = "", label: str = "latest") -> Any:
        return self._asset_version(registry, "components", name, version=version, label=label)

    def models(self, registry: Registry) -> list[Any]:
        return self.pages(
            f"{registry.base}/models",
            params={"api-version": REGISTRY_API},
            action=f"list the models of registry {registry.name}",
        )
