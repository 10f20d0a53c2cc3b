"""Secret comparison in one place: keys are compared as SHA-256 digests with `hmac.compare_digest`,
against every accepted key without an early exit, so the time taken depends neither on the
presented value nor on which key (if any) matched."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


def _digest(value: str | bytes) -> bytes:
    raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return hashlib.sha256(raw).digest()


class KeySet:
    """Accepted keys, kept only as digests; `repr` never shows them."""

    __slots__ = ("_digests",)

    def __init__(self, keys: Iterable[str | bytes | None]) -> None:
        self._digests = tuple(_digest(k) for k in keys if k)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"KeySet(<{len(self._digests)} keys>)"

    def matches(self, candidate: str | bytes | None) -> bool:
        if not candidate:
            return False
        presented = _digest(candidate)
        ok = False
        for known in self._digests:
            ok |= hmac.compare_digest(presented, known)
        return ok
