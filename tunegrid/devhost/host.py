"""`DevHost`: the local Functions host for a `func.FunctionApp`, without Core Tools.

It serves HTTP and Event Grid triggers on one uvicorn server (uvloop + httptools, one worker, a raw
ASGI callable), polls blob triggers and runs timer triggers on the same event loop, in a background
thread. `start()` returns once the port is bound; `stop()` stops accepting, lets in-flight
invocations finish (bounded), stops the timers and watchers and restores the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from tunegrid.devhost.asgi import HostAsgiApp
from tunegrid.devhost.blobs import BlobTriggerWatcher
from tunegrid.devhost.catalog import (
    BLOB_TRIGGER,
    EVENT_GRID_TRIGGER,
    HTTP_TRIGGER,
    TIMER_TRIGGER,
    app_directory,
    app_functions,
    build_catalog,
    import_app,
)
from tunegrid.devhost.config import HostConfig, LocalSettings, apply_to_environ, load_local_settings
from tunegrid.devhost.eventgrid import EventGridDispatcher
from tunegrid.devhost.invoker import Invoker, RetryPolicy
from tunegrid.devhost.keys import KeyStore
from tunegrid.devhost.routing import RouteTable, compile_route
from tunegrid.devhost.topic import TOPIC_PATH, RunEventsTopic

log = logging.getLogger("tunegrid.devhost")

DEFAULT_APP = "function_app:app"
DEFAULT_PORT = 7071
EVENT_KEY_SETTING = "LOCAL_EVENT_KEY"
EVENT_KEY_DEFAULT = "local-dev-event-key"


@dataclass(frozen=True)
class HostTimings:
    """Knobs that tests turn down: blob poll interval, retry backoff, shutdown bound."""

    blob_poll_interval_s: float = 1.0
    blob_retry_first_delay_s: float = 1.0
    event_tries: int = 3
    event_retry_first_delay_s: float = 0.5
    shutdown_timeout_s: float = 30.0
    timer_late_tolerance_s: float = 1.0
    run_event_tries: int = 6
    run_event_retry_first_delay_s: float = 1.0
    run_event_drain_s: float = 5.0


def _default_state_dir(env: Mapping[str, str]) -> Path:
    return Path(env.get("LOCAL_WORKSPACE_DIR") or ".tunegrid").expanduser().resolve() / "devhost"


class DevHost:
    """A local host for one function app. Use `with DevHost(...) as host:` or `start()` / `stop()`."""

    def __init__(
        self,
        app: object | str = DEFAULT_APP,
        *,
        settings: Mapping[str, str] | Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = DEFAULT_PORT,
        state_dir: Path | None = None,
        host_json: Path | None = None,
        timings: HostTimings | None = None,
        root: Path | None = None,
    ) -> None:
        """`settings`: app setting values, or a local.settings.json path; None reads local.settings.json
        (or the sample) from `root`. Values go into os.environ before a string `app` is imported;
        variables already in the environment win, as with Core Tools."""
        self.root = (root or Path.cwd()).resolve()
        if isinstance(settings, Path) or settings is None:
            self.local_settings = load_local_settings(settings, root=self.root)
        else:
            self.local_settings = LocalSettings(values={k: str(v) for k, v in settings.items()})
        self._added_env = apply_to_environ(self.local_settings.values)
        try:
            if isinstance(app, str):
                self.app, app_dir = import_app(app)
            else:
                self.app, app_dir = app, app_directory(app)
            self.app_dir = app_dir or self.root
            self.host_config = HostConfig.load(host_json if host_json is not None else self.app_dir / "host.json")
            self.timings = timings or HostTimings()
            env = dict(os.environ)
            self.specs = build_catalog(app_functions(self.app), env)
            self.state_dir = (state_dir or _default_state_dir(env)).resolve()
            self.keys = KeyStore(self.state_dir / "keys.json")
            self.keys.ensure(spec.name for spec in self.specs)
            self._errors: dict[str, str] = {s.name: s.error for s in self.specs if s.error}
            self._build(env)
        except BaseException:
            self._restore_env()
            raise
        self.bind_host = host
        if port is None:
            port = self.local_settings.local_http_port or DEFAULT_PORT
        self.requested_port = port
        self.port: int | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._server: Any = None
        self._admin_tasks: set[asyncio.Task[Any]] = set()

    # ----------------------------------------------------------------------------------- wiring
    def _build(self, env: Mapping[str, str]) -> None:
        http = [s for s in self.specs if s.kind == HTTP_TRIGGER and not s.error]
        if any(s.http_streams for s in http):
            # As the Python worker: once the app uses HTTP streams, every HTTP function gets a FastAPI
            # Request and must answer with a FastAPI response; one written for func.HttpRequest would fail.
            for spec in http:
                if not spec.http_streams:
                    self._errors[spec.name] = (
                        "this app uses HTTP streams (azurefunctions-extensions-http-fastapi), so every HTTP "
                        "function must take its FastAPI Request and return a FastAPI response"
                    )
        ok = [s for s in self.specs if s.name not in self._errors]
        self.invoker = Invoker(function_directory=str(self.app_dir))
        routes = []
        for spec in (s for s in ok if s.kind == HTTP_TRIGGER):
            level = str(spec.trigger.get("authLevel", "FUNCTION")).lower()
            if level == "anonymous":
                accepted = None
            elif level == "admin":
                accepted = self.keys.accepted_for_admin()
            else:
                accepted = self.keys.accepted_for_function(spec.name)
            routes.append(
                compile_route(
                    spec.name,
                    str(spec.trigger.get("route") or spec.name),
                    prefix=self.host_config.route_prefix,
                    methods=spec.trigger.get("methods"),
                    auth_level=level,
                    payload=(spec, accepted),
                )
            )
        self.route_table = RouteTable(routes)
        grid_specs = [s for s in ok if s.kind == EVENT_GRID_TRIGGER]
        self.event_grid = (
            EventGridDispatcher(
                grid_specs,
                self.invoker,
                retry=RetryPolicy(self.timings.event_tries, self.timings.event_retry_first_delay_s),
                dead_letter_dir=self.state_dir / "deadletter",
            )
            if grid_specs
            else None
        )
        from tunegrid.devhost.timers import TimerScheduler, TimerStatusStore

        self.timers = TimerScheduler(
            [s for s in ok if s.kind == TIMER_TRIGGER],
            self.invoker,
            store=TimerStatusStore(self.state_dir / "timers.json"),
            late_tolerance_s=self.timings.timer_late_tolerance_s,
        )
        self._errors.update(self.timers.errors)
        blob_specs = [s for s in ok if s.kind == BLOB_TRIGGER]
        self.blobs = BlobTriggerWatcher(
            blob_specs,
            self.invoker,
            env=env,
            poll_interval_s=self.timings.blob_poll_interval_s,
            retry=RetryPolicy(self.host_config.max_dequeue_count, self.timings.blob_retry_first_delay_s),
        )
        self._errors.update(self.blobs.errors)
        self.run_events_topic = self._build_run_events_topic(env)
        self.asgi = HostAsgiApp(
            routes=self.route_table,
            invoker=self.invoker,
            event_grid=self.event_grid,
            event_grid_keys=self.keys.accepted_for_system,
            event_sas_key=lambda: os.environ.get(EVENT_KEY_SETTING, EVENT_KEY_DEFAULT).encode(),
            admin_keys=self.keys.accepted_for_admin,
            admin_functions=self.routes,
            invoke_by_name=self._invoke_by_name,
            run_events_topic=self.run_events_topic,
        )
        for name, error in self._errors.items():
            log.error("Function '%s' is disabled: %s", name, error, extra={"function": name})

    def _build_run_events_topic(self, env: Mapping[str, str]) -> RunEventsTopic:
        """The stand-in for RUN_EVENTS_TOPIC_ENDPOINT, from the LOCAL_RUN_EVENTS_* settings."""
        from shared.settings import comma_list

        folder = env.get("LOCAL_RUN_EVENTS_DEAD_LETTER_DIR", "").strip()
        return RunEventsTopic(
            key=env.get("LOCAL_RUN_EVENTS_KEY", "").strip(),
            subscribers=comma_list(env.get("LOCAL_RUN_EVENTS_SUBSCRIBERS", "")),
            dead_letter_dir=Path(folder).expanduser().resolve() if folder else self.state_dir / "run-events-deadletter",
            retry=RetryPolicy(self.timings.run_event_tries, self.timings.run_event_retry_first_delay_s),
            drain_s=self.timings.run_event_drain_s,
        )

    # ------------------------------------------------------------------------------ description
    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the dev host is not started")
        return f"http://{self.bind_host}:{self.port}"

    def function_keys(self) -> dict[str, str]:
        """Function name -> its default function key (for `x-functions-key` or `?code=`)."""
        return {spec.name: self.keys.function_keys(spec.name).get("default", "") for spec in self.specs}

    @property
    def master_key(self) -> str:
        return self.keys.master_key

    @property
    def event_grid_system_key(self) -> str:
        return self.keys.system_key()

    @property
    def run_events_topic_url(self) -> str:
        """What RUN_EVENTS_TOPIC_ENDPOINT is locally: this host's stand-in topic."""
        return self.base_url + TOPIC_PATH

    def routes(self) -> list[dict[str, Any]]:
        """The routing table: one entry per function with its trigger type and (resolved) binding fields."""
        out = []
        route_by_fn = {r.function: r for r in self.route_table.routes}
        for spec in self.specs:
            entry: dict[str, Any] = {
                "function": spec.name,
                "trigger": spec.kind,
                "binding": dict(spec.trigger),
                "status": "error" if spec.name in self._errors else "ok",
            }
            if spec.name in self._errors:
                entry["error"] = self._errors[spec.name]
            if spec.kind == HTTP_TRIGGER and spec.name in route_by_fn:
                route = route_by_fn[spec.name]
                entry.update(
                    route=route.template,
                    path=route.path,
                    methods=sorted(route.methods),
                    auth_level=route.auth_level,
                )
            elif spec.kind == EVENT_GRID_TRIGGER:
                entry["path"] = f"/runtime/webhooks/eventgrid?functionName={spec.name}"
            elif spec.kind == BLOB_TRIGGER:
                entry.update(
                    blob_path=spec.trigger.get("path"),
                    connection=spec.trigger.get("connection") or "AzureWebJobsStorage",
                    source=spec.trigger.get("source") or "LogsAndContainerScan",
                )
            elif spec.kind == TIMER_TRIGGER:
                entry.update(
                    schedule=spec.trigger.get("schedule"), run_on_startup=bool(spec.trigger.get("runOnStartup"))
                )
            out.append(entry)
        return out

    def describe(self) -> str:
        """Core Tools' start-up listing: one line per function (URLs carry no keys)."""
        lines = ["Functions:"]
        base = self.base_url if self.port is not None else f"http://{self.bind_host}:{self.requested_port}"
        for entry in self.routes():
            name, trigger = entry["function"], entry["trigger"]
            if entry["status"] == "error":
                lines.append(f"    {name}: {trigger} DISABLED: {entry['error']}")
            elif trigger == HTTP_TRIGGER:
                lines.append(
                    f"    {name}: [{','.join(entry['methods'])}] {base}{entry['path']} (auth: {entry['auth_level']})"
                )
            elif trigger == EVENT_GRID_TRIGGER:
                lines.append(f"    {name}: eventGridTrigger {base}{entry['path']}")
            elif trigger == BLOB_TRIGGER:
                lines.append(f"    {name}: blobTrigger {entry['blob_path']} (connection {entry['connection']}, polled)")
            elif trigger == TIMER_TRIGGER:
                startup = ", runs on startup" if entry["run_on_startup"] else ""
                lines.append(f"    {name}: timerTrigger {entry['schedule']}{startup}")
        if self.run_events_topic.enabled:
            count = len(self.run_events_topic.subscriptions)
            lines.append(f"Run-events topic: {base}{TOPIC_PATH} -> {count} webhook subscribers")
        return "\n".join(lines)

    # -------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> DevHost:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, *, timeout_s: float = 30.0) -> DevHost:
        """Bind the port and start serving in a background thread; returns once ready."""
        if self._thread is not None:
            raise RuntimeError("the dev host is already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.bind_host, self.requested_port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {self.bind_host}:{self.requested_port}: {exc}") from exc
        sock.listen(2048)
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(target=self._thread_main, args=(sock,), name="devhost", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._startup_error is not None:
            self.stop()
            raise RuntimeError(f"the dev host did not start: {self._startup_error}")
        return self

    def _thread_main(self, sock: socket.socket) -> None:
        import uvloop

        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self._serve(sock))
        except BaseException as exc:  # reported to start() or logged
            if not self._ready.is_set():
                self._startup_error = exc
                self._ready.set()
            else:
                log.exception("the dev host stopped with an error")
        finally:
            sock.close()

    async def _serve(self, sock: socket.socket) -> None:
        import uvicorn

        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        config = uvicorn.Config(
            self.asgi,
            http="httptools",
            loop="none",
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            proxy_headers=False,  # no forwarded-header middleware on every request: the host is loopback
            timeout_graceful_shutdown=max(1, int(self.timings.shutdown_timeout_s)),
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        server_task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started and not server_task.done():  # noqa: ASYNC110 (uvicorn has a flag, no event)
            await asyncio.sleep(0.01)
        if server_task.done():
            server_task.result()
            return
        background = [
            asyncio.create_task(self.timers.run(self._stopping), name="devhost-timers"),
            asyncio.create_task(self.blobs.run(self._stopping), name="devhost-blobs"),
            asyncio.create_task(self.run_events_topic.run(self._stopping), name="devhost-run-events"),
        ]
        self._ready.set()
        log.info("dev host listening on %s", self.base_url)
        await self._stopping.wait()
        # stop accepting and finish in-flight HTTP requests (bounded by timeout_graceful_shutdown)
        self._server.should_exit = True
        timeout = self.timings.shutdown_timeout_s
        await asyncio.wait([*background, server_task], timeout=timeout)
        await self.blobs.drain(timeout)
        if not await self.invoker.wait_idle(timeout):
            log.warning("shutting down with %d invocations still running", self.invoker.in_flight)
        for task in [*background, server_task]:
            task.cancel()
        await asyncio.gather(*background, server_task, return_exceptions=True)

    def stop(self) -> None:
        """Graceful stop: no new requests, in-flight invocations finish (bounded), timers and watchers end."""
        thread, self._thread = self._thread, None
        if thread is not None:
            if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._stopping.set)
            thread.join(self.timings.shutdown_timeout_s + 10)
        self.invoker.close(wait=False)
        self._restore_env()

    def _restore_env(self) -> None:
        for name in self._added_env:
            os.environ.pop(name, None)
        self._added_env = []

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the host stops (for the CLI)."""
        thread = self._thread
        if thread is not None:
            thread.join()

    # ----------------------------------------------------------------------------- admin invoke
    async def _invoke_by_name(self, name: str, body: bytes) -> int:
        """`POST /admin/functions/{name}` with `{"input": ...}`: run a non-HTTP function now (202)."""
        spec = next((s for s in self.specs if s.name.lower() == name.lower() and s.name not in self._errors), None)
        if spec is None:
            return 404
        try:
            doc = json.loads(body) if body else {}
            raw_input = doc.get("input", "") if isinstance(doc, dict) else ""
        except ValueError:
            return 400
        coro: Coroutine[Any, Any, Any]
        if spec.kind == TIMER_TRIGGER:
            coro = self.timers.run_now(spec.name)
        elif spec.kind == EVENT_GRID_TRIGGER and self.event_grid is not None:
            try:
                event = json.loads(raw_input) if isinstance(raw_input, str) else raw_input
            except ValueError:
                return 400
            if not isinstance(event, dict) or not (event.get("eventType") or event.get("type")):
                return 400
            event.setdefault("id", str(uuid.uuid4()))
            coro = self.event_grid.deliver(spec, event)
        else:
            return 400
        task = asyncio.get_running_loop().create_task(coro)
        self._admin_tasks.add(task)
        task.add_done_callback(self._admin_tasks.discard)
        return 202
