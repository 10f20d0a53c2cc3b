"""The proxy's upstream adapter against real loopback servers: the pooled HTTP/1.1 client (framing,
keep-alive, stale connections, timeouts, TLS) and the credential cache (expiry, single flight, 401 refresh)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from shared.adapters.upstream import HttpPool, Target

from shared.adapters.endpoint_credentials import CredentialCache, EndpointCaller
from shared.adapters.retry_after import retry_after_value
from shared.domain.resources import EndpointCredentials
from shared.errors import NotFound, UpstreamError
from tests.scoring_support import CredentialsBackend, LoopbackUpstream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """Read one request (head + Content-Length body); None at end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


class RawServer:
    """A loopback TCP server running `handler` per connection; counts connections."""

    def __init__(self, handler: Handler, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.connections = 0
        self.ssl = ssl_context

    async def __aenter__(self) -> RawServer:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=self.ssl)
        port = self.server.sockets[0].getsockname()[1]
        scheme = "https" if self.ssl else "http"
        self.target = Target.parse(f"{scheme}://127.0.0.1:{port}/score")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def answer(body: bytes, *, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%b\r\n%b" % (
        status.encode(),
        len(body),
        extra,
        body,
    )


async def keep_alive_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while (request := await read_request(reader)) is not None:
        body = request.split(b"\r\n\r\n", 1)[1]
        writer.write(answer(b'{"echo": ' + body + b"}"))


def test_keep_alive_connections_are_reused() -> None:
    """Sequential requests share one connection; the answer body and status come back intact."""

    async def scenario() -> None:
        async with RawServer(keep_alive_echo) as server:
            pool = HttpPool()
            for i in range(5):
                reply = await pool.request(server.target, HEAD, b'{"i": %d}' % i, timeout_s=5)
                assert (reply.status, reply.body, reply.content_type) == (
                    200,
                    b'{"echo": {"i": %d}}' % i,
                    "application/json",
                )
            assert server.connections == 1
            replies = await asyncio.gather(*(pool.request(server.target, HEAD, b"1", timeout_s=5) for _ in range(10)))
            assert all(r.status == 200 for r in replies)
            assert server.connections <= 10
            pool.close()

    asyncio.run(scenario())


def test_pool_survives_a_new_event_loop() -> None:
    """The same pool works across event loops (connections of a finished loop are dropped)."""

    async def one(pool: HttpPool, server: RawServer) -> int:
        return (await pool.request(server.target, HEAD, b"{}", timeout_s=5)).status

    async def scenario(pool: HttpPool) -> None:
        async with RawServer(keep_alive_echo) as server:
            assert await one(pool, server) == 200

    pool = HttpPool()
    asyncio.run(scenario(pool))
    asyncio.run(scenario(pool))


@pytest.mark.parametrize(
    ("writes", "body"),
    [
        (
            [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"5\r\nhello\r\n",
                b"6;ext=1\r\n world\r\n0\r\n\r\n",
            ],
            b"hello world",
        ),
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"], b"abc"),
        ([b"HTTP/1.1 100 Continue\r\n\r\n", answer(b"after-continue")], b"after-continue"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234", b"56789"], b"0123456789"),
        ([b"HTTP/1.1 204 No Content\r\n\r\n"], b""),
    ],
)
def test_response_framing(writes: list[bytes], body: bytes) -> None:
    """Chunked (with extensions and trailers), 100-continue, split bodies and 204 are all read correctly."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            for part in writes:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.01)

    async def scenario() -> None:
        async with RawServer(handler) as server:
            pool = HttpPool()
            for _ in range(2):
                reply = await pool.request(server.target, HEAD, b"{}", timeout_s=5)
                assert reply.body == body
            assert server.connections == 1

    asyncio.run(scenario())


def test_close_framed_answers_are_read_to_the_end_and_not_reused() -> None:
    """An HTTP/1.0 answer without Content-Length ends at close; the connection is not reused."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"a": ')
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"1}")

    async def scenario() -> None:
        async with RawServer(handler) as server:
            pool = HttpPool()
            for _ in range(2):
                assert (await pool.request(server.target, HEAD, b"{}", timeout_s=5)).body == b'{"a": 1}'
            assert server.connections == 2

    asyncio.run(scenario())


