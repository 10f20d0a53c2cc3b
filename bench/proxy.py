"""Scoring proxy benchmark: added latency and throughput of our proxy against direct calls, a naive
pass-through (Starlette + one shared httpx client) and, when installable, LiteLLM; the CPU cost of
the two candidate HTTP clients; and time to first token on the local model, through the proxy and direct.

One run starts, each in its own process:
- an instant upstream that answers every POST with a fixed chat.completion (uvicorn + httptools, a raw
  ASGI callable);
- our proxy: the chat blueprint served by the dev host (`tunegrid.devhost.DevHost`: uvicorn + httptools
  + uvloop, one worker, FastAPI requests as the worker hands them over), with a fake backend port
  pointing at the upstreams and an in-memory ledger holding two live runs (the instant upstream, with
  room for 256 calls at once, and the local tiny model, capacity 1);
- the naive pass-through (uvicorn, one worker);
- LiteLLM (`litellm --config`, one worker) from a separate venv, if `--litellm` points at one;
- the local endpoint: the tiny model's deployment server and its router (`tunegrid.local`), for time
  to first token (skipped with `--no-ttft`).

The load generator is aiohttp's client on uvloop (one keep-alive connection per concurrent caller).
Concurrency 1: 1,000 requests, latency p50/p99 per path; the proxy's *added* latency is its percentile
minus the direct one. Concurrency 64: 5,000 requests after a 1,000-request warm-up; requests per
second and errors. Clients: 2,000 sequential POSTs to the instant upstream with aiohttp and with httpx,
CPU microseconds per request of the calling process (why the proxy uses aiohttp). Time to first
token: 20 streamed requests each, direct to the endpoint (NDJSON) and through the proxy (SSE), median
time to the first piece of text.

Last line: `PROXY_BENCH {json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_KEY = "bench-proxy-key-0123456789"
UPSTREAM_KEY = "bench-upstream-key-abcdef"
LOCAL_KEY = "bench-local-endpoint-key"
LOCAL_TOKEN = "bench-local-server-token"
FIXED_ANSWER = json.dumps(
    {
        "id": "chatcmpl-upstream",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    }
).encode()
CHAT_BODY = json.dumps(
    {"model": "bench", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 32}
).encode()
SCORE_BODY = json.dumps(
    {
        "input_data": {
            "input_string": [[{"role": "user", "content": "Say hello."}]],
            "parameters": {"max_new_tokens": 32},
        },
        "params": {},
    }
).encode()


# ------------------------------------------------------------------------------------------ servers


def serve_upstream(port_file: str) -> None:
    """The instant upstream: any POST gets the fixed chat.completion (keep-alive; uvicorn parses HTTP)."""
    import uvicorn

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(FIXED_ANSWER)).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": FIXED_ANSWER})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    Path(port_file).write_text(str(sock.getsockname()[1]))
    config = uvicorn.Config(
        app, http="httptools", loop="uvloop", lifespan="off", access_log=False, log_level="warning", backlog=1024
    )
    uvicorn.Server(config).run(sockets=[sock])


def serve_proxy(port_file: str, upstream_port: int, local_port: int | None) -> None:
    """Our proxy on the dev host, one worker, with a fake backend and an in-memory ledger."""
    sys.path.insert(0, str(ROOT))
    from datetime import UTC, datetime

    import azure.functions as func
    from azure.core.exceptions import ResourceNotFoundError

    from functions import chat
    from shared.bootstrap import AppContext, set_app_context
    from shared.domain.resources import EndpointCredentials
    from shared.domain.runs import RunRecord, RunState
    from shared.settings import Settings
    from tunegrid.devhost import DevHost

    class Backend:
        name = "bench"

        def get_credentials(self, endpoint: str) -> EndpointCredentials:
            if endpoint == "ep-tiny":
                return EndpointCredentials(scoring_uri=f"http://127.0.0.1:{local_port}/score", key=LOCAL_KEY)
            return EndpointCredentials(scoring_uri=f"http://127.0.0.1:{upstream_port}/score", key=UPSTREAM_KEY)

    now = datetime.now(UTC)

    def live(name: str, endpoint: str, **extra: Any) -> RunRecord:
        return RunRecord(
            run_id=f"r{name}",
            state=RunState.LIVE,
            container="training-data",
            blob="bench.jsonl",
            blob_version="v1",
            created_at=now,
            updated_at=now,
            model_name=name,
            model_version="1",
            endpoint=endpoint,
            deployment="blue",
            extra=extra,
        )

    # The instant upstream stands for a deployment with room for 256 calls at once; the tiny model
    # serves one at a time (its server's --max-concurrent 1).
    records = [live("bench", "ep-bench")]
    if local_port:
        records.append(live("tiny", "ep-tiny", sidecar={"deployment": {"max_concurrent_requests_per_instance": 1}}))

    class Ledger:
        def list(self) -> list[RunRecord]:
            return records

    class _Row(dict[str, Any]):
        metadata: dict[str, str]

    class MemoryTable:
        """The few TableClient calls the usage recorder makes (it flushes at most once a minute)."""

        def __init__(self) -> None:
            self.rows: dict[tuple[str, str], dict[str, Any]] = {}

        def get_entity(self, pk: str, rk: str) -> Any:
            if (pk, rk) not in self.rows:
                raise ResourceNotFoundError("no row")

            row = _Row(self.rows[(pk, rk)])
            row.metadata = {"etag": "1"}
            return row

        def create_entity(self, entity: dict[str, Any]) -> None:
            self.rows[(entity["PartitionKey"], entity["RowKey"])] = entity

        def update_entity(self, entity: dict[str, Any], **_: Any) -> None:
            self.create_entity(entity)

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # the host thread inherits it
    settings = Settings.from_env({"PROXY_API_KEYS": BENCH_KEY, "MAX_CONCURRENT_REQUESTS_PER_INSTANCE": "256"})
    set_app_context(
        AppContext(settings, overrides={"ledger": Ledger(), "backend": Backend(), "usage_table": MemoryTable()})
    )
    app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
    app.register_functions(chat.bp)
    with (
        tempfile.TemporaryDirectory() as state,
        DevHost(app, settings={}, port=0, state_dir=Path(state), root=ROOT) as host,
    ):
        Path(port_file).write_text(str(host.port))
        signal.sigwait({signal.SIGTERM, signal.SIGINT})


def serve_naive(port_file: str, upstream_port: int) -> None:
    """The floor: Starlette + one shared httpx.AsyncClient, one uvicorn worker."""
    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    client: httpx.AsyncClient | None = None
    url = f"http://127.0.0.1:{upstream_port}/score"

    async def chat(request: Request) -> Response:
        nonlocal client
        if client is None:
            client = httpx.AsyncClient(limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))
        body = await request.body()
        upstream = await client.post(
            url, content=body, headers={"Authorization": f"Bearer {UPSTREAM_KEY}", "Content-Type": "application/json"}
        )
        return Response(upstream.content, status_code=upstream.status_code, media_type="application/json")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    Path(port_file).write_text(str(sock.getsockname()[1]))
    uvicorn.Server(uvicorn.Config(app, http="httptools", loop="uvloop", access_log=False, log_level="warning")).run(
        sockets=[sock]
    )


# ------------------------------------------------------------------------------------------ load


async def _post(session: Any, url: str, body: bytes, headers: dict[str, str]) -> int:
    async with session.post(url, data=body, headers=headers) as reply:
        await reply.read()
        return int(reply.status)


def _session(concurrency: int) -> Any:
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, force_close=False), skip_auto_headers=("User-Agent",)
    )


async def measure_c1(url: str, body: bytes, headers: dict[str, str], n: int) -> tuple[list[float], int]:
    errors = 0
    async with _session(1) as session:
        for _ in range(min(200, n)):
            await _post(session, url, body, headers)
        lat = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            status = await _post(session, url, body, headers)
            lat.append((time.perf_counter_ns() - t0) / 1e6)
            errors += status != 200
    return lat, errors


def _cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) of the server process and its children so far."""
    if pid is None:
        return 0.0
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


