"""Every call to a scoring endpoint goes through here: the endpoint credentials, cached once per process
(`CredentialCache`), and `EndpointCaller`, the `Upstream` port, which sends JSON bodies with those
credentials through the one HTTP client (`shared.adapters.http_client`). The scoring proxy and the
roll-out's smoke test share one `EndpointCaller` per process (`shared.bootstrap.endpoint_caller`).

Secrets: the endpoint key lives only inside `_Route` (its credentials and the header dicts built from
them). Neither `_Route`, the cache, nor any exception or log line here ever renders it; error bodies
are scrubbed of it before anyone reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from shared.adapters.http_client import STREAM_TYPE, HttpAnswer, HttpClient
from shared.errors import TunegridError, UpstreamError
from shared.ports import UpstreamReply

if TYPE_CHECKING:
    from shared.domain.resources import EndpointCredentials

log = logging.getLogger(__name__)


_JSON_ONLY = "application/json"
_STREAM_OR_JSON = f"{STREAM_TYPE}, application/json;q=0.5"


class _Route:
    """How to reach one endpoint: its scoring URL and credentials, plus the request headers per
    deployment and answer type (key included). `repr` shows neither; nothing outside this module reads them."""

    __slots__ = ("_creds", "_headers", "expires", "generation", "host", "url")

    def __init__(self, url: str, creds: EndpointCredentials, expires: float, generation: int) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError(f"scoring URI must be an http(s) URL, got scheme {parts.scheme!r}")
        self.url = url
        self.host = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
        self.expires = expires
        self.generation = generation
        self._creds = creds
        self._headers: dict[tuple[str, bool], dict[str, str]] = {}

    def headers(self, deployment: str, *, stream: bool) -> dict[str, str]:
        headers = self._headers.get((deployment, stream))
        if headers is None:
            headers = {
                "Content-Type": "application/json",
                "Accept": _STREAM_OR_JSON if stream else _JSON_ONLY,
                "User-Agent": "tunegrid-proxy",
                **self._creds.headers(deployment=deployment or None),
            }
            self._headers[(deployment, stream)] = headers
        return headers

    def scrub(self, body: bytes) -> bytes:
        """An error body with our key taken out, in case the endpoint echoes request headers."""
        key = self._creds.key.encode("utf-8", "replace")
        return body.replace(key, b"***") if key and key in body else body

    def __repr__(self) -> str:
        return f"_Route(host={self.host!r}, generation={self.generation})"


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
        self._lock = threading.Lock()

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
        ttl = float(self._ttl)
        if creds.expires_at is not None:
            left = (creds.expires_at - datetime.now(UTC)).total_seconds() - self._margin
            ttl = max(0.0, min(ttl, left))
        with self._lock:  # the proxy's loop and the blocking callers' loop share this cache
            self._generation += 1
            generation = self._generation
        route = _Route(creds.scoring_uri, creds, self._clock() + ttl, generation)
        self._routes[endpoint] = route
        log.debug("credentials cached for endpoint %s (ttl %.0f s)", endpoint, ttl, extra={"endpoint": endpoint})
        return route


class _Answer:
    """The `UpstreamAnswer` port over an HTTP answer: error bodies come back without the key."""

    __slots__ = ("_answer", "_route", "content_type", "retry_after", "status")

    def __init__(self, answer: HttpAnswer, route: _Route) -> None:
        self._answer = answer
        self._route = route
        self.status = answer.status
        self.content_type = answer.content_type
        self.retry_after = answer.retry_after

    @property
    def streamed(self) -> bool:
        return self.status == 200 and self._answer.streamed

    async def read(self) -> bytes:
        body = await self._answer.read()
        return self._route.scrub(body) if self.status >= 400 else body

    def lines(self) -> AsyncIterator[bytes]:
        return self._answer.lines()


class EndpointCaller:
    """The `Upstream` port: POST a JSON body to a live deployment with the endpoint's key, refreshing
    the key once on a 401. One per process, shared by every endpoint caller."""

    def __init__(self, http: HttpClient, credentials: CredentialCache) -> None:
        self._http = http
        self._credentials = credentials

    @contextlib.asynccontextmanager
    async def open_stream(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float, stream: bool = True
    ) -> AsyncIterator[_Answer]:
        deadline = time.monotonic() + timeout_s
        route = self._credentials.cached(endpoint) or await self._credentials.route(endpoint)
        for attempt in (0, 1):
            headers = route.headers(deployment, stream=stream)
            async with self._http.post(
                route.url,
                body,
                {**headers, "x-ms-client-request-id": request_id},
                timeout_s=max(0.001, deadline - time.monotonic()),
                where=f"endpoint {endpoint}",
            ) as answer:
                if answer.status == 401 and attempt == 0:
                    log.info(
                        "endpoint %s answered 401: refreshing its credentials",
                        endpoint,
                        extra={"endpoint": endpoint, "request_id": request_id},
                    )
                    self._credentials.invalidate(endpoint, route.generation)
                else:
                    yield _Answer(answer, route)
                    return
            route = await self._credentials.route(endpoint)

    async def post_json(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> UpstreamReply:
        async with self.open_stream(
            endpoint, deployment, body, request_id=request_id, timeout_s=timeout_s, stream=False
        ) as answer:
            return UpstreamReply(answer.status, await answer.read(), answer.retry_after, answer.content_type)

    def post_json_blocking(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> UpstreamReply:
        call = self.post_json(endpoint, deployment, body, request_id=request_id, timeout_s=timeout_s)
        return self._http.run_blocking(call, timeout_s=timeout_s)

    async def aclose(self) -> None:
        await self._http.aclose()

    def close_blocking(self) -> None:
        """Stop the client's private loop thread (the blocking path's), for synchronous owners."""
        self._http.close_blocking()