def test_connection_close_header_is_honoured() -> None:
    """`Connection: close` from the server means a fresh connection next time."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"{}", extra=b"Connection: close\r\n"))

    async def scenario() -> None:
        async with RawServer(handler) as server:
            pool = HttpPool()
            for _ in range(3):
                assert (await pool.request(server.target, HEAD, b"{}", timeout_s=5)).status == 200
            assert server.connections == 3

    asyncio.run(scenario())


def test_a_stale_keep_alive_connection_is_retried_once_on_a_fresh_one() -> None:
    """The server closing an idle kept-alive connection is invisible to the caller."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"{}"))
        await writer.drain()
        # then close while the client holds the connection idle (a keep-alive timeout)

    async def scenario() -> None:
        async with RawServer(handler) as server:
            pool = HttpPool(idle_ttl_s=60)
            assert (await pool.request(server.target, HEAD, b"{}", timeout_s=5)).status == 200
            await asyncio.sleep(0.05)
            assert (await pool.request(server.target, HEAD, b"{}", timeout_s=5)).status == 200
            assert server.connections == 2

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("behaviour", "message", "timeout"),
    [
        ("silent", "did not answer within", True),
        ("hang-up", "closed the connection", False),
        ("garbage", "invalid HTTP", False),
        ("half-answer", "closed the connection", False),
    ],
)
def test_upstream_failures_are_upstream_errors(behaviour: str, message: str, timeout: bool) -> None:
    """No answer, a hang-up, garbage or a truncated answer each give an UpstreamError (504/502)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if behaviour == "silent":
            await asyncio.sleep(5)
        elif behaviour == "garbage":
            writer.write(b"SMTP ready\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(1)
        elif behaviour == "half-answer":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
            await writer.drain()

    async def scenario() -> None:
        async with RawServer(handler) as server:
            started = time.monotonic()
            with pytest.raises(UpstreamError, match=message) as err:
                await HttpPool().request(server.target, HEAD, b"{}", timeout_s=0.3)
            assert err.value.timeout is timeout
            assert time.monotonic() - started < 3

    asyncio.run(scenario())


def test_refused_connection_is_an_upstream_error() -> None:
    """Nothing listening: UpstreamError saying it cannot connect."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UpstreamError, match="cannot connect"):
        asyncio.run(HttpPool().request(Target.parse(f"http://127.0.0.1:{port}/score"), HEAD, b"{}", timeout_s=2))


@pytest.mark.parametrize(
    ("extra", "seconds"),
    [(b"Retry-After: 3\r\n", 3.0), (b"retry-after-ms: 250\r\n", 0.25), (b"Retry-After: soon\r\n", None), (b"", None)],
)
def test_retry_after_is_read(extra: bytes, seconds: float | None) -> None:
    """Retry-After (seconds) and retry-after-ms come back as seconds."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"{}", status="429 Too Many Requests", extra=extra))

    async def scenario() -> None:
        async with RawServer(handler) as server:
            reply = await HttpPool().request(server.target, HEAD, b"{}", timeout_s=5)
            assert (reply.status, reply.retry_after) == (429, seconds)

    asyncio.run(scenario())


def test_retry_after_http_date() -> None:
    """An HTTP-date Retry-After is turned into seconds from now."""
    from email.utils import format_datetime

    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    seconds = retry_after_value(format_datetime(when, usegmt=True))
    assert seconds is not None and 25 <= seconds <= 31


def test_tls_upstream(tmp_path: Path) -> None:
    """https scoring URIs go through the loop's TLS transport (self-signed cert trusted for the test)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_file, key_file)
    client_ctx = ssl.create_default_context(cafile=str(cert_file))

    async def scenario() -> None:
        async with RawServer(keep_alive_echo, ssl_context=server_ctx) as server:
            pool = HttpPool(ssl_context=client_ctx)
            for _ in range(2):
                reply = await pool.request(server.target, HEAD, b"1", timeout_s=5)
                assert reply.body == b'{"echo": 1}'
            assert server.connections == 1
            with pytest.raises(
                UpstreamError, match="cannot connect"
            ):  # default trust store refuses the self-signed cert
                await HttpPool().request(server.target, HEAD, b"1", timeout_s=5)

    asyncio.run(scenario())