async def measure_cn(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, n: int, warmup: int, *, server_pid: int | None
) -> tuple[float, int, float]:
    """Requests per second, errors, and the server's CPU microseconds per request over the timed part."""
    errors = 0
    async with _session(concurrency) as session:

        async def run(total: int) -> None:
            nonlocal errors
            left = total

            async def worker() -> None:
                nonlocal left, errors
                while left > 0:
                    left -= 1
                    try:
                        status = await _post(session, url, body, headers)
                    except OSError:
                        errors += 1
                        continue
                    errors += status != 200

            await asyncio.gather(*(worker() for _ in range(concurrency)))

        await run(warmup)
        errors = 0
        cpu0 = _cpu_seconds(server_pid)
        t0 = time.perf_counter()
        await run(n)
        elapsed = time.perf_counter() - t0
        cpu_us = (_cpu_seconds(server_pid) - cpu0) / n * 1e6
    return n / elapsed, errors, cpu_us


async def client_cpu(url: str, n: int) -> dict[str, float]:
    """CPU microseconds per sequential POST of this process, aiohttp's client against httpx's."""
    import httpx

    headers = {"Authorization": f"Bearer {UPSTREAM_KEY}", "Content-Type": "application/json"}
    out: dict[str, float] = {}
    async with _session(1) as session:
        for _ in range(200):
            await _post(session, url, SCORE_BODY, headers)
        t0 = time.process_time()
        for _ in range(n):
            await _post(session, url, SCORE_BODY, headers)
        out["aiohttp"] = (time.process_time() - t0) / n * 1e6
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            (await client.post(url, content=SCORE_BODY, headers=headers)).read()
        t0 = time.process_time()
        for _ in range(n):
            (await client.post(url, content=SCORE_BODY, headers=headers)).read()
        out["httpx"] = (time.process_time() - t0) / n * 1e6
    return out


