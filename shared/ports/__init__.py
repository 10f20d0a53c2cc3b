"""The ports: Protocols the use cases receive. Adapters implement them; only `shared.bootstrap`
knows which adapter stands behind each."""

from shared.ports.backend import EndpointPort, FineTuneBackend
from shared.ports.costs import PriceSource, ThroughputHistory
from shared.ports.janitor import AuditLog, LastProxyUse
from shared.ports.run_events import RunEvents
from shared.ports.scoring import Upstream, UpstreamAnswer, UpstreamReply, UsageSink
from shared.ports.storage import Blobs, Ledger, RunLedgerPort

__all__ = [
    "AuditLog",
    "Blobs",
    "EndpointPort",
    "FineTuneBackend",
    "LastProxyUse",
    "Ledger",
    "PriceSource",
    "RunEvents",
    "RunLedgerPort",
    "ThroughputHistory",
    "Upstream",
    "UpstreamAnswer",
    "UpstreamReply",
    "UsageSink",
]