def test_credentials_are_cached_until_they_expire() -> None:
    """One fetch per TTL; an earlier expires_at shortens it; the key never shows in reprs."""
    with LoopbackUpstream() as upstream:
        backend = CredentialsBackend(upstream)
        now = [100.0]
        cache = CredentialCache(backend.get_credentials, ttl_s=600, clock=lambda: now[0])

        async def scenario() -> None:
            routes = [await cache.route("ep-a") for _ in range(20)]
            assert backend.calls == ["ep-a"]
            assert upstream.key not in repr(routes[0]) and upstream.key not in repr(cache)
            now[0] += 601
            await cache.route("ep-a")
            assert backend.calls == ["ep-a", "ep-a"]
            backend.expires_in = dt.timedelta(seconds=65)  # 60 s safety margin: usable for ~5 s
            now[0] += 601
            await cache.route("ep-a")
            now[0] += 10
            await cache.route("ep-a")
            assert len(backend.calls) == 4

        asyncio.run(scenario())


def test_concurrent_misses_fetch_once() -> None:
    """Many requests arriving before the first fetch finishes share that one fetch."""
    calls: list[str] = []

    def slow_fetch(endpoint: str) -> EndpointCredentials:
        calls.append(endpoint)
        time.sleep(0.2)
        return EndpointCredentials(scoring_uri="http://127.0.0.1:1/score", key="k")

    cache = CredentialCache(slow_fetch, ttl_s=600)

    async def scenario() -> None:
        routes = await asyncio.gather(*(cache.route("ep") for _ in range(10)))
        assert len({id(r) for r in routes}) == 1

    asyncio.run(scenario())
    assert calls == ["ep"]


def test_backend_failure_is_an_upstream_error_without_secrets() -> None:
    """A backend error while fetching keys becomes an UpstreamError naming the endpoint only."""

    def fetch(endpoint: str) -> EndpointCredentials:
        raise NotFound(f"endpoint {endpoint} not found")

    with pytest.raises(UpstreamError, match="cannot get credentials of endpoint ep-x"):
        asyncio.run(CredentialCache(fetch, ttl_s=60).route("ep-x"))


def test_rotated_key_is_refreshed_after_a_401() -> None:
    """After a key rotation the cached key gets a 401; the caller refetches once and succeeds."""
    with LoopbackUpstream(key="old-key-1111") as upstream:
        backend = CredentialsBackend(upstream)
        caller = EndpointCaller(HttpPool(), CredentialCache(backend.get_credentials, ttl_s=600))
        body = b'{"input_data": {"input_string": [[{"role": "user", "content": "hi"}]], "parameters": {}}}'

        async def scenario() -> None:
            first = await caller.post_json("ep", "blue", body, request_id="rid-1", timeout_s=5)
            assert first.status == 200
            upstream.key = "new-key-2222"
            second = await caller.post_json("ep", "blue", body, request_id="rid-2", timeout_s=5)
            assert second.status == 200
            backend.key = "stale-key-3333"
            upstream.key = "newer-key-4444"
            third = await caller.post_json("ep", "blue", body, request_id="rid-3", timeout_s=5)
            assert third.status == 401  # refreshed once, still refused: the caller sees the 401

        asyncio.run(scenario())
        assert backend.calls == ["ep", "ep", "ep"]
        assert [s.headers["authorization"] for s in upstream.seen[:3]] == [
            "Bearer old-key-1111",
            "Bearer old-key-1111",
            "Bearer new-key-2222",
        ]
        assert upstream.seen[0].headers["azureml-model-deployment"] == "blue"
        assert upstream.seen[0].headers["x-ms-client-request-id"] == "rid-1"


def test_pool_is_safe_under_concurrency_from_threads_loops() -> None:
    """Two threads with their own loops and pools do not interfere (one pool per process is per loop)."""
    errors: list[BaseException] = []

    def worker() -> None:
        async def scenario() -> None:
            async with RawServer(keep_alive_echo) as server:
                pool = HttpPool()
                for _ in range(20):
                    assert (await pool.request(server.target, HEAD, b"{}", timeout_s=5)).status == 200

        try:
            asyncio.run(scenario())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
