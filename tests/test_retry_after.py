"""Retry-After is read in one place for every HTTP client (scoring upstream, azure-core calls)."""

from __future__ import annotations

import datetime as dt
from email.utils import format_datetime

import pytest

from shared.adapters.retry_after import retry_after_seconds, retry_after_value


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": "0"}, 0.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"x-ms-retry-after-ms": "1200", "Retry-After": "9"}, 1.2),
        ({"Retry-After": "-4"}, None),
        ({"retry-after-ms": "-1"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": ""}, None),
        ({}, None),
        ({"Retry-After": format_datetime(dt.datetime(2000, 1, 1, tzinfo=dt.UTC), usegmt=True)}, 0.0),
    ],
)
def test_retry_after_headers(headers: dict[str, str], seconds: float | None) -> None:
    """Milliseconds forms win, negative or unreadable values are ignored, a past date means now."""
    assert retry_after_seconds(headers) == seconds


def test_retry_after_date_in_the_future() -> None:
    """An HTTP-date is turned into seconds from now."""
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    seconds = retry_after_value(format_datetime(when, usegmt=True))
    assert seconds is not None and 25 <= seconds <= 31


def test_retry_after_getter_form() -> None:
    """A case-insensitive getter (azure-core and aiohttp headers) works like a mapping."""
    assert retry_after_seconds({"retry-after": "7"}.get) == 7.0
