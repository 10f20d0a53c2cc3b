"""Scoring: an endpoint's URI and key (or AML token), kept in memory for a while, and the POST to
its scoring URI. A refused key drops the cached one, so regenerated keys are picked up."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from azure.core.rest import HttpRequest

from shared.adapters.azureml.clients import AzureMLClients, service_word
from shared.adapters.azureml.service_calls import send_scoring_request
from shared.domain.clock import parse_time, utcnow
from shared.domain.resources import EndpointCredentials
from shared.errors import BackendError, NotFound, UpstreamError


class ScoringMixin(AzureMLClients):
    """`get_credentials` and `invoke`."""

    def get_credentials(self, endpoint: str) -> EndpointCredentials:
        entity = self._endpoint_entity(endpoint)
        if entity is None:
            raise NotFound(f"endpoint {endpoint} not found in workspace {self._settings.workspace_name}")
        if not getattr(entity, "scoring_uri", None):
            raise BackendError(
                f"endpoint {endpoint} has no scoring URI yet (provisioning state {service_word(entity.provisioning_state)})"
            )
        keys = self._call(lambda: self._ws.online_endpoints.get_keys(endpoint), f"read the keys of endpoint {endpoint}")
        primary = getattr(keys, "primary_key", None) or getattr(keys, "secondary_key", None)
        if primary:
            return EndpointCredentials(scoring_uri=entity.scoring_uri, key=primary)
        token = getattr(keys, "access_token", None)
        if not token:
            raise BackendError(f"endpoint {endpoint} returned neither a key nor a token")
        return EndpointCredentials(
            scoring_uri=entity.scoring_uri,
            key=token,
            expires_at=parse_time(getattr(keys, "expiry_time_utc", None) or None),
        )

    def _cached_credentials(self, endpoint: str) -> EndpointCredentials:
        now = time.monotonic()
        with self._lock:
            hit = self._credentials_cache.get(endpoint)
        if hit is not None and hit[0] > now:
            return hit[1]
        creds = self.get_credentials(endpoint)
        ttl = float(self._settings.proxy_credential_ttl_s)
        if creds.expires_at is not None:
            ttl = min(ttl, (creds.expires_at - utcnow()).total_seconds() - 60)
        if ttl > 0:
            with self._lock:
                self._credentials_cache[endpoint] = (now + ttl, creds)
        return creds

    def invoke(
        self, endpoint: str, body: Mapping[str, Any], *, deployment: str | None = None, timeout_s: float = 90.0
    ) -> Any:
        """POST the body to the endpoint's scoring URI with its key; `deployment` targets one
        deployment by name (header `azureml-model-deployment`), bypassing the traffic split."""
        creds = self._cached_credentials(endpoint)
        headers = {
            **creds.headers(deployment=deployment),
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        request = HttpRequest("POST", creds.scoring_uri, json=dict(body), headers=headers)
        where = f"endpoint {endpoint}" + (f" deployment {deployment}" if deployment else "")
        response = send_scoring_request(self._scoring_http(), request, where=where, timeout_s=timeout_s)
        status = response.status_code
        if status in (401, 403):
            with self._lock:
                self._credentials_cache.pop(endpoint, None)
            raise UpstreamError(
                f"{where} refused the key (HTTP {status}); the keys may have been regenerated", status=status
            )
        if status >= 400:
            text = response.text()[:300] if response.content else ""
            raise UpstreamError(f"{where} answered HTTP {status}: {text}", status=status)
        try:
            return response.json()
        except ValueError:
            return response.text()
