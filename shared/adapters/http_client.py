"""The deployed app's one HTTP client for endpoint calls: aiohttp, one pooled session per process and
event loop (`HttpClient`), plus a private loop thread for blocking callers (`HttpClient.run_blocking`).

Why aiohttp: it is the async transport azure-core already uses, it parses with llhttp (strict: it
refuses malformed chunk sizes, a missing CRLF after chunk data, duplicate Content-Length, and
Content-Length with Transfer-Encoding), and on this machine it costs about a third of httpx's CPU per
request (`bench/proxy.py` measures both: `client_cpu_us_aiohttp`, `client_cpu_us_httpx`).

Where aiohttp is lenient, the answer is refused here, before its body is read:
- a transfer coding other than `chunked` (e.g. `gzip, chunked`): aiohttp would hand back the still
  compressed bytes (Content-Encoding is decompressed as usual);
- a body framed by closing the connection (no Content-Length, not chunked): aiohttp reports a reset
  during such a body as a complete answer, so a truncated answer could not be told from a whole one.
Scoring servers always send Content-Length or chunked answers.

Environment, as azure-core's calls to the same endpoints: `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY`
(read with aiohttp's own `get_env_proxy_for_url`, once per origin: aiohttp's `trust_env` would look
them and ~/.netrc up again in a worker thread on every request, two thread hops that cost more CPU
than the rest of the call), and the CA bundle from `REQUESTS_CA_BUNDLE` or `SSL_CERT_FILE`, else
certifi's. POSTs are never re-sent on a dropped keep-alive connection (aiohttp retries only
idempotent methods).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import threading
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any, TypeVar

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from shared.adapters.retry_after import retry_after_seconds
from shared.errors import UpstreamError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024
"""An answer larger than this is refused: a chat answer is a few KB, anything this big is a fault."""
MAX_LINE_BYTES = 1024 * 1024
"""Longest line of a streamed (NDJSON) answer."""
STREAM_TYPE = "application/x-ndjson"

T = TypeVar("T")


def ssl_context(env: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """TLS verification as requests / azure-core do it: REQUESTS_CA_BUNDLE, then SSL_CERT_FILE, then certifi."""
    env = os.environ if env is None else env
    cafile = env.get("REQUESTS_CA_BUNDLE") or env.get("SSL_CERT_FILE")
    if not cafile:
        import certifi

        cafile = certifi.where()
    return ssl.create_default_context(cafile=cafile)


class HttpAnswer:
    """An answer whose head has arrived; its body is read with `read()` or, streamed, with `lines()`."""

    __slots__ = ("_response", "content_type", "retry_after", "status", "where")

    def __init__(self, response: aiohttp.ClientResponse, where: str) -> None:
        self._response = response
        self.where = where
        self.status = response.status
        self.content_type = response.content_type or ""
        self.retry_after = retry_after_seconds(response.headers.get) if response.status >= 400 else None

    @property
    def streamed(self) -> bool:
        return self.content_type == STREAM_TYPE

    async def read(self, *, limit: int = MAX_BODY_BYTES) -> bytes:
        """The whole body, at most `limit` bytes (more is an UpstreamError)."""
        declared = self._response.content_length
        if declared is not None and declared > limit:
            raise UpstreamError(f"{self.where} answered with {declared} bytes; the limit is {limit}")
        parts: list[bytes] = []
        size = 0
        with _translated(self.where):
            async for chunk in self._response.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise UpstreamError(f"{self.where} answered with more than {limit} bytes")
                parts.append(chunk)
        return b"".join(parts)

    async def lines(self) -> AsyncIterator[bytes]:
        """The body's non-empty lines as they arrive (a line over MAX_LINE_BYTES is an UpstreamError)."""
        content = self._response.content
        with _translated(self.where):
            while True:
                try:
                    line = await content.readuntil(b"\n")
                except ValueError:
                    raise UpstreamError(f"{self.where} streamed a line longer than the limit") from None
                if not line:
                    return
                if len(line) > MAX_LINE_BYTES:
                    raise UpstreamError(f"{self.where} streamed a line longer than {MAX_LINE_BYTES} bytes")
                if line.strip():
                    yield line


@contextlib.contextmanager
def _translated(where: str) -> Any:
    """aiohttp's and the loop's failures as UpstreamError (timeouts flagged), never with a request head."""
    try:
        yield
    except UpstreamError:
        raise
    except TimeoutError:
        raise UpstreamError(f"{where} did not answer in time", timeout=True) from None
    except aiohttp.ClientResponseError as exc:  # the parser refused the answer (llhttp's message)
        reason = str(exc.message).splitlines()[0] if exc.message else "malformed answer"
        raise UpstreamError(f"{where} spoke invalid HTTP: {reason}") from None
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamError(f"cannot connect to {where}: {exc.strerror or type(exc).__name__}") from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError):
        raise UpstreamError(f"{where} closed the connection before the answer was complete") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"{where} could not be reached ({type(exc).__name__})") from None
    except OSError as exc:
        raise UpstreamError(f"{where} could not be reached ({exc.strerror or type(exc).__name__})") from None


