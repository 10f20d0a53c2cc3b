"""`AzureMLBackend`: the seed notebook's Azure ML workflow behind the `FineTuneBackend` port.

Nothing here waits on a long-running operation: `begin_*` SDK calls return a poller whose state is
reported in an `Operation` (azure-core keeps polling on its own daemon thread, which never blocks
the caller); later steps read the resource's provisioning state. Every call checks before it acts,
so a repeated event is a no-op: the job name is deterministic and looked up first; a registered
model version is read first; an existing endpoint or deployment is reported, not re-created.

The class is assembled from one mixin per part of the port, all over `AzureMLClients` (the clients
and the state they share): `jobs`, `models`, `endpoints`, `scoring`, `activity`.
"""

from __future__ import annotations

from collections.abc import Mapping

from azure.core.pipeline.transport import HttpTransport

from shared.adapters.azureml.activity import ActivityMixin
from shared.adapters.azureml.clients import build_credential
from shared.adapters.azureml.endpoints import EndpointsMixin
from shared.adapters.azureml.jobs import JobsMixin
from shared.adapters.azureml.models import ModelsMixin
from shared.adapters.azureml.scoring import ScoringMixin
from shared.settings import Settings


class AzureMLBackend(JobsMixin, ModelsMixin, EndpointsMixin, ScoringMixin, ActivityMixin):
    """The port over azure-ai-ml. Build it with `from_settings`; tests inject a transport (or
    clients) and a fake `TokenCredential`."""

    name = "azureml"

    @classmethod
    def from_settings(
        cls, settings: Settings, *, env: Mapping[str, str] | None = None, transport: HttpTransport | None = None
    ) -> AzureMLBackend:
        """Builds clients only; no request is sent until a method is called."""
        return cls(settings, credential=build_credential(settings, env=env), transport=transport)
