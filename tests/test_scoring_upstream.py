"""The one endpoint client against real loopback servers: aiohttp's pooled session (keep-alive, strict
parsing of malformed answers, bounded bodies, no re-sent POSTs, the environment's proxy and CA settings,
timeouts), the credential cache (expiry, single flight, 401 refresh) and the blocking call the
roll-out's smoke test makes.

The raw server here sends deliberately malformed answers, written byte by byte, to prove the client
refuses them; well-formed answers come from aiohttp's own server."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import ipaddress
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from shared.adapters.endpoint_credentials import CredentialCache, EndpointCaller
from shared.adapters.http_client import HttpClient
from shared.adapters.retry_after import retry_after_value
from shared.domain.resources import EndpointCredentials
from shared.errors import NotFound, UpstreamError
from tests.scoring_support import CredentialsBackend, LoopbackUpstream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
JSON = {"Content-Type": "application/json"}


async def post(client: HttpClient, url: str, body: bytes = b"{}", *, timeout_s: float = 5.0) -> tuple[int, bytes]:
    async with client.post(url, body, JSON, timeout_s=timeout_s, where="endpoint test") as answer:
        return answer.status, await answer.read()


@asynccontextmanager
async def web_server(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[Any]:
    """aiohttp's server on a free loopback port; `.connections` counts the TCP connections it accepted."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server  # the asyncio Server: its socket's port
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    info = type("Server", (), {"url": f"http://127.0.0.1:{port}/score", "port": port})()
    try:
        yield info
    finally:
        await runner.cleanup()


