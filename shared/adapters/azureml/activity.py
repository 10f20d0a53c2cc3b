"""Endpoint activity for the janitor: requests served since a time, from Azure Monitor's per-resource
metrics API (see `observability.read_endpoint_activity`). Throttling (429, 503, 529) is retried with
backoff by `ServiceCaller`; any failure to read, or an answer that cannot tell idle from unknown, is
`MetricsUnavailable`, and the janitor then keeps the endpoint."""

from __future__ import annotations

from datetime import datetime

from shared.adapters.azureml.clients import AzureMLClients
from shared.adapters.azureml.observability import endpoint_resource_id, read_endpoint_activity
from shared.adapters.azureml.service_calls import Scope
from shared.domain.resources import EndpointActivity
from shared.errors import MetricsUnavailable, TunegridError


class ActivityMixin(AzureMLClients):
    """`get_endpoint_activity`."""

    def get_endpoint_activity(self, endpoint: str, *, since: datetime) -> EndpointActivity:
        s = self._settings
        resource_id = endpoint_resource_id(s.subscription_id, s.resource_group, s.workspace_name, endpoint)
        scope = Scope(
            "Monitoring Reader",
            "online endpoint (or its workspace)",
            resource_id,
            "read its request metrics through the per-resource metrics API",
        )
        try:
            return self._caller.call(
                lambda: read_endpoint_activity(self._arm_http(), resource_id, since=since, now=self._clock()),
                action=f"read the requests of endpoint {endpoint}",
                scope=scope,
            )
        except MetricsUnavailable:
            raise
        except TunegridError as exc:
            raise MetricsUnavailable(str(exc)) from exc
