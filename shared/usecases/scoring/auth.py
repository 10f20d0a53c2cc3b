"""Who may call the proxy: the PROXY_API_KEYS check, by bearer token or Functions key."""

from __future__ import annotations

from collections.abc import Iterable

from shared.domain.keys import KeySet
from shared.usecases.scoring.errors import Unauthorized


class ApiKeys:
    """The proxy's API keys, compared in constant time (`shared.domain.keys.KeySet`)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = KeySet(keys)

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._keys)} keys>)"

    def check(self, authorization: str | None, functions_key: str | None) -> None:
        if not self._keys:
            raise Unauthorized("the proxy has no API keys configured (PROXY_API_KEYS); every request is refused")
        presented: list[str] = []
        if authorization:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                presented.append(token.strip())
        if functions_key:
            presented.append(functions_key.strip())
        if not presented:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'x-functions-key: <key>'")
        ok = False
        for value in presented:
            ok |= self._keys.matches(value)
        if not ok:
            raise Unauthorized("invalid API key")
