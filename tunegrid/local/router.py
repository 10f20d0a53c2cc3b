"""An endpoint's front door: `python -m tunegrid.local.router --endpoint-dir DIR --port P`.

Managed-online-endpoint semantics on 127.0.0.1:
- key auth: `Authorization: Bearer <primary or secondary key>` (401 otherwise);
- the `azureml-model-deployment` header sends a request to that deployment, bypassing traffic rules;
- otherwise a deployment is drawn by the traffic percentages (404 when every share is 0);
- mirror traffic: a share of the traffic-routed requests is copied to a deployment, its answer dropped;
- the deployment's request timeout answers 408;
- answers pass through as they arrive (a deployment's streamed answer stays streamed), and a caller
  that hangs up closes the call to the deployment, which stops its generation;
- request counters (total, per minute, per deployment, last request time) for the janitor, kept in
  memory, persisted to `activity.json` within a second, and read back at start.

It reads `endpoint.json` (written by the backend) again whenever the file changes, so traffic
changes apply to the next request. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shared.domain.clock import iso, utcnow
from shared.domain.keys import KeySet
from tunegrid.local.streaming import StreamedBody
from tunegrid.local.workspace import read_json, write_json_atomic

log = logging.getLogger("tunegrid.router")

DEPLOYMENT_HEADER = "azureml-model-deployment"
KEEP_MINUTES = 7 * 24 * 60


class Activity:
    """Counters of authenticated scoring requests, bucketed per minute (like RequestsPerMinute)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        doc = read_json(path) or {}
        self.total = int(doc.get("total", 0))
        self.last_request_at: str | None = doc.get("last_request_at")
        self.per_minute: dict[str, int] = {str(k): int(v) for k, v in (doc.get("per_minute") or {}).items()}
        self.per_deployment: dict[str, int] = {str(k): int(v) for k, v in (doc.get("per_deployment") or {}).items()}
        self.mirrored: dict[str, int] = {str(k): int(v) for k, v in (doc.get("mirrored") or {}).items()}
        self.dirty = True

    def record_mirror(self, deployment: str) -> None:
        """A mirrored copy the shadow deployment answered (not a request of the endpoint's callers)."""
        self.mirrored[deployment] = self.mirrored.get(deployment, 0) + 1
        self.dirty = True

    def record(self, deployment: str | None) -> None:
        now = utcnow()
        minute = str(int(now.timestamp() // 60))
        self.total += 1
        self.last_request_at = iso(now)
        self.per_minute[minute] = self.per_minute.get(minute, 0) + 1
        if deployment:
            self.per_deployment[deployment] = self.per_deployment.get(deployment, 0) + 1
        self.dirty = True

    def to_dict(self) -> dict[str, Any]:
        floor = int(time.time() // 60) - KEEP_MINUTES
        self.per_minute = {k: v for k, v in self.per_minute.items() if int(k) >= floor}
        return {
            "total": self.total,
            "last_request_at": self.last_request_at,
            "per_minute": dict(self.per_minute),
            "per_deployment": dict(self.per_deployment),
            "mirrored": dict(self.mirrored),
            "saved_at": iso(utcnow()),
        }

    def save(self) -> None:
        if self.dirty:
            self.dirty = False
            write_json_atomic(self.path, self.to_dict())


class EndpointView:
    """endpoint.json, re-read when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mtime = -1.0
        self.doc: dict[str, Any] = {}

    def current(self) -> dict[str, Any]:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return self.doc
        if mtime != self.mtime:
            doc = read_json(self.path)
            if doc is not None:
                self.doc, self.mtime = doc, mtime
        return self.doc


def authorized(doc: Mapping[str, Any], header: str | None) -> bool:
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    keys = doc.get("keys") or {}
    return KeySet(str(k) for k in (keys.get("primary"), keys.get("secondary")) if k).matches(given)


def pick_deployment(traffic: Mapping[str, int], *, draw: float) -> str | None:
    """The deployment a traffic-routed request goes to; `draw` is uniform in [0, 100)."""
    upto = 0.0
    for name, share in sorted(traffic.items()):
        if share <= 0:
            continue
        upto += share
        if draw < upto:
            return name
    return None


def build_app(endpoint_dir: Path) -> Any:
    import aiohttp
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    view = EndpointView(endpoint_dir / "endpoint.json")
    activity = Activity(endpoint_dir / "activity.json")
    sessions: list[aiohttp.ClientSession] = []  # one pooled session, made on the server's loop
    rng = random.Random()
    background: set[asyncio.Task[Any]] = set()

    def session() -> aiohttp.ClientSession:
        if not sessions:
            sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), auto_decompress=False))
        return sessions[0]

    async def flush_loop() -> None:
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(OSError):
                activity.save()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        activity.save()
        task = asyncio.create_task(flush_loop())
        try:
            yield
        finally:
            task.cancel()
            activity.save()
            for open_session in sessions:
                await open_session.close()

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "Healthy", "endpoint": view.current().get("name")})

    async def activity_route(request: Request) -> JSONResponse:
        if not authorized(view.current(), request.headers.get("authorization")):
            return JSONResponse({"message": "unauthorized"}, status_code=401)
        return JSONResponse(activity.to_dict())

    async def forward(
        deployment: Mapping[str, Any], path: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> aiohttp.ClientResponse:
        """The deployment's answer with its head read; the caller reads (or drops) the body."""
        port = (deployment.get("server") or {}).get("port")
        sent = {
            "authorization": f"Bearer {deployment.get('token', '')}",
            "content-type": headers.get("content-type", "application/json"),
        }
        if headers.get("accept"):
            sent["accept"] = headers["accept"]
        return await session().post(
            f"http://127.0.0.1:{port}{path}",
            data=body,
            headers=sent,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )

    async def mirror(
        deployment: Mapping[str, Any], path: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> None:
        with contextlib.suppress(Exception):
            answer = await forward(deployment, path, body, {"content-type": headers.get("content-type", "")}, timeout_s)
            async with answer:
                await answer.read()
                if answer.status < 400:
                    activity.record_mirror(str(deployment.get("name")))

    async def relay(answer: aiohttp.ClientResponse) -> Any:
        try:
            async for chunk in answer.content.iter_any():
                yield chunk
        finally:
            answer.close() if not answer.content.at_eof() else answer.release()

    async def score(request: Request) -> Response | StreamedBody:
        doc = view.current()
        if not authorized(doc, request.headers.get("authorization")):
            return JSONResponse(
                {"message": "unauthorized: pass a key of this endpoint as 'Authorization: Bearer <key>'"},
                status_code=401,
            )
        deployments: Mapping[str, Any] = doc.get("deployments") or {}
        target = request.headers.get(DEPLOYMENT_HEADER)
        routed_by_traffic = not target
        if target:
            if target not in deployments:
                return JSONResponse(
                    {"message": f"deployment {target} not found on endpoint {doc.get('name')}"}, status_code=404
                )
        else:
            target = pick_deployment(doc.get("traffic") or {}, draw=rng.uniform(0, 100))
            if target is None or target not in deployments:
                return JSONResponse(
                    {
                        "message": "No valid deployments to route to. Give a deployment traffic or use the azureml-model-deployment header."
                    },
                    status_code=404,
                )
        deployment = deployments[target]
        activity.record(target)
        if deployment.get("provisioning_state") != "Succeeded":
            return JSONResponse(
                {"message": f"deployment {target} is not ready ({deployment.get('provisioning_state')})"},
                status_code=503,
            )
        body = await request.body()
        timeout_s = max(0.001, int(deployment.get("request_timeout_ms") or 90_000) / 1000)
        path = request.url.path
        if routed_by_traffic:
            for name, share in (doc.get("mirror_traffic") or {}).items():
                shadow = deployments.get(name)
                if (
                    shadow
                    and share > 0
                    and name != target
                    and rng.uniform(0, 100) < share
                    and shadow.get("provisioning_state") == "Succeeded"
                ):
                    task = asyncio.create_task(mirror(shadow, path, body, request.headers, timeout_s))
                    background.add(task)
                    task.add_done_callback(background.discard)
        try:
            upstream = await forward(deployment, path, body, request.headers, timeout_s)
        except TimeoutError:
            return JSONResponse(
                {"message": f"request timed out after {timeout_s:.0f} s (request_timeout_ms)"},
                status_code=408,
                headers={DEPLOYMENT_HEADER: target},
            )
        except aiohttp.ClientError as exc:
            return JSONResponse(
                {"message": f"deployment {target} is not responding ({type(exc).__name__})"},
                status_code=502,
                headers={DEPLOYMENT_HEADER: target},
            )
        headers = [
            (b"content-type", upstream.headers.get("content-type", "application/json").encode("latin-1")),
            (DEPLOYMENT_HEADER.encode(), target.encode()),
        ]
        return StreamedBody(relay(upstream), status=upstream.status, headers=headers)

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/", health, methods=["GET"]),
            Route("/-/activity", activity_route, methods=["GET"]),
            Route("/score", score, methods=["POST"]),
            Route("/v1/chat/completions", score, methods=["POST"]),
            Route("/chat/completions", score, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunegrid.local.router")
    parser.add_argument("--endpoint-dir", required=True, type=Path)
    parser.add_argument("--port", required=True, type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s router %(levelname)s: %(message)s")
    import uvicorn

    log.info("endpoint router for %s on 127.0.0.1:%d", args.endpoint_dir.name, args.port)
    uvicorn.run(build_app(args.endpoint_dir), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
