"""Online endpoints and deployments: create, shift traffic, delete, read and list.

Nothing waits on a long-running operation: `begin_*` returns the poller's state now and later steps
read the resource's provisioning state. An existing endpoint or deployment is reported, not
re-created; deleting what is gone is a no-op.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from shared.adapters.azureml.clients import AzureMLClients, operation_now, service_word
from shared.adapters.azureml.model_lifecycle import ModelMetadata, SkuList, default_sku, sku_findings
from shared.adapters.azureml.model_tags import INFERENCE_ALLOW_LIST_TAG, parse_allow_list
from shared.domain.clock import parse_time
from shared.domain.naming import OWNER_TAG
from shared.domain.resources import (
    DeploymentInfo,
    DeploymentSpec,
    EndpointInfo,
    ModelRef,
    Operation,
    ProvisioningState,
)
from shared.errors import ComputeError, ConflictError, InvalidInput, NotFound

log = logging.getLogger(__name__)

MAX_REQUEST_TIMEOUT_MS = 180_000
_ENDPOINT_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9-]{1,30}[a-zA-Z0-9]")


def _created_at(entity: Any) -> datetime | None:
    """Endpoints keep `createdAt` in their properties; deployments in `creation_context`."""
    context = getattr(entity, "creation_context", None)
    if context is not None:
        raw = context.get("createdAt") if isinstance(context, Mapping) else getattr(context, "created_at", None)
        if raw:
            return parse_time(raw)
    properties = getattr(entity, "properties", None) or {}
    return parse_time(properties.get("createdAt")) if isinstance(properties, Mapping) else None


def _poller_error(poller: Any) -> str | None:
    """The error of a finished long-running operation, read from the poller's last answer."""
    try:
        response = getattr(poller.polling_method(), "_pipeline_response", None)
        doc = response.http_response.json() if response is not None else None
        error = (doc or {}).get("error") if isinstance(doc, Mapping) else None
        if isinstance(error, Mapping) and error.get("message"):
            return f"{error.get('code') or 'Error'}: {error['message']}"
    except Exception:  # the poller is ours to read only; a shape we do not know says nothing
        log.debug("could not read the operation's error", exc_info=True)
    return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _check_traffic(traffic: Mapping[str, int], mirror: Mapping[str, int]) -> None:
    for what, shares in (("traffic", traffic), ("mirror traffic", mirror)):
        for name, share in shares.items():
            if isinstance(share, bool) or not isinstance(share, int) or not 0 <= share <= 100:
                raise InvalidInput(f"{what} of {name} must be an integer percentage, got {share!r}")
    if sum(traffic.values()) not in (0, 100):
        raise InvalidInput(f"traffic must add up to 0 or 100 %, got {sum(traffic.values())} ({dict(traffic)})")
    if sum(mirror.values()) > 50:
        raise InvalidInput(f"mirror traffic may be at most 50 %, got {sum(mirror.values())}")
    both = sorted(n for n, share in mirror.items() if share and traffic.get(n))
    if both:
        raise InvalidInput(f"a deployment cannot take live and mirrored traffic at once: {', '.join(both)}")


def _check_name(kind: str, name: str) -> None:
    if not _ENDPOINT_NAME.fullmatch(name or ""):
        raise InvalidInput(
            f"{kind} name {name!r} is not valid in Azure: 3-32 characters, a letter first, letters, digits and hyphens, no trailing hyphen"
        )


