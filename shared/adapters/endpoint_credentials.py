"""The endpoint side of the scoring proxy's way out: endpoint credentials cached per process
(`CredentialCache`), and `EndpointCaller`, the `Upstream` port of `shared.usecases.scoring`, which sends
the JSON body through the pooled HTTP client of `shared.adapters.upstream` with those credentials.

Secrets: the endpoint key lives only inside `_Route` (its credentials and the pre-encoded header
bytes). Neither `_Route`, the cache, nor any exception or log line here ever renders it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from shared.adapters.upstream import Target
from shared.errors import TunegridError, UpstreamError

if TYPE_CHECKING:
    from shared.adapters.upstream import HttpPool
    from shared.domain.resources import EndpointCredentials
    from shared.ports import UpstreamReply

log = logging.getLogger(__name__)


class _Route:
    """How to reach one endpoint: its target URL and credentials, plus the pre-encoded request head
    per deployment (key included). `repr` shows neither; nothing outside this module reads them."""

    __slots__ = ("_creds", "_heads", "expires", "generation", "target")

    def __init__(self, target: Target, creds: EndpointCredentials, expires: float, generation: int) -> None:
        self.target = target
        self.expires = expires
        self.generation = generation
        self._creds = creds
        self._heads: dict[str, bytes] = {}

    def head(self, deployment: str) -> bytes:
        head = self._heads.get(deployment)
        if head is None:
            lines = [
                b"POST " + self.target.path + b" HTTP/1.1",
                b"Host: " + self.target.host_header,
                b"Content-Type: application/json",
                b"Accept: application/json",
                b"User-Agent: tunegrid-proxy",
            ]
            for name, value in self._creds.headers(deployment=deployment or None).items():
                lines.append(f"{name}: {value}".encode("latin-1"))
            head = self._heads[deployment] = b"\r\n".join(lines) + b"\r\n"
        return head

    def scrub(self, body: bytes) -> bytes:
        """An error body with our key taken out, in case the endpoint echoes request headers."""
        key = self._creds.key.encode("utf-8", "replace")
        return body.replace(key, b"***") if key and key in body else body

    def __repr__(self) -> str:
        return f"_Route(host={self.target.host!r}, port={self.target.port}, generation={self.generation})"


class CredentialCache:
    """Endpoint credentials from the backend port, cached in memory with an expiry.

    The fetch (`backend.get_credentials`, a blocking SDK call in Azure) runs in a worker thread and
    only once per endpoint at a time. `invalidate` after an upstream 401 forces the next call to
    refetch (key rotation, expired token).
    """

    def __init__(
        self,
        fetch: Callable[[str], EndpointCredentials],
        *,
        ttl_s: float,
        expiry_margin_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl_s
        self._margin = expiry_margin_s
        self._clock = clock
        self._routes: dict[str, _Route] = {}
        self._pending: dict[str, asyncio.Future[_Route]] = {}
        self._generation = 0

    async def route(self, endpoint: str) -> _Route:
        route = self._routes.get(endpoint)
        if route is None or route.expires <= self._clock():
            route = await self._refresh(endpoint)
        return route

    def cached(self, endpoint: str) -> _Route | None:
        """The cached route if still valid (synchronous fast path of `route`)."""
        route = self._routes.get(endpoint)
        return route if route is not None and route.expires > self._clock() else None

    def invalidate(self, endpoint: str, generation: int) -> None:
        route = self._routes.get(endpoint)
        if route is not None and route.generation == generation:
            del self._routes[endpoint]

    async def _refresh(self, endpoint: str) -> _Route:
        loop = asyncio.get_running_loop()
        pending = self._pending.get(endpoint)
        if pending is not None and pending.get_loop() is loop:
            return await asyncio.shield(pending)
        fut: asyncio.Future[_Route] = loop.create_future()
        self._pending[endpoint] = fut
        try:
            route = await self._load(endpoint)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else UpstreamError("credential fetch cancelled"))
                fut.exception()  # mark retrieved: no warning when nobody else was waiting
            raise
        else:
            fut.set_result(route)
            return route
        finally:
            if self._pending.get(endpoint) is fut:
                del self._pending[endpoint]

    async def _load(self, endpoint: str) -> _Route:
        try:
            creds = await asyncio.to_thread(self._fetch, endpoint)
        except TunegridError as exc:
            log.warning(
                "cannot get credentials of endpoint %s: %s", endpoint, type(exc).__name__, extra={"endpoint": endpoint}
            )
            raise UpstreamError(f"cannot get credentials of endpoint {endpoint} ({type(exc).__name__})") from None
        target = Target.parse(creds.scoring_uri)
        ttl = float(self._ttl)
        if creds.expires_at is not None:
            left = (creds.expires_at - datetime.now(UTC)).total_seconds() - self._margin
            ttl = max(0.0, min(ttl, left))
        self._generation += 1
        route = _Route(target, creds, self._clock() + ttl, self._generation)
        self._routes[endpoint] = route
        log.debug("credentials cached for endpoint %s (ttl %.0f s)", endpoint, ttl, extra={"endpoint": endpoint})
        return route


class EndpointCaller:
    """The `Upstream` port of `shared.usecases.scoring`: POST a JSON body to a live deployment, with the
    endpoint key, refreshing the key once on a 401."""

    def __init__(self, pool: HttpPool, credentials: CredentialCache) -> None:
        self._pool = pool
        self._credentials = credentials

    async def post_json(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> UpstreamReply:
        deadline = time.monotonic() + timeout_s
        trace = b"x-ms-client-request-id: %b\r\n" % request_id.encode("ascii")
        route = self._credentials.cached(endpoint) or await self._credentials.route(endpoint)
        reply = await self._pool.request(
            route.target, route.head(deployment) + trace, body, timeout_s=max(0.001, deadline - time.monotonic())
        )
        if reply.status == 401:
            log.info(
                "endpoint %s answered 401: refreshing its credentials",
                endpoint,
                extra={"endpoint": endpoint, "request_id": request_id},
            )
            self._credentials.invalidate(endpoint, route.generation)
            route = await self._credentials.route(endpoint)
            reply = await self._pool.request(
                route.target, route.head(deployment) + trace, body, timeout_s=max(0.001, deadline - time.monotonic())
            )
        if reply.status >= 400:
            reply.body = route.scrub(reply.body)
        return reply

    def close(self) -> None:
        self._pool.close()
