"""Dev host overhead: a trivial anonymous async echo function behind `python -m tunegrid devhost` (one
worker) versus a bare uvicorn raw-ASGI app on the same stack (uvloop + httptools). Needs `wrk`.
Prints requests/s at concurrency 64 and p50/p99 at concurrency 1, then `DEVHOST_BENCH {json}`."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ECHO_APP = """
import azure.functions as func
app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
@app.route(route="echo", methods=["GET", "POST"])
async def echo(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(req.get_body() or b"ok", mimetype="application/json")
"""
BARE_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def wrk(url: str, conns: int, secs: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--latency", url], capture_output=True, text=True, check=True
    ).stdout

    def ms(label: str) -> float:
        v, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()
        return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|Socket errors:.*?):?\s+(\d+)", out))
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": ms("50%"),
        "p99_ms": ms("99%"),
        "errors": errors,
    }


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="devhost-bench-"))
    (work / "echo_app.py").write_text(ECHO_APP)
    (work / "bare_app.py").write_text(BARE_APP)
    py = sys.executable
    results = {}
    for name, cmd, path in (
        (
            "bare",
            [
                py,
                "-m",
                "uvicorn",
                "bare_app:app",
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
                "--lifespan",
                "off",
                "--no-proxy-headers",
            ],
            "/",
        ),
        (
            "devhost",
            [py, "-m", "tunegrid", "devhost", "--app", "echo_app:app", "--state-dir", str(work / "state")],
            "/api/echo",
        ),
    ):
        port = free_port()
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)], cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_port(port)
            url = f"http://127.0.0.1:{port}{path}"
            wrk(url, 64, 2)  # warm-up
            server = psutil.Process(proc.pid)
            cpu0 = sum(server.cpu_times()[:2])
            c64 = wrk(url, 64, 8)
            cpu = sum(server.cpu_times()[:2]) - cpu0
            c64["server_cpu_us_per_request"] = round(cpu / (c64["rps"] * 8) * 1e6, 1)
            results[name] = {"c64": c64, "c1": wrk(url, 1, 5)}
        finally:
            proc.terminate()
            proc.wait(10)
        print(name, json.dumps(results[name]), flush=True)
    summary = {
        "c64_rps_devhost": results["devhost"]["c64"]["rps"],
        "c64_rps_bare_uvicorn": results["bare"]["c64"]["rps"],
        "c1_p50_ms_devhost": results["devhost"]["c1"]["p50_ms"],
        "c1_p50_ms_bare_uvicorn": results["bare"]["c1"]["p50_ms"],
        "c1_p50_added_ms": round(results["devhost"]["c1"]["p50_ms"] - results["bare"]["c1"]["p50_ms"], 3),
        "c1_p99_ms_devhost": results["devhost"]["c1"]["p99_ms"],
        "server_cpu_us_per_request_devhost": results["devhost"]["c64"]["server_cpu_us_per_request"],
        "server_cpu_us_per_request_bare_uvicorn": results["bare"]["c64"]["server_cpu_us_per_request"],
        "errors": results["devhost"]["c64"]["errors"] + results["devhost"]["c1"]["errors"],
    }
    print("DEVHOST_BENCH " + json.dumps(summary))


if __name__ == "__main__":
    main()