@asynccontextmanager
async def raw_server(handler: Handler, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[Any]:
    """A TCP server on loopback that runs `handler` per connection (malformed answers, hang-ups)."""
    stats = {"connections": 0}

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats["connections"] += 1
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if tls else "http"
    info = type("Server", (), {"url": f"{scheme}://127.0.0.1:{port}/score", "stats": stats})()
    try:
        yield info
    finally:
        server.close()


async def skip_request(reader: asyncio.StreamReader) -> bool:
    """Consume one request (our client always sends Content-Length); False at end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    await reader.readexactly(length)
    return True


def replying(*parts: bytes, then_wait_s: float = 0.2) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await skip_request(reader):
            for part in parts:
                writer.write(part)
            await writer.drain()
            await asyncio.sleep(then_wait_s)

    return handler


def test_answers_come_back_whole_over_kept_alive_connections() -> None:
    """Sequential calls share one pooled connection; status, body and content type come back intact."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"echo": await request.json()})

    async def scenario() -> None:
        client = HttpClient()
        seen: set[Any] = set()

        async def counting(request: web.Request) -> web.Response:
            seen.add(request.transport.get_extra_info("peername") if request.transport else None)
            return await echo(request)

        async with web_server(counting) as server:
            for i in range(5):
                assert await post(client, server.url, b'{"i": %d}' % i) == (200, b'{"echo": {"i": %d}}' % i)
            assert len(seen) == 1
            results = await asyncio.gather(*(post(client, server.url) for _ in range(10)))
            assert all(status == 200 for status, _ in results)
        await client.aclose()

    asyncio.run(scenario())


def test_one_session_per_event_loop() -> None:
    """The same client works across event loops (each loop gets its own pooled session)."""
    client = HttpClient()

    async def one() -> int:
        async with web_server(lambda request: _ok()) as server:
            return (await post(client, server.url))[0]

    assert asyncio.run(one()) == 200
    assert asyncio.run(one()) == 200


async def _ok() -> web.Response:
    return web.json_response({})


CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([CHUNKED, b"0x5\r\nhello\r\n0\r\n\r\n"], "invalid HTTP"),  # a chunk size that is not plain hex
        ([CHUNKED, b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n"], "invalid HTTP"),
        ([CHUNKED, b"5\r\nhelloXX0\r\n\r\n"], "invalid HTTP"),  # no CRLF after the chunk data
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"], "invalid HTTP"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"], "invalid HTTP"),
        (
            [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
            "invalid HTTP",
        ),
        (
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", b"3\r\nabc\r\n0\r\n\r\n"],
            "unsupported transfer coding",
        ),
        ([b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{}"], "framed its answer by closing"),
        ([b"SMTP ready\r\n\r\n"], "invalid HTTP"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"], "closed the connection"),
    ],
)
def test_malformed_answers_are_refused(parts: list[bytes], message: str) -> None:
    """Each framing fault the hand-written client let through is an UpstreamError now."""

    async def scenario() -> None:
        async with raw_server(replying(*parts)) as server:
            with pytest.raises(UpstreamError, match=message):
                await post(HttpClient(), server.url)

    asyncio.run(scenario())


def test_a_reset_during_the_body_is_never_a_whole_answer() -> None:
    """The server resets the connection part way through a body: an error, never a short answer."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await skip_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n" + b"x" * 100)
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def scenario() -> None:
        async with raw_server(handler) as server:
            with pytest.raises(UpstreamError, match=r"closed the connection|could not be reached"):
                await post(HttpClient(), server.url)

    asyncio.run(scenario())


def test_bodies_are_bounded() -> None:
    """A body that grows past the limit (chunk after chunk) is refused, not buffered without end."""

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=JSON)
        await response.prepare(request)
        for _ in range(200):
            await response.write(b"x" * 1024)
        await response.write_eof()
        return response

    async def scenario() -> None:
        async with web_server(endless) as server:
            async with HttpClient().post(server.url, b"{}", JSON, timeout_s=5, where="endpoint test") as answer:
                with pytest.raises(UpstreamError, match="more than 4096 bytes"):
                    await answer.read(limit=4096)

    asyncio.run(scenario())


def test_gzip_content_encoding_is_decoded() -> None:
    """Content-Encoding: gzip is a content coding aiohttp decodes: the JSON comes back as sent."""

    async def zipped(request: web.Request) -> web.Response:
        body = gzip.compress(b'{"output": "hi"}')
        return web.Response(body=body, headers={**JSON, "Content-Encoding": "gzip"})

    async def scenario() -> None:
        async with web_server(zipped) as server:
            assert await post(HttpClient(), server.url) == (200, b'{"output": "hi"}')

    asyncio.run(scenario())


def test_a_post_is_never_sent_twice() -> None:
    """A kept-alive connection that drops after a POST arrived is an error, not a silent second POST."""
    received: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await skip_request(reader):
            received.append(1)
            if len(received) == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
            else:
                return  # the second request arrived; hang up without answering

    async def scenario() -> None:
        client = HttpClient()
        async with raw_server(handler) as server:
            assert (await post(client, server.url))[0] == 200
            with pytest.raises(UpstreamError):
                await post(client, server.url)
            await asyncio.sleep(0.1)
            assert len(received) == 2 and server.stats["connections"] == 1

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("behaviour", "message", "timeout"),
    [("silent", "did not answer", True), ("hang-up", "closed the connection", False)],
)
def test_no_answer_is_an_upstream_error(behaviour: str, message: str, timeout: bool) -> None:
    """No answer within the time (504) or a hang-up (502) are UpstreamErrors, quickly."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await skip_request(reader)
        if behaviour == "silent":
            await asyncio.sleep(5)

    async def scenario() -> None:
        async with raw_server(handler) as server:
            started = time.monotonic()
            with pytest.raises(UpstreamError, match=message) as err:
                await post(HttpClient(), server.url, timeout_s=0.3)
            assert err.value.timeout is timeout and time.monotonic() - started < 3

    asyncio.run(scenario())


def test_refused_connection_is_an_upstream_error() -> None:
    """Nothing listening: UpstreamError saying it cannot connect."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UpstreamError, match="cannot connect"):
        asyncio.run(post(HttpClient(), f"http://127.0.0.1:{port}/score", timeout_s=2))


def test_the_environment_proxy_settings_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP(S)_PROXY sends the call through the proxy, as azure-core's calls go; NO_PROXY bypasses it."""
    through_proxy: list[str] = []

    async def proxy(request: web.Request) -> web.Response:
        through_proxy.append(str(request.url))
        return web.json_response({"via": "proxy"})

    async def direct(request: web.Request) -> web.Response:
        return web.json_response({"via": "direct"})

    async def scenario() -> tuple[bytes, bytes]:
        async with web_server(proxy) as forward, web_server(direct) as target:
            monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{forward.port}")
            monkeypatch.delenv("NO_PROXY", raising=False)
            monkeypatch.delenv("no_proxy", raising=False)
            via_proxy = (await post(HttpClient(), target.url))[1]
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
            bypassed = (await post(HttpClient(), target.url))[1]
            return via_proxy, bypassed

    for name in ("HTTPS_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    via_proxy, bypassed = asyncio.run(scenario())
    assert via_proxy == b'{"via": "proxy"}' and bypassed == b'{"via": "direct"}'
    assert len(through_proxy) == 1 and through_proxy[0].endswith("/score")


def _self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
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
    return server_ctx, cert_file


def test_tls_trusts_the_ca_bundle_of_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """https scoring URIs are verified against REQUESTS_CA_BUNDLE (or SSL_CERT_FILE), else certifi's roots."""
    server_ctx, cert_file = _self_signed(tmp_path)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await skip_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()

    async def scenario() -> None:
        async with raw_server(handler, tls=server_ctx) as server:
            monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
            monkeypatch.delenv("SSL_CERT_FILE", raising=False)
            with pytest.raises(UpstreamError, match="cannot connect"):  # certifi does not know this certificate
                await post(HttpClient(), server.url)
            monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_file))
            assert await post(HttpClient(), server.url) == (200, b"{}")
            monkeypatch.delenv("REQUESTS_CA_BUNDLE")
            monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
            assert await post(HttpClient(), server.url) == (200, b"{}")

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [({"Retry-After": "3"}, 3.0), ({"retry-after-ms": "250"}, 0.25), ({"Retry-After": "soon"}, None), ({}, None)],
)
def test_retry_after_is_read(headers: dict[str, str], seconds: float | None) -> None:
    """Retry-After (seconds) and retry-after-ms come back as seconds on a 429."""

    async def busy(request: web.Request) -> web.Response:
        return web.json_response({"error": "busy"}, status=429, headers=headers)

    async def scenario() -> None:
        async with web_server(busy) as server:
            async with HttpClient().post(server.url, b"{}", JSON, timeout_s=5, where="test") as answer:
                assert (answer.status, answer.retry_after) == (429, seconds)

    asyncio.run(scenario())


def test_retry_after_http_date() -> None:
    """An HTTP-date Retry-After is turned into seconds from now."""
    from email.utils import format_datetime

    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    seconds = retry_after_value(format_datetime(when, usegmt=True))
    assert seconds is not None and 25 <= seconds <= 31


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


BODY = b'{"input_data": {"input_string": [[{"role": "user", "content": "hi"}]], "parameters": {}}}'


def test_rotated_key_is_refreshed_after_a_401() -> None:
    """After a key rotation the cached key gets a 401; the caller refetches once and succeeds."""
    with LoopbackUpstream(key="old-key-1111") as upstream:
        backend = CredentialsBackend(upstream)
        caller = EndpointCaller(HttpClient(), CredentialCache(backend.get_credentials, ttl_s=600))

        async def scenario() -> None:
            first = await caller.post_json("ep", "blue", BODY, request_id="rid-1", timeout_s=5)
            assert first.status == 200
            upstream.key = "new-key-2222"
            second = await caller.post_json("ep", "blue", BODY, request_id="rid-2", timeout_s=5)
            assert second.status == 200
            backend.key = "stale-key-3333"
            upstream.key = "newer-key-4444"
            third = await caller.post_json("ep", "blue", BODY, request_id="rid-3", timeout_s=5)
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


def test_blocking_callers_share_the_client_and_the_credential_cache() -> None:
    """The roll-out's smoke test calls from a worker thread without a loop: same caller, same cached key."""
    with LoopbackUpstream() as upstream:
        backend = CredentialsBackend(upstream)
        caller = EndpointCaller(HttpClient(), CredentialCache(backend.get_credentials, ttl_s=600))
        try:
            assert asyncio.run(caller.post_json("ep", "blue", BODY, request_id="r1", timeout_s=5)).status == 200
            results: list[int] = []
            workers = [
                threading.Thread(
                    target=lambda: results.append(
                        caller.post_json_blocking("ep", "green", BODY, request_id="r2", timeout_s=5).status
                    )
                )
                for _ in range(3)
            ]
            for w in workers:
                w.start()
            for w in workers:
                w.join(30)
            assert results == [200, 200, 200] and backend.calls == ["ep"]
            assert upstream.seen[-1].headers["azureml-model-deployment"] == "green"
        finally:
            caller.close_blocking()


def test_streamed_answers_arrive_line_by_line() -> None:
    """An NDJSON answer is read as its lines arrive, before the upstream has finished."""

    async def streaming(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write(b'{"delta": "a"}\n')
        await asyncio.sleep(0.3)
        await response.write(b'{"delta": "b"}\n{"finish_reason": "stop"}\n')
        await response.write_eof()
        return response

    async def scenario() -> None:
        async with web_server(streaming) as server:
            async with HttpClient().post(server.url, b"{}", JSON, timeout_s=5, where="test") as answer:
                assert answer.streamed
                started = time.monotonic()
                arrivals = [(line, time.monotonic() - started) async for line in answer.lines()]
        assert [line for line, _ in arrivals] == [
            b'{"delta": "a"}\n',
            b'{"delta": "b"}\n',
            b'{"finish_reason": "stop"}\n',
        ]
        assert arrivals[0][1] < 0.2 <= arrivals[1][1]

    asyncio.run(scenario())
