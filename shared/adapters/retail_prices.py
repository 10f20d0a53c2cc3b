"""Prices of VM sizes from the Azure Retail Prices API (`https://prices.azure.com/api/retail/prices`): public,
no key, no Azure identity.

One question per (size, region): `$filter=serviceName eq 'Virtual Machines' and armRegionName eq '<region>'
and armSkuName eq '<size>' and priceType eq 'Consumption'`. The answer lists Linux and Windows meters, Spot and
Low Priority ones (the API's own documentation shows a `Windows` product and a `Spot` meter); the price kept is
the Linux pay-as-you-go one in USD per hour: not Windows, not Spot, not Low Priority, unit `1 Hour`, the latest
`effectiveStartDate`. Azure ML's managed compute and online endpoints bill the VM's price.

`RetailPrices` (the `PriceSource` port) answers from, in order: the cached answer when it is younger than
`CACHE_TTL` (the `tunegridcosts` table, with the date it was fetched), the API (its answer is cached), a stale
cached answer when the API cannot be reached, and last the dated table in the repo (`price_table`). Each quote
says which one it came from and of when.

HTTP: azure-core's pipeline (the app's HTTP stack for Azure calls), a short timeout and two retries.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from azure.core import PipelineClient
from azure.core.exceptions import AzureError
from azure.core.pipeline.policies import HeadersPolicy, RetryPolicy, UserAgentPolicy
from azure.core.pipeline.transport import HttpTransport
from azure.core.rest import HttpRequest

from shared.adapters import price_table
from shared.adapters.cost_tables import TablePriceCache
from shared.domain.clock import utcnow
from shared.domain.costs import PriceQuote
from shared.errors import TransientError, TunegridError

log = logging.getLogger(__name__)

RETAIL_PRICES_URL = "https://prices.azure.com/api/retail/prices"
API_VERSION = "2023-01-01-preview"
"""The version the API's documentation describes (filter values are case sensitive from it on)."""
CACHE_TTL = timedelta(days=7)
MAX_PAGES = 5
TIMEOUT_S = 10
API_SOURCE = "retail-prices-api"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")


class PricesUnavailable(TransientError):
    """The Retail Prices API could not be asked or answered with an error."""


def price_filter(sku: str, region: str) -> str:
    """The OData filter for one size in one region (sizes and regions are plain names: anything else is refused)."""
    for what, value in (("VM size", sku), ("region", region)):
        if not _NAME.match(value):
            raise ValueError(f"{what} {value!r} is not a plain Azure name")
    return (
        f"serviceName eq 'Virtual Machines' and armRegionName eq '{region}' and armSkuName eq '{sku}' "
        "and priceType eq 'Consumption'"
    )


def _is_linux_pay_as_you_go(item: Mapping[str, Any]) -> bool:
    names = " ".join(str(item.get(k) or "") for k in ("productName", "skuName", "meterName")).lower()
    return (
        str(item.get("type") or item.get("priceType") or "") == "Consumption"
        and str(item.get("unitOfMeasure") or "") == "1 Hour"
        and str(item.get("currencyCode") or "USD") == "USD"
        and "windows" not in names
        and "spot" not in names
        and "low priority" not in names
        and item.get("isPrimaryMeterRegion", True) is not False
    )


def select_price(items: list[Mapping[str, Any]], sku: str, region: str, *, as_of: str) -> PriceQuote | None:
    """The Linux pay-as-you-go price of `sku` in `region` among the API's items, or None."""
    matching = [
        item
        for item in items
        if str(item.get("armSkuName") or "").lower() == sku.lower()
        and str(item.get("armRegionName") or "").lower() == region.lower()
        and _is_linux_pay_as_you_go(item)
        and isinstance(item.get("retailPrice"), int | float)
    ]
    if not matching:
        return None
    item = max(matching, key=lambda i: str(i.get("effectiveStartDate") or ""))
    return PriceQuote(
        sku=sku,
        region=region,
        usd_per_hour=float(item["retailPrice"]),
        source=API_SOURCE,
        as_of=as_of,
        note=f"{item.get('productName', '')} / {item.get('meterName', '')}, effective {item.get('effectiveStartDate', '?')}",
    )