async def first_token(url: str, body: bytes, headers: dict[str, str], *, sse: bool, n: int) -> list[float]:
    """Seconds from sending to the first piece of text, for `n` streamed requests one after another."""
    times = []
    async with _session(1) as session:
        for _ in range(n):
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as reply:
                assert reply.status == 200, reply.status
                first = None
                async for line in reply.content:  # read to the end: the deployment is free for the next one
                    if first is None and (
                        (sse and line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line)
                        or (not sse and line.startswith(b'{"delta"'))
                    ):
                        first = time.perf_counter() - t0
                assert first is not None, "no text came"
                times.append(first)
    return times


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------------------------------ orchestration


def _spawn(
    args: list[str], port_file: Path, *, env: dict[str, str] | None = None, timeout_s: float = 90.0
) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"{args[:3]} exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{args[:3]} did not start in {timeout_s} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(port: int, path: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("exited before it listened")
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1)
            return
        time.sleep(0.5)
    raise RuntimeError(f"nothing answered on port {port} within {timeout_s} s")


def start_local_endpoint(tmp: Path) -> Any:
    """The tiny model's deployment server (capacity 1) and its endpoint router, as the local backend starts them."""
    sys.path.insert(0, str(ROOT))
    from tunegrid.local.base_models import prepare_tiny_phi3
    from tunegrid.local.standalone import StandaloneEndpoint

    model = prepare_tiny_phi3(tmp / "model-cache")
    return StandaloneEndpoint(model, tmp, name="ep-tiny", key=LOCAL_KEY, token=LOCAL_TOKEN).wait_ready()


