"""The `tunegridcosts` table (settings.COSTS_TABLE): training throughput per SKU, and cached price answers.

- Partition `throughput|<sku>` (lower case), RowKey = run id: one row per finished run, written when its
  job completes (`ThroughputHistory`); `tokens_per_second` is per node. A repeated write of a run replaces
  its row, so a re-delivered completion is a no-op.
- Partition `price`, RowKey = `<region>|<sku>` (lower case): the Retail Prices API's answer for that size
  and region, with the date it was fetched (`TablePriceCache`, read by `shared.adapters.retail_prices`).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import UpdateMode

from shared.adapters.storage_errors import translated
from shared.domain.clock import parse_time
from shared.domain.costs import PriceQuote, ThroughputSample

log = logging.getLogger(__name__)

PRICE_PARTITION = "price"
_FORBIDDEN_KEY_CHARS = str.maketrans({c: "_" for c in "/\\#?\t\n\r"})


def _key(text: str) -> str:
    """A table key: the characters Azure Tables refuse in keys replaced."""
    return text.lower().translate(_FORBIDDEN_KEY_CHARS)


def throughput_partition(sku: str) -> str:
    return f"throughput|{_key(sku)}"


class TableThroughputHistory:
    """`ThroughputHistory` over a table client (`azure.data.tables.TableClient` on COSTS_TABLE)."""

    def __init__(self, table: Any) -> None:
        self._table = table

    @translated("throughput history write")
    def record(self, sample: ThroughputSample) -> None:
        self._table.upsert_entity(
            {
                "PartitionKey": throughput_partition(sample.sku),
                "RowKey": _key(sample.run_id),
                "sku": sample.sku,
                "run_id": sample.run_id,
                "tokens_per_second": float(sample.tokens_per_second),
                "source": sample.source,
                "at": sample.at,
            },
            mode=UpdateMode.REPLACE,
        )

    @translated("throughput history read")
    def recent(self, sku: str) -> list[ThroughputSample]:
        partition = throughput_partition(sku).replace("'", "''")
        rows = self._table.query_entities(f"PartitionKey eq '{partition}'")
        out = [
            ThroughputSample(
                sku=str(row.get("sku") or sku),
                tokens_per_second=float(row.get("tokens_per_second") or 0.0),
                run_id=str(row.get("run_id") or row["RowKey"]),
                at=str(row.get("at") or ""),
                source=str(row.get("source") or ""),
            )
            for row in rows
        ]
        return sorted(out, key=lambda s: s.at, reverse=True)


class TablePriceCache:
    """The Retail Prices API's answers, one row per (region, size), with the date they were fetched."""

    def __init__(self, table: Any) -> None:
        self._table = table

    @staticmethod
    def row_key(sku: str, region: str) -> str:
        return f"{_key(region)}|{_key(sku)}"

    @translated("price cache read")
    def get(self, sku: str, region: str) -> tuple[PriceQuote, datetime] | None:
        try:
            row = self._table.get_entity(PRICE_PARTITION, self.row_key(sku, region))
        except ResourceNotFoundError:
            return None
        fetched = parse_time(row.get("fetched_at"))
        if fetched is None:
            return None
        quote = PriceQuote(
            sku=str(row.get("sku") or sku),
            region=str(row.get("region") or region),
            usd_per_hour=float(row.get("usd_per_hour") or 0.0),
            source=str(row.get("source") or "retail-prices-api"),
            as_of=str(row.get("as_of") or fetched.date().isoformat()),
            note=str(row.get("note") or ""),
        )
        return quote, fetched

    @translated("price cache write")
    def put(self, quote: PriceQuote, *, fetched_at: datetime) -> None:
        self._table.upsert_entity(
            {
                "PartitionKey": PRICE_PARTITION,
                "RowKey": self.row_key(quote.sku, quote.region),
                "sku": quote.sku,
                "region": quote.region,
                "usd_per_hour": float(quote.usd_per_hour),
                "source": quote.source,
                "as_of": quote.as_of,
                "note": quote.note,
                "fetched_at": fetched_at.isoformat(),
            },
            mode=UpdateMode.REPLACE,
        )