class RetailPricesApi:
    """The API itself: `query(sku, region)` returns the price, None when the API lists none, and raises
    `PricesUnavailable` when it cannot be reached or answers with an error."""

    def __init__(
        self,
        *,
        base_url: str = RETAIL_PRICES_URL,
        transport: HttpTransport | None = None,
        clock: Callable[[], datetime] = utcnow,
        retries: int = 2,
    ) -> None:
        policies: list[Any] = [
            HeadersPolicy(),
            UserAgentPolicy(sdk_moniker="tunegrid"),
            RetryPolicy(retry_total=retries, retry_backoff_factor=0.5),
        ]
        kwargs: dict[str, Any] = {"policies": policies}
        if transport is not None:
            kwargs["transport"] = transport
        self._base_url = base_url
        self._client = PipelineClient(base_url=base_url, **kwargs)
        self._clock = clock

    def query(self, sku: str, region: str) -> PriceQuote | None:
        params = {"api-version": API_VERSION, "$filter": price_filter(sku, region)}
        request = HttpRequest("GET", self._base_url, params=params)
        items: list[Mapping[str, Any]] = []
        for _ in range(MAX_PAGES):
            try:
                response = self._client.send_request(request, connection_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S)
            except AzureError as exc:
                raise PricesUnavailable(f"the Retail Prices API could not be reached: {type(exc).__name__}") from exc
            if response.status_code != 200:
                raise PricesUnavailable(f"the Retail Prices API answered HTTP {response.status_code}")
            try:
                doc = response.json()
            except ValueError as exc:
                raise PricesUnavailable("the Retail Prices API answered with invalid JSON") from exc
            items += [i for i in (doc.get("Items") or []) if isinstance(i, Mapping)]
            next_link = doc.get("NextPageLink")
            if not next_link:
                break
            request = HttpRequest("GET", str(next_link))
        return select_price(items, sku, region, as_of=self._clock().date().isoformat())


def table_price(sku: str, region: str) -> PriceQuote | None:
    """The repo's dated table (East US); another region gets the East US price, said so in the note."""
    value = next((v for k, v in price_table.USD_PER_HOUR.items() if k.lower() == sku.lower()), None)
    if value is None:
        return None
    note = f"{price_table.REGION} list price from the repo's table"
    if region.lower() != price_table.REGION:
        note += f"; no row for {region}, prices there typically differ by up to 25 %"
    return PriceQuote(
        sku=sku, region=region, usd_per_hour=value, source="price table", as_of=price_table.AS_OF, note=note
    )


class RetailPrices:
    """The `PriceSource` port: cache, API, stale cache, then the repo's table (see the module docstring)."""

    def __init__(
        self,
        *,
        api: RetailPricesApi | None,
        cache: TablePriceCache | None,
        clock: Callable[[], datetime] = utcnow,
        ttl: timedelta = CACHE_TTL,
    ) -> None:
        self._api = api
        self._cache = cache
        self._clock = clock
        self._ttl = ttl
        self._memo: dict[tuple[str, str], tuple[datetime, PriceQuote | None]] = {}
        self._lock = threading.Lock()

    def hourly_price(self, sku: str, region: str) -> PriceQuote | None:
        if not sku or not region:
            return None
        key = (sku.lower(), region.lower())
        now = self._clock()
        with self._lock:
            memo = self._memo.get(key)
        if memo is not None and now - memo[0] < self._ttl:
            return memo[1]
        quote = self._lookup(sku, region, now)
        with self._lock:
            self._memo[key] = (now, quote)
        return quote

    def _lookup(self, sku: str, region: str, now: datetime) -> PriceQuote | None:
        cached = self._cached(sku, region)
        if cached is not None and now - cached[1] < self._ttl:
            return PriceQuote(**{**cached[0].to_dict(), "source": f"{API_SOURCE} (cached)"})
        failure = "no API configured"
        if self._api is not None:
            try:
                quote = self._api.query(sku, region)
            except (PricesUnavailable, ValueError) as exc:
                failure = str(exc)
                log.warning("price of %s in %s: %s", sku, region, exc)
            else:
                if quote is not None:
                    self._store(quote, now)
                    return quote
                failure = f"the API lists no Linux pay-as-you-go price for {sku} in {region}"
        if cached is not None:
            stale = cached[0]
            return PriceQuote(
                **{
                    **stale.to_dict(),
                    "source": f"{API_SOURCE} (cached, stale)",
                    "note": f"fetched {cached[1].date().isoformat()}; refreshing failed: {failure}",
                }
            )
        fallback = table_price(sku, region)
        if fallback is not None:
            return PriceQuote(**{**fallback.to_dict(), "note": f"{fallback.note}; {failure}"})
        return None

    def _cached(self, sku: str, region: str) -> tuple[PriceQuote, datetime] | None:
        if self._cache is None:
            return None
        try:
            return self._cache.get(sku, region)
        except TunegridError as exc:
            log.warning("price cache unreadable: %s", exc)
            return None

    def _store(self, quote: PriceQuote, now: datetime) -> None:
        if self._cache is None:
            return
        try:
            self._cache.put(quote, fetched_at=now)
        except TunegridError as exc:
            log.warning("price of %s in %s not cached: %s", quote.sku, quote.region, exc)
