"""The scoring proxy's way out: one pooled keep-alive HTTP/1.1 client per process (`HttpPool`). The
endpoint credentials and the `Upstream` port built on this client (`CredentialCache`, `EndpointCaller`)
live in `shared.adapters.endpoint_credentials` and stay importable from here.

Why not httpx or aiohttp: the proxy sits on every request path, and on this machine httpx costs about
1 ms of CPU per request and aiohttp about 0.35 ms. The scoring call is always the same shape (one
POST with a JSON body, a JSON answer of a few KB), so a small client over `asyncio.Protocol` that
pre-encodes the request head and parses the answer in place costs a tenth of that (see
bench/proxy.py). It speaks exactly what the scoring endpoints answer with: HTTP/1.x, Content-Length,
chunked or read-until-close framing, keep-alive, TLS through the event loop's SSL transport.

Secrets: the request head this client sends carries the endpoint key; nothing here logs, renders or
keeps a request head beyond the connection's write.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.adapters.retry_after import retry_after_value
from shared.errors import UpstreamError
from shared.ports import UpstreamReply

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
    "HttpPool",
    "Target",
]


MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024
"""An answer larger than this is refused: a chat answer is a few KB, anything this big is a fault."""


class _Dropped(ConnectionError):
    """The connection ended before a complete answer; `started` says whether any answer byte came."""

    def __init__(self, message: str, *, started: bool) -> None:
        super().__init__(message)
        self.started = started


class _ProtocolViolation(Exception):
    """The peer's bytes are not HTTP/1.x as we understand it."""


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed upstream URL: the origin to pool connections by, and the pre-encoded request line pieces."""

    scheme: str
    host: str
    port: int
    path: bytes
    host_header: bytes

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError(f"scoring URI must be an http(s) URL, got scheme {parts.scheme!r}")
        default_port = 443 if parts.scheme == "https" else 80
        port = parts.port or default_port
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == default_port else f"{shown}:{port}"
        return cls(parts.scheme, host, port, path.encode("ascii"), host_header.encode("ascii"))


_CONTENT_LENGTH = b"\r\ncontent-length:"
_TRANSFER_ENCODING = b"\r\ntransfer-encoding:"
_CONNECTION = b"\r\nconnection:"
_CONTENT_TYPE = b"\r\ncontent-type:"
_RETRY_AFTER = b"\r\nretry-after:"
_RETRY_AFTER_MS = b"\r\nretry-after-ms:"


def _header(head: bytes, needle: bytes) -> bytes | None:
    """Value of the first header `needle` (b"\\r\\nname:") in a lower-cased response head."""
    i = head.find(needle)
    if i < 0:
        return None
    start = i + len(needle)
    end = head.find(b"\r\n", start)
    return head[start:end].strip() if end >= 0 else head[start:].strip()


class _Connection(asyncio.Protocol):
    """One keep-alive connection. A request is written whole; the answer is parsed as bytes arrive.

    Deadlines are enforced by the pool's sweeper (one loop callback for all requests in flight, cheaper
    than a timer per request); an expired request fails with a timeout and its connection is closed.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True
        self.idle_since = 0.0
        self._buf = bytearray()
        self._waiter: asyncio.Future[UpstreamReply] | None = None
        self.deadline = 0.0
        self._head = b""
        self._reset_answer()

    def _reset_answer(self) -> None:
        self._status = 0
        self._body_start = 0
        self._length: int | None = None
        self._chunked = False
        self._chunk_pos = 0
        self._chunks: list[bytes] = []
        self._chunk_total = 0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: the connection is out of step
            self.close()
            return
        self._buf += data
        try:
            self._advance()
        except _ProtocolViolation as exc:
            self._fail(UpstreamError(f"upstream spoke invalid HTTP: {exc}"))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._status and self._length is None and not self._chunked:  # framed by close
            self._finish(bytes(self._buf[self._body_start :]))
            return
        started = bool(self._buf) or self._status != 0
        self._fail(_Dropped("connection closed by upstream", started=started))

    # request/answer
    def send(self, data: bytes, deadline: float) -> asyncio.Future[UpstreamReply]:
        assert self.transport is not None
        self._waiter = waiter = self._loop.create_future()
        self.deadline = deadline
        if self._buf:
            self._buf.clear()
        self._reset_answer()
        self.transport.write(data)
        return waiter

    @property
    def waiting(self) -> bool:
        return self._waiter is not None

    def time_out(self) -> None:
        self._fail(TimeoutError())

    def close(self) -> None:
        self.reusable = False
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _finish(self, body: bytes) -> None:
        waiter, self._waiter = self._waiter, None
        head = self._head
        if self._length is not None and len(self._buf) > self._body_start + self._length:
            self.reusable = False  # bytes after the answer: out of step
        if self.reusable and _CONNECTION in head and _header(head, _CONNECTION) == b"close":
            self.reusable = False
        if waiter is None or waiter.done():
            return
        retry_after = None
        if _RETRY_AFTER in head or _RETRY_AFTER_MS in head:
            ms = _header(head, _RETRY_AFTER_MS)
            raw = ms if ms is not None else _header(head, _RETRY_AFTER)
            retry_after = retry_after_value(raw.decode("latin-1") if raw else None, milliseconds=ms is not None)
        content_type = _header(head, _CONTENT_TYPE)
        waiter.set_result(
            UpstreamReply(self._status, body, retry_after, content_type.decode("latin-1") if content_type else "")
        )

    def _advance(self) -> None:
        buf = self._buf
        while not self._status:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise _ProtocolViolation("response head too large")
                return
            if buf[:7] != b"HTTP/1.":
                raise _ProtocolViolation("not an HTTP/1.x status line")
            try:
                status = int(buf[9:12])
            except ValueError:
                raise _ProtocolViolation("bad status code") from None
            if 100 <= status < 200:  # 100 Continue, 103 Early Hints: skip to the real answer
                del buf[: end + 4]
                continue
            head = self._head = bytes(buf[: end + 2]).lower()  # ends with CRLF, so every header is CRLF-framed
            self._status = status
            self._body_start = end + 4
            if head[7:8] == b"0" and _header(head, _CONNECTION) != b"keep-alive":  # HTTP/1.0
                self.reusable = False
            encoding = _header(head, _TRANSFER_ENCODING) if _TRANSFER_ENCODING in head else None
            length = _header(head, _CONTENT_LENGTH)
            if encoding is not None and b"chunked" in encoding:
                self._chunked = True
                self._chunk_pos = self._body_start
            elif length is not None:
                if not length.isdigit():
                    raise _ProtocolViolation("bad Content-Length")
                self._length = int(length)
                if self._length > MAX_BODY_BYTES:
                    raise _ProtocolViolation("response body too large")
            elif status in (204, 304):
                self._length = 0
            else:
                self.reusable = False  # body ends when the connection closes
        if self._chunked:
            self._advance_chunks()
        elif self._length is not None:
            if len(buf) - self._body_start >= self._length:
                self._finish(bytes(buf[self._body_start : self._body_start + self._length]))
        elif len(buf) - self._body_start > MAX_BODY_BYTES:
            raise _ProtocolViolation("response body too large")

    def _advance_chunks(self) -> None:
        buf = self._buf
        pos = self._chunk_pos
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return
            size_text = bytes(buf[pos:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _ProtocolViolation("bad chunk size") from None
            if size == 0:
                if buf.find(b"\r\n\r\n", line_end) < 0:  # trailers end with an empty line
                    if len(buf) - line_end > MAX_HEAD_BYTES:
                        raise _ProtocolViolation("chunk trailer too large")
                    return
                self._finish(b"".join(self._chunks))
                return
            data_start = line_end + 2
            if len(buf) < data_start + size + 2:
                return
            self._chunk_total += size
            if self._chunk_total > MAX_BODY_BYTES:
                raise _ProtocolViolation("response body too large")
            self._chunks.append(bytes(buf[data_start : data_start + size]))
            pos = data_start + size + 2
            self._chunk_pos = pos


class HttpPool:
    """Keep-alive connections per origin, reused LIFO, for one event loop.

    If the running loop changes (a test that calls `asyncio.run` per request, a restarted host), the
    connections of the old loop are dropped and new ones are opened on the current loop.
    """

    def __init__(
        self,
        *,
        max_idle_per_origin: int = 256,
        idle_ttl_s: float = 4.0,
        connect_timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        sweep_interval_s: float = 0.05,
    ) -> None:
        self._max_idle = max_idle_per_origin
        self._idle_ttl = idle_ttl_s
        self._connect_timeout = connect_timeout_s
        self._ssl = ssl_context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._in_flight: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_interval = sweep_interval_s

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            try:
                import certifi

                self._ssl = ssl.create_default_context(cafile=certifi.where())
            except ImportError:
                self._ssl = ssl.create_default_context()
        return self._ssl

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            for conns in self._idle.values():
                for conn in conns:
                    conn.closed = True
                    try:
                        if self._loop is not None and not self._loop.is_closed() and conn.transport is not None:
                            conn.transport.close()
                    except RuntimeError:
                        pass
            self._idle = {}
            self._in_flight = set()
            self._sweeper = None
            self._loop = loop
        return loop

    def _sweep(self) -> None:
        """Fail the requests past their deadline; runs every sweep interval while any is in flight."""
        self._sweeper = None
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        for conn in list(self._in_flight):
            if not conn.waiting:
                self._in_flight.discard(conn)
            elif conn.deadline <= now:
                self._in_flight.discard(conn)
                conn.time_out()
        if self._in_flight:
            self._sweeper = loop.call_later(self._sweep_interval, self._sweep)

    async def _connect(self, loop: asyncio.AbstractEventLoop, target: Target, deadline: float) -> _Connection:
        use_ssl = self._ssl_context() if target.scheme == "https" else None
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + self._connect_timeout)):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    target.host,
                    target.port,
                    ssl=use_ssl,
                    server_hostname=target.host if use_ssl else None,
                )
        except TimeoutError:
            raise UpstreamError(f"connect to {target.host}:{target.port} timed out", timeout=True) from None
        except OSError as exc:
            raise UpstreamError(
                f"cannot connect to {target.host}:{target.port}: {exc.strerror or type(exc).__name__}"
            ) from None
        return conn

    def _take_idle(self, loop: asyncio.AbstractEventLoop, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = loop.time()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._idle_ttl:
                return conn
            conn.close()
        return None

    def _give_back(self, loop: asyncio.AbstractEventLoop, origin: tuple[str, str, int], conn: _Connection) -> None:
        if conn.closed or not conn.reusable:
            conn.close()
            return
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = loop.time()
        idle.append(conn)

    async def request(self, target: Target, head: bytes, body: bytes, *, timeout_s: float) -> UpstreamReply:
        """POST-style request: `head` is the request line and header lines (CRLF-terminated, without
        Content-Length and without the blank line). Raises UpstreamError on timeout or transport failure."""
        loop = self._loop
        if loop is None or loop is not asyncio.get_running_loop():
            loop = self._bind_loop()
        data = b"%bContent-Length: %d\r\n\r\n%b" % (head, len(body), body)
        origin = target.origin
        deadline = loop.time() + timeout_s
        for attempt in (0, 1):
            conn = self._take_idle(loop, origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(loop, target, deadline)
            self._in_flight.add(conn)
            if self._sweeper is None:
                self._sweeper = loop.call_later(self._sweep_interval, self._sweep)
            try:
                reply = await conn.send(data, deadline)
            except _Dropped as exc:
                # A kept-alive connection the server closed while idle: safe to send again, once.
                if reused and not exc.started and attempt == 0:
                    continue
                raise UpstreamError(f"upstream {target.host}:{target.port} closed the connection") from None
            except TimeoutError:
                raise UpstreamError(
                    f"upstream {target.host}:{target.port} did not answer within {timeout_s:.1f} s", timeout=True
                ) from None
            except BaseException:
                conn.close()  # cancelled mid-request: the connection is out of step
                raise
            finally:
                self._in_flight.discard(conn)
            self._give_back(loop, origin, conn)
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle = {}
