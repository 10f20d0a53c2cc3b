"""How long a server asked us to wait, in seconds, from its response headers.

Read in one place for every HTTP client of the app (the scoring upstream and azure-core calls to
Azure ML): `retry-after-ms` / `x-ms-retry-after-ms` (Azure's millisecond forms) win over `Retry-After`,
which is either delay-seconds or an HTTP-date (RFC 9110 §10.2.3; parsed with the standard library's
`email.utils`). A value that is not one of those forms, or a negative number, is ignored (None); a
date in the past means "now" (0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime

from shared.domain.clock import as_utc, utcnow

_HEADERS = (("retry-after-ms", 0.001), ("x-ms-retry-after-ms", 0.001), ("retry-after", 1.0))


def retry_after_value(value: str | None, *, milliseconds: bool = False) -> float | None:
    """One header value as seconds (see the module docstring for the rules)."""
    if value is None or not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        if milliseconds:
            return None
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        return max(0.0, (as_utc(when) - utcnow()).total_seconds())
    if number < 0 or number != number:  # negative or NaN: not a valid delay
        return None
    return number / 1000.0 if milliseconds else number


def retry_after_seconds(headers: Mapping[str, str] | Callable[[str], str | None]) -> float | None:
    """The wait a response asks for, from its headers (a mapping or a case-insensitive getter)."""
    if callable(headers):
        get = headers
    else:
        lowered = {str(k).lower(): v for k, v in headers.items()}
        get = lowered.get
    for name, scale in _HEADERS:
        raw = get(name)
        if raw is not None:
            return retry_after_value(str(raw), milliseconds=scale < 1)
    return None