def _check_framing(response: aiohttp.ClientResponse, where: str) -> None:
    """Refuse what aiohttp would pass on unchecked (see the module docstring)."""
    coding = response.headers.get("Transfer-Encoding")
    if coding is not None and coding.strip().lower() != "chunked":
        raise UpstreamError(f"{where} answered with an unsupported transfer coding ({coding[:40]})")
    if (
        coding is None
        and response.content_length is None
        and response.status not in (204, 304)
        and not 100 <= response.status < 200
    ):
        raise UpstreamError(f"{where} framed its answer by closing the connection; a cut answer would look whole")


class HttpClient:
    """One pooled aiohttp session per event loop of this process.

    A session belongs to the loop it was made on; the functions' loop gets one, and the private loop
    of `run_blocking` (for synchronous callers such as the roll-out's smoke test) another.
    """

    def __init__(self, *, limit: int = 512, connect_timeout_s: float = 10.0, tls: ssl.SSLContext | None = None) -> None:
        self._limit = limit
        self._connect_timeout = connect_timeout_s
        self._tls = tls
        self._sessions: dict[int, tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._portal: asyncio.AbstractEventLoop | None = None
        self._portal_thread: threading.Thread | None = None
        self._portal_lock = threading.Lock()
        self._proxies: dict[tuple[str, str, int | None], tuple[URL | None, aiohttp.BasicAuth | None]] = {}

    def _proxy_for(self, url: URL) -> tuple[URL | None, aiohttp.BasicAuth | None]:
        """The environment's proxy for this origin (None: go direct), looked up once per origin."""
        origin = (url.scheme, url.host or "", url.port)
        found = self._proxies.get(origin)
        if found is None:
            try:
                found = get_env_proxy_for_url(url)
            except LookupError:
                found = (None, None)
            self._proxies[origin] = found
        return found

    def session(self) -> aiohttp.ClientSession:
        """This loop's session (made on first use; sessions of closed loops are dropped)."""
        loop = asyncio.get_running_loop()
        if loop is self._loop and self._session is not None and not self._session.closed:
            return self._session
        held = self._sessions.get(id(loop))
        if held is None or held[0] is not loop or held[1].closed:
            for key, (other, _) in list(self._sessions.items()):
                if other.is_closed():
                    del self._sessions[key]
            if self._tls is None:
                self._tls = ssl_context()
            connector = aiohttp.TCPConnector(limit=self._limit, ssl=self._tls, enable_cleanup_closed=False)
            session = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,  # the proxy comes from `_proxy_for`; no netrc (our calls carry their key)
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
            )
            held = self._sessions[id(loop)] = (loop, session)
        self._loop, self._session = loop, held[1]
        return held[1]

    @contextlib.asynccontextmanager
    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout_s: float, where: str
    ) -> AsyncIterator[HttpAnswer]:
        """POST `body`; the answer's head is checked, its body is read inside the block. Leaving the
        block early closes the connection (an upstream that streams sees the caller go)."""
        session = self.session()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.001, timeout_s)
        target = URL(url)
        proxy, proxy_auth = self._proxy_for(target)
        with _translated(where):
            async with asyncio.timeout_at(deadline):
                response = await session.post(
                    target, data=body, headers=headers, allow_redirects=False, proxy=proxy, proxy_auth=proxy_auth
                )
        try:
            _check_framing(response, where)
            async with asyncio.timeout_at(deadline):
                yield HttpAnswer(response, where)
        except TimeoutError:
            raise UpstreamError(f"{where} did not answer within {timeout_s:.1f} s", timeout=True) from None
        finally:
            if response.content.at_eof():
                response.release()
            else:
                response.close()  # unread body: the connection is out of step, drop it

    # ----------------------------------------------------------------------------- blocking callers
    def run_blocking(self, coro: Coroutine[Any, Any, T], *, timeout_s: float) -> T:
        """Run `coro` on this client's private loop thread and wait for it (synchronous callers only)."""
        loop = self._portal_loop()
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout_s + 5.0)
        except TimeoutError:
            future.cancel()
            raise UpstreamError("the endpoint call did not finish in time", timeout=True) from None

    def _portal_loop(self) -> asyncio.AbstractEventLoop:
        with self._portal_lock:
            if self._portal is None or self._portal.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="tunegrid-http", daemon=True)
                thread.start()
                self._portal, self._portal_thread = loop, thread
            return self._portal

    def close_blocking(self) -> None:
        """Close the private loop's session and stop its thread (synchronous owners: tests, the CLI)."""
        with self._portal_lock:
            loop, thread = self._portal, self._portal_thread
            self._portal, self._portal_thread = None, None
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

    async def aclose(self) -> None:
        """Close the running loop's session (the host's stop hook)."""
        loop = asyncio.get_running_loop()
        held = self._sessions.pop(id(loop), None)
        if held is not None and held[0] is loop:
            await held[1].close()
        if self._loop is loop:
            self._loop, self._session = None, None
