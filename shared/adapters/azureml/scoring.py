"""Scoring: an endpoint's URI and key (or AML token). Nothing here calls the endpoint or caches the key:
every endpoint call goes through the `Upstream` port (`shared.adapters.endpoint_credentials`), which
caches these credentials once per process and refetches them after a 401."""

from __future__ import annotations

from shared.adapters.azureml.clients import AzureMLClients, service_word
from shared.domain.clock import parse_time
from shared.domain.resources import EndpointCredentials
from shared.errors import BackendError, NotFound


class ScoringMixin(AzureMLClients):
    """`get_credentials`."""

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
