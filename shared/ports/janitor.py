"""Ports of the janitor beside the backend and the ledger: its audit log and the proxy's usage record."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from shared.domain.janitor_rules import Decision


class AuditLog(Protocol):
    def write(self, decision: Decision, *, at: datetime, dry_run: bool, sweep_id: str) -> None: ...


LastProxyUse = Callable[[str], datetime | None]
"""Last time our scoring proxy served an endpoint (its usage record), or None when it never did."""