class EndpointsMixin(AzureMLClients):
    """`list_endpoints`, `get_endpoint`, `get_deployment` and the `begin_*` endpoint and deployment
    operations."""

    def _deployment_info(self, endpoint: str, deployment: Any) -> DeploymentInfo:
        state = ProvisioningState.parse(service_word(deployment.provisioning_state))
        error = None
        if state == ProvisioningState.FAILED:
            detail = _poller_error(self._deployment_pollers.get((endpoint, deployment.name)))
            error = f"deployment {deployment.name} of endpoint {endpoint} is in provisioning state Failed" + (
                f": {detail}"
                if detail
                else f" (container logs: `az ml online-deployment get-logs -e {endpoint} -n {deployment.name}`)"
            )
        return DeploymentInfo(
            endpoint=endpoint,
            name=deployment.name,
            provisioning_state=state,
            model_id=str(deployment.model) if deployment.model else None,
            created_at=_created_at(deployment),
            instance_type=getattr(deployment, "instance_type", None),
            error=error,
            instance_count=_count(getattr(deployment, "instance_count", None)),
        )

    def _endpoint_info(self, endpoint: Any, deployments: list[Any]) -> EndpointInfo:
        return EndpointInfo(
            name=endpoint.name,
            provisioning_state=ProvisioningState.parse(service_word(endpoint.provisioning_state)),
            tags=dict(endpoint.tags or {}),
            created_at=_created_at(endpoint),
            scoring_uri=getattr(endpoint, "scoring_uri", None),
            traffic={k: int(v) for k, v in (endpoint.traffic or {}).items()},
            mirror_traffic={k: int(v) for k, v in (getattr(endpoint, "mirror_traffic", None) or {}).items()},
            deployments=tuple(self._deployment_info(endpoint.name, d) for d in deployments),
            location=str(getattr(endpoint, "location", "") or "") or None,
        )

    def _deployments_of(self, endpoint: str) -> list[Any]:
        return self._call(
            lambda: list(self._ws.online_deployments.list(endpoint)), f"list the deployments of endpoint {endpoint}"
        )

    def list_endpoints(self) -> list[EndpointInfo]:
        endpoints = self._call(lambda: list(self._ws.online_endpoints.list()), "list online endpoints")
        return [self._endpoint_info(e, self._deployments_of(e.name)) for e in endpoints]

    def get_endpoint(self, name: str) -> EndpointInfo | None:
        endpoint = self._endpoint_entity(name)
        return None if endpoint is None else self._endpoint_info(endpoint, self._deployments_of(name))

    def get_deployment(self, endpoint: str, name: str) -> DeploymentInfo | None:
        deployment = self._deployment_entity(endpoint, name)
        return None if deployment is None else self._deployment_info(endpoint, deployment)

    def begin_create_endpoint(self, name: str, *, tags: Mapping[str, str], description: str = "") -> Operation:
        _check_name("endpoint", name)
        existing = self._endpoint_entity(name)
        if existing is not None:
            state = ProvisioningState.parse(service_word(existing.provisioning_state))
            return Operation(kind="create-endpoint", target=name, status=state.value, done=not state.in_progress)
        from azure.ai.ml.entities import ManagedOnlineEndpoint

        entity = ManagedOnlineEndpoint(
            name=name,
            auth_mode="key",
            description=description or f"Tunegrid endpoint ({self._settings.instance})",
            tags={OWNER_TAG: self._settings.instance, **{str(k): str(v) for k, v in tags.items()}},
        )
        poller = self._call(lambda: self._ws.online_endpoints.begin_create_or_update(entity), f"create endpoint {name}")
        return operation_now("create-endpoint", name, poller)

    def _inference_skus(self, model: ModelRef) -> ModelMetadata:
        """The registered model with the inference SKU list registration copied from its base model."""
        entity = self._call(
            lambda: self._ws.models.get(model.name, version=model.version),
            f"read model {model.name}:{model.version}",
            what=f"model {model.name}:{model.version} in workspace {self._settings.workspace_name}",
        )
        ref = f"{model.name}:{model.version}"
        raw = (getattr(entity, "tags", None) or {}).get(INFERENCE_ALLOW_LIST_TAG)
        listed = parse_allow_list(ref, INFERENCE_ALLOW_LIST_TAG, raw)
        skus = SkuList(listed, f"its {INFERENCE_ALLOW_LIST_TAG} tag, from the base model") if listed else None
        return ModelMetadata(name=model.name, version=model.version, inference_skus=skus)

    def _instance_type(self, spec: DeploymentSpec) -> str:
        """The deployment's size: the one asked for, checked against the model's inference list and
        the retired families; else the list's first usable size. Errors raise ComputeError."""
        meta = self._inference_skus(spec.model)
        now = self._clock()
        if spec.instance_type:
            findings = sku_findings(
                spec.instance_type,
                meta.inference_skus,
                meta=meta,
                role="inference",
                where=f"deployment {spec.endpoint}/{spec.name}",
                now=now,
            )
            size: str | None = spec.instance_type
        else:
            size, findings = default_sku(
                meta.inference_skus,
                meta=meta,
                role="inference",
                setting="INFERENCE_INSTANCE_TYPE or the sidecar's deployment.instance_type",
            )
        errors = [f.message for f in findings if f.is_error]
        if errors or not size:
            raise ComputeError("; ".join(errors))
        for finding in findings:
            log.warning("deployment %s/%s: %s", spec.endpoint, spec.name, finding.message)
        return size

    def begin_create_deployment(self, spec: DeploymentSpec) -> Operation:
        _check_name("deployment", spec.name)
        target = f"{spec.endpoint}/{spec.name}"
        existing = self._deployment_entity(spec.endpoint, spec.name)
        if existing is not None:
            state = ProvisioningState.parse(service_word(existing.provisioning_state))
            return Operation(kind="create-deployment", target=target, status=state.value, done=not state.in_progress)
        instance_type = self._instance_type(spec)
        timeout_ms = spec.request_timeout_ms
        if timeout_ms > MAX_REQUEST_TIMEOUT_MS:
            log.warning("request_timeout_ms %d capped at %d (Azure's maximum)", timeout_ms, MAX_REQUEST_TIMEOUT_MS)
            timeout_ms = MAX_REQUEST_TIMEOUT_MS
        from azure.ai.ml.entities import ManagedOnlineDeployment, OnlineRequestSettings, ProbeSettings

        entity = ManagedOnlineDeployment(
            name=spec.name,
            endpoint_name=spec.endpoint,
            model=spec.model.id,
            instance_type=instance_type,
            instance_count=spec.instance_count,
            liveness_probe=ProbeSettings(initial_delay=spec.liveness_initial_delay_s),
            request_settings=OnlineRequestSettings(
                request_timeout_ms=timeout_ms,
                max_concurrent_requests_per_instance=spec.max_concurrent_requests_per_instance,
            ),
            tags={OWNER_TAG: self._settings.instance, **{str(k): str(v) for k, v in spec.tags.items()}},
        )
        poller = self._call(
            lambda: self._ws.online_deployments.begin_create_or_update(entity), f"create deployment {target}"
        )
        with self._lock:
            if len(self._deployment_pollers) > 100:  # keep the failed ones' errors; forget finished successes
                for key in [k for k, p in self._deployment_pollers.items() if p.done() and _poller_error(p) is None]:
                    del self._deployment_pollers[key]
            self._deployment_pollers[(spec.endpoint, spec.name)] = poller
        return operation_now("create-deployment", target, poller)

    def begin_set_traffic(
        self, endpoint: str, traffic: Mapping[str, int], *, mirror_traffic: Mapping[str, int] | None = None
    ) -> Operation:
        current = self._endpoint_entity(endpoint)
        if current is None:
            raise NotFound(f"endpoint {endpoint} not found in workspace {self._settings.workspace_name}")
        live = {k: int(v) for k, v in traffic.items() if v}
        mirror = {
            k: int(v)
            for k, v in (mirror_traffic if mirror_traffic is not None else (current.mirror_traffic or {})).items()
            if v
        }
        _check_traffic(live, mirror)
        known = set((current.traffic or {}).keys())
        unknown = sorted(n for n in {*live, *mirror} if n not in known)
        if unknown:
            raise NotFound(f"endpoint {endpoint} has no deployment named {', '.join(unknown)}")
        now_live = {k: int(v) for k, v in (current.traffic or {}).items() if v}
        now_mirror = {k: int(v) for k, v in (current.mirror_traffic or {}).items() if v}
        if now_live == live and now_mirror == mirror:
            return Operation(kind="set-traffic", target=endpoint, status="Succeeded", done=True)
        from azure.ai.ml.entities import ManagedOnlineEndpoint

        # A fresh entity, as in the notebook (`endpoint.traffic = {...}` then begin_create_or_update):
        # the one read back carries read-only properties (createdAt, ...) that must not be sent.
        entity = ManagedOnlineEndpoint(
            name=endpoint,
            auth_mode=current.auth_mode or "key",
            description=current.description,
            tags=dict(current.tags or {}),
            identity=current.identity,
            traffic=live,
            mirror_traffic=mirror,
        )
        poller = self._call(
            lambda: self._ws.online_endpoints.begin_create_or_update(entity), f"set the traffic of endpoint {endpoint}"
        )
        return operation_now("set-traffic", endpoint, poller)

    def begin_delete_deployment(self, endpoint: str, name: str) -> Operation:
        target = f"{endpoint}/{name}"
        deployment = self._deployment_entity(endpoint, name)
        if deployment is None:
            return Operation(kind="delete-deployment", target=target, status="Deleted", done=True)
        if ProvisioningState.parse(service_word(deployment.provisioning_state)) == ProvisioningState.DELETING:
            return Operation(kind="delete-deployment", target=target, status="Deleting", done=False)
        current = self._endpoint_entity(endpoint)
        share = int((current.traffic or {}).get(name, 0) or 0) if current is not None else 0
        mirrored = int((getattr(current, "mirror_traffic", None) or {}).get(name, 0) or 0) if current is not None else 0
        if share or mirrored:
            raise ConflictError(
                f"deployment {target} still takes {share} % live and {mirrored} % mirrored traffic; shift it away before deleting"
            )
        poller = self._call(
            lambda: self._ws.online_deployments.begin_delete(name=name, endpoint_name=endpoint),
            f"delete deployment {target}",
        )
        return operation_now("delete-deployment", target, poller)

    def begin_delete_endpoint(self, name: str) -> Operation:
        endpoint = self._endpoint_entity(name)
        if endpoint is None:
            return Operation(kind="delete-endpoint", target=name, status="Deleted", done=True)
        if ProvisioningState.parse(service_word(endpoint.provisioning_state)) == ProvisioningState.DELETING:
            return Operation(kind="delete-endpoint", target=name, status="Deleting", done=False)
        poller = self._call(lambda: self._ws.online_endpoints.begin_delete(name=name), f"delete endpoint {name}")
        return operation_now("delete-endpoint", name, poller)
