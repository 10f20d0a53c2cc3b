"""Ports of the cost estimate and the janitor's savings: prices of VM sizes, and the throughput history."""

from __future__ import annotations

from typing import Protocol

from shared.domain.costs import PriceQuote, ThroughputSample


class PriceSource(Protocol):
    """The pay-as-you-go price of a VM size in a region (`shared.adapters.retail_prices.RetailPrices`)."""

    def hourly_price(self, sku: str, region: str) -> PriceQuote | None:
        """None when no price is known (an unknown size, an unknown region, nothing cached and no table row)."""
        ...


class ThroughputHistory(Protocol):
    """Training speed of this app's earlier runs, per SKU (`tunegridcosts` table)."""

    def record(self, sample: ThroughputSample) -> None: ...

    def recent(self, sku: str) -> list[ThroughputSample]:
        """The samples of `sku`, newest first."""
        ...
