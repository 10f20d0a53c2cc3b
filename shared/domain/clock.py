"""Time: the one `utcnow` and the one way to read a timestamp into an aware UTC datetime."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

_EXTRA_DIGITS = re.compile(r"(\.\d{6})\d+")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """A naive datetime is taken as UTC (Azure Tables and some SDK fields drop the zone)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def parse_time(value: Any) -> datetime | None:
    """An aware datetime from what services send: datetime, epoch seconds or ISO 8601 text
    (`Z` suffix and 7-digit fractions included); None for empty or unreadable values."""
    if value is None or value == "":
        return None
    value = getattr(value, "value", value)  # azure-data-tables' EntityProperty
    if isinstance(value, datetime):
        return as_utc(value)
    if isinstance(value, int | float):
        return datetime.fromtimestamp(float(value), UTC)
    text = _EXTRA_DIGITS.sub(r"\1", str(value).strip())
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        try:
            parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z")
        except ValueError:
            return None
    return as_utc(parsed)


def iso(value: datetime) -> str:
    """UTC ISO 8601 with a `Z`, as Azure writes timestamps."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