def start_litellm(litellm_bin: Path, upstream_port: int, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: bench\n"
        "    litellm_params:\n"
        "      model: openai/bench\n"
        f"      api_base: http://127.0.0.1:{upstream_port}/v1\n"
        f"      api_key: {UPSTREAM_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    port = _free_port()
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_MASTER_KEY": "sk-" + BENCH_KEY,
        "LITELLM_LOG": "ERROR",
    }
    proc = subprocess.Popen(
        [str(litellm_bin), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        cwd=tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_http(port, "/health/liveliness", 180, proc)
    return proc, port


async def bench_path(
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str],
    *,
    c1: int,
    cn: int,
    warmup: int,
    concurrency: int,
    server_pid: int | None = None,
) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}{path}"
    headers = {**headers, "Content-Type": "application/json"}
    lat, c1_errors = await measure_c1(url, body, headers, c1)
    rps, errors, cpu_us = await measure_cn(url, body, headers, concurrency, cn, warmup, server_pid=server_pid)
    return {
        "p50_ms": _pct(lat, 0.50),
        "p99_ms": _pct(lat, 0.99),
        "rps": rps,
        "errors": errors + c1_errors,
        "cpu_us": cpu_us,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    me = [sys.executable, str(Path(__file__).resolve())]
    load = round(os.getloadavg()[0], 2)  # the machine is shared: say how busy it was
    results: dict[str, dict[str, Any]] = {}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        try:
            upstream, up_port = _spawn([*me, "--serve-upstream", str(tmp / "up")], tmp / "up")
            procs.append(upstream)
            local_port = 0
            if args.ttft:
                local = start_local_endpoint(tmp)
                procs.extend(local.processes)
                local_port = local.router_port
            proxy, proxy_port = _spawn(
                [
                    *me,
                    "--serve-proxy",
                    str(tmp / "proxy"),
                    "--upstream-port",
                    str(up_port),
                    "--local-port",
                    str(local_port),
                ],
                tmp / "proxy",
            )
            procs.append(proxy)
            naive, naive_port = _spawn(
                [*me, "--serve-naive", str(tmp / "naive"), "--upstream-port", str(up_port)], tmp / "naive"
            )
            procs.append(naive)
            litellm = None
            if args.litellm and Path(args.litellm).exists():
                try:
                    litellm, litellm_port = start_litellm(Path(args.litellm), up_port, tmp)
                    procs.append(litellm)
                except RuntimeError as exc:
                    print(f"litellm: not measured ({exc})", file=sys.stderr)
                    litellm = None
            knobs = {"c1": args.c1, "cn": args.cn, "warmup": args.warmup, "concurrency": args.concurrency}
            auth = {"Authorization": f"Bearer {BENCH_KEY}"}
            paths = [
                ("direct", up_port, upstream.pid, "/score", SCORE_BODY, {"Authorization": f"Bearer {UPSTREAM_KEY}"}),
                ("proxy", proxy_port, proxy.pid, "/api/v1/chat/completions", CHAT_BODY, auth),
                ("naive", naive_port, naive.pid, "/v1/chat/completions", CHAT_BODY, {}),
            ]
            if litellm is not None:
                lite_auth = {"Authorization": f"Bearer sk-{BENCH_KEY}"}
                paths.append(("litellm", litellm_port, litellm.pid, "/v1/chat/completions", CHAT_BODY, lite_auth))
            for name, port, pid, path, body, headers in paths:
                extra = {"c1": min(args.c1, 300), "cn": min(args.cn, 1000), "warmup": 100} if name == "litellm" else {}
                results[name] = uvloop.run(bench_path(port, path, body, headers, server_pid=pid, **{**knobs, **extra}))
                r = results[name]
                print(
                    f"{name:8s} c1 p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms   c{args.concurrency} {r['rps']:.0f} req/s"
                    f"  errors {r['errors']}  server CPU {r['cpu_us']:.0f} us/req",
                    file=sys.stderr,
                    flush=True,
                )
            clients = uvloop.run(client_cpu(f"http://127.0.0.1:{up_port}/score", args.client_n))
            print(
                f"clients  CPU per request: aiohttp {clients['aiohttp']:.0f} us, httpx {clients['httpx']:.0f} us",
                file=sys.stderr,
            )
            ttft: dict[str, float] = {}
            if args.ttft:
                stream_body = json.dumps(
                    {
                        "model": "tiny",
                        "messages": [{"role": "user", "content": "Say hello."}],
                        "max_tokens": 64,
                        "temperature": 0,
                        "stream": True,
                    }
                ).encode()
                direct_body = json.dumps(
                    {
                        "input_data": {
                            "input_string": [[{"role": "user", "content": "Say hello."}]],
                            "parameters": {"max_new_tokens": 64, "do_sample": False},
                        }
                    }
                ).encode()
                for name, url, body, headers, sse in (
                    (
                        "direct",
                        f"http://127.0.0.1:{local_port}/score",
                        direct_body,
                        {
                            "Authorization": f"Bearer {LOCAL_KEY}",
                            "Accept": "application/x-ndjson",
                            "azureml-model-deployment": "blue",
                        },
                        False,
                    ),
                    ("proxy", f"http://127.0.0.1:{proxy_port}/api/v1/chat/completions", stream_body, auth, True),
                ):
                    times = uvloop.run(
                        first_token(url, body, {**headers, "Content-Type": "application/json"}, sse=sse, n=args.ttft_n)
                    )
                    ttft[name] = _pct(times, 0.5) * 1000
                    print(f"ttft     {name:7s} median {ttft[name]:.1f} ms over {len(times)}", file=sys.stderr)
        finally:
            for proc in reversed(procs):
                _stop(proc)
    direct = results["direct"]
    lite = results.get("litellm")
    return {
        "c1_p50_added_ms": round(results["proxy"]["p50_ms"] - direct["p50_ms"], 3),
        "c1_p99_added_ms": round(results["proxy"]["p99_ms"] - direct["p99_ms"], 3),
        "c64_rps_direct": round(direct["rps"]),
        "c64_rps_proxy": round(results["proxy"]["rps"]),
        "c64_rps_naive": round(results["naive"]["rps"]),
        "c64_errors": results["proxy"]["errors"],
        "naive_c1_p50_added_ms": round(results["naive"]["p50_ms"] - direct["p50_ms"], 3),
        "litellm_c1_p50_added_ms": round(lite["p50_ms"] - direct["p50_ms"], 3) if lite else None,
        "litellm_c64_rps": round(lite["rps"]) if lite else None,
        "c64_proxy_cpu_us_per_req": round(results["proxy"]["cpu_us"]),
        "c64_naive_cpu_us_per_req": round(results["naive"]["cpu_us"]),
        "client_cpu_us_aiohttp": round(clients["aiohttp"]),
        "client_cpu_us_httpx": round(clients["httpx"]),
        "ttft_direct_ms": round(ttft["direct"], 1) if ttft else None,
        "ttft_proxy_ms": round(ttft["proxy"], 1) if ttft else None,
        "ttft_added_ms": round(ttft["proxy"] - ttft["direct"], 1) if ttft else None,
        "load_avg_1m_at_start": load,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-upstream", metavar="PORT_FILE")
    parser.add_argument("--serve-proxy", metavar="PORT_FILE")
    parser.add_argument("--serve-naive", metavar="PORT_FILE")
    parser.add_argument("--upstream-port", type=int)
    parser.add_argument("--local-port", type=int, default=0)
    parser.add_argument("--client-n", type=int, default=2000, help="sequential POSTs per client library")
    parser.add_argument("--ttft-n", type=int, default=20, help="streamed requests per path for time to first token")
    parser.add_argument("--no-ttft", dest="ttft", action="store_false", help="skip the local model")
    parser.add_argument("--c1", type=int, default=1000, help="requests at concurrency 1")
    parser.add_argument("--cn", type=int, default=5000, help="requests at high concurrency")
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--litellm",
        default=os.environ.get("LITELLM_BIN", "/tmp/litellm-venv/bin/litellm"),
        help="litellm executable ('' to skip)",
    )
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    if args.serve_proxy:
        serve_proxy(args.serve_proxy, args.upstream_port, args.local_port or None)
        return 0
    if args.serve_naive:
        serve_naive(args.serve_naive, args.upstream_port)
        return 0
    figures = run(args)
    print("PROXY_BENCH " + json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
