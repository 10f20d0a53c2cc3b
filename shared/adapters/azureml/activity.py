"""Endpoint activity for the janitor: requests served since a time, from Azure Monitor (see
`observability.read_endpoint_activity`). Any failure to read it is `MetricsUnavailable`, and the
janitor then keeps the endpoint."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from shared.adapters.azureml.clients import AzureMLClients
from shared.adapters.azureml.observability import endpoint_resource_id, read_endpoint_activity
from shared.adapters.azureml.service_calls import Scope
from shared.domain.resources import EndpointActivity
from shared.errors import MetricsUnavailable, TunegridError


class ActivityMixin(AzureMLClients):
    """`get_endpoint_activity`."""

    def _metrics_client(self) -> Any:
        if self._metrics_client_factory is not None:
            return self._metrics_client_factory()
        from azure.monitor.querymetrics import MetricsClient

        location = str(getattr(self._workspace(), "location", "") or "")
        if not location:
            raise MetricsUnavailable(f"the location of workspace {self._settings.workspace_name} is unknown")
        kwargs: dict[str, Any] = {"retry_total": 0}
        if self._transport is not None:
            kwargs["transport"] = self._transport
        return MetricsClient(f"https://{location}.metrics.monitor.azure.com", self._credential, **kwargs)

    def get_endpoint_activity(self, endpoint: str, *, since: datetime) -> EndpointActivity:
        s = self._settings
        resource_id = endpoint_resource_id(s.subscription_id, s.resource_group, s.workspace_name, endpoint)
        scope = Scope("Monitoring Reader", "online endpoint", resource_id, "read its request metrics")
        try:
            return self._caller.call(
                lambda: read_endpoint_activity(self._metrics_client, resource_id, since=since),
                action=f"read the requests of endpoint {endpoint}",
                scope=scope,
            )
        except MetricsUnavailable:
            raise
        except TunegridError as exc:
            raise MetricsUnavailable(str(exc)) from exc
