"""Local online endpoints with managed-online-endpoint semantics.

An endpoint is a directory `endpoints/<name>/` with `endpoint.json` (mode 0600: it holds the keys),
a router process (`router.py`: auth, traffic, mirroring, counters) and one model server process per
deployment (`server.py`). Creating starts processes and returns at once; the provisioning state moves
from Creating to Succeeded when the process answers its health probe, or to Failed (with the last
lines of its log) when it exits or does not answer within the liveness delay. Reads re-check the
processes, so after an app restart running servers are found again by pid, start time and port,
and dead ones are marked Failed (a dead router is restarted: it holds no state of its own).
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.domain.clock import iso, utcnow
from shared.domain.clock import parse_time as parse_iso
from shared.domain.resources import (
    DeploymentInfo,
    DeploymentSpec,
    EndpointActivity,
    EndpointCredentials,
    EndpointInfo,
    Operation,
    ProvisioningState,
)
from shared.errors import BackendError, InvalidInput, MetricsUnavailable, NotFound
from tunegrid.local.workspace import (
    ProcessHandle,
    file_lock,
    free_port,
    read_json,
    spawn,
    tail_lines,
    write_json_atomic,
)

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9-]{1,31}$")
ROUTER_START_TIMEOUT_S = 60.0
MAX_MIRROR_PERCENT = 50
MAX_ROUTER_RESTARTS = 5

ModelResolver = Callable[[str, str], Path]
"""(model name, our version) -> the registered model's folder; raises NotFound."""


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name) or name.endswith("-"):
        raise InvalidInput(
            f"{kind} name {name!r}: 3-32 characters, letters, digits and hyphens, starting with a letter"
        )


def _health(port: int | None, *, timeout_s: float = 1.0) -> bool:
    if not port:
        return False
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass(frozen=True)
class EndpointFiles:
    dir: Path

    @property
    def doc_file(self) -> Path:
        return self.dir / "endpoint.json"

    @property
    def lock(self) -> Path:
        return self.dir.parent / f".{self.dir.name}.lock"

    @property
    def router_log(self) -> Path:
        return self.dir / "router.log"

    @property
    def activity_file(self) -> Path:
        return self.dir / "activity.json"

    def server_log(self, deployment: str) -> Path:
        return self.dir / "deployments" / deployment / "server.log"


class LocalEndpoints:
    """The endpoint half of the port, over `root` (the workspace's `endpoints/` folder)."""

    def __init__(self, root: Path, *, resolve_model: ModelResolver) -> None:
        self.root = root
        self.resolve_model = resolve_model

    # --- files ---------------------------------------------------------------------------------

    def files(self, name: str) -> EndpointFiles:
        return EndpointFiles(self.root / name)

    def _read(self, name: str) -> dict[str, Any] | None:
        if not _NAME.match(name):
            return None
        return read_json(self.files(name).doc_file)

    def _write(self, doc: Mapping[str, Any]) -> None:
        write_json_atomic(self.files(doc["name"]).doc_file, doc, private=True)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / "endpoint.json").is_file())

    # --- processes -----------------------------------------------------------------------------

    def _start_router(self, doc: dict[str, Any]) -> None:
        files = self.files(doc["name"])
        port = (doc.get("router") or {}).get("port")
        if not port or not _port_free(port):
            port = free_port()
        handle = spawn(
            "tunegrid.local.router",
            ["--endpoint-dir", str(files.dir), "--port", str(port)],
            log_path=files.router_log,
        )
        doc["router"] = {**handle.to_dict(), "port": port, "started_at": iso(utcnow())}

    def _start_server(self, doc: dict[str, Any], dep: dict[str, Any]) -> None:
        files = self.files(doc["name"])
        port = free_port()
        dep["token"] = secrets.token_urlsafe(24)
        handle = spawn(
            "tunegrid.local.server",
            [
                "--model",
                dep["model_path"],
                "--port",
                str(port),
                "--name",
                dep["name"],
                "--max-concurrent",
                str(dep["max_concurrent_requests_per_instance"]),
            ],
            log_path=files.server_log(dep["name"]),
            env={"TUNEGRID_SERVER_TOKEN": dep["token"]},
        )
        dep["server"] = {**handle.to_dict(), "port": port, "started_at": iso(utcnow())}

    @staticmethod
    def _stop_all(handles: list[ProcessHandle], *, grace_s: float = 2.0) -> None:
        """SIGTERM every process group at once, then SIGKILL what is left after `grace_s`."""
        alive = [h for h in handles if h.signal(signal.SIGTERM, group=True)]
        deadline = time.monotonic() + grace_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [h for h in alive if h.alive()]
        for h in alive:
            h.signal(signal.SIGKILL, group=True)
        deadline = time.monotonic() + 3.0
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [h for h in alive if h.alive()]

    def _refresh(self, doc: dict[str, Any]) -> bool:
        """Bring provisioning states up to date with the processes; True when `doc` changed."""
        changed = False
        router = ProcessHandle.from_dict(doc.get("router"))
        if doc.get("provisioning_state") in ("Creating", "Succeeded", "Updating"):
            if router is None or not router.alive():
                restarts = int(doc.get("router_restarts", 0))
                if restarts >= MAX_ROUTER_RESTARTS:
                    doc["provisioning_state"] = "Failed"
                    doc["error"] = "the endpoint router keeps exiting: " + " | ".join(
                        tail_lines(self.files(doc["name"]).router_log, count=3)
                    )
                else:
                    log.info(
                        "endpoint %s: router not running; restarting it", doc["name"], extra={"endpoint": doc["name"]}
                    )
                    doc["router_restarts"] = restarts + 1
                    self._start_router(doc)
                changed = True
            elif doc["provisioning_state"] == "Creating" and _health(doc["router"]["port"]):
                doc["provisioning_state"] = "Succeeded"
                doc["router_restarts"] = 0
                changed = True
            elif doc.get("router_restarts") and _health(doc["router"]["port"]):
                doc["router_restarts"] = 0
                changed = True
            elif doc["provisioning_state"] == "Creating":
                started = parse_iso(doc["router"].get("started_at"))
                if started and (utcnow() - started).total_seconds() > ROUTER_START_TIMEOUT_S:
                    router.stop()
                    doc["provisioning_state"] = "Failed"
                    doc["error"] = f"the endpoint router did not answer within {ROUTER_START_TIMEOUT_S:.0f} s"
                    changed = True
        for dep in (doc.get("deployments") or {}).values():
            changed |= self._refresh_deployment(doc, dep)
        return changed

    def _refresh_deployment(self, doc: dict[str, Any], dep: dict[str, Any]) -> bool:
        state = dep.get("provisioning_state")
        if state not in ("Creating", "Updating", "Succeeded"):
            return False
        server = ProcessHandle.from_dict(dep.get("server"))
        port = (dep.get("server") or {}).get("port")
        log_tail = " | ".join(tail_lines(self.files(doc["name"]).server_log(dep["name"]), count=3))
        if server is None or not server.alive():
            dep["provisioning_state"] = "Failed"
            what = "exited while starting" if state != "Succeeded" else "is no longer running"
            dep["error"] = f"the model server of deployment {dep['name']} {what}" + (
                f": {log_tail}" if log_tail else ""
            )
            dep["updated_at"] = iso(utcnow())
            log.warning(
                "endpoint %s: deployment %s failed: %s",
                doc["name"],
                dep["name"],
                dep["error"],
                extra={"endpoint": doc["name"]},
            )
            return True
        if state == "Succeeded":
            return False
        if _health(port):
            dep["provisioning_state"] = "Succeeded"
            dep["error"] = None
            dep["updated_at"] = iso(utcnow())
            log.info(
                "endpoint %s: deployment %s is ready on port %s",
                doc["name"],
                dep["name"],
                port,
                extra={"endpoint": doc["name"]},
            )
            return True
        started = parse_iso((dep.get("server") or {}).get("started_at"))
        limit = int(dep.get("liveness_initial_delay_s") or 600) + 60
        if started and (utcnow() - started).total_seconds() > limit:
            server.stop()
            dep["provisioning_state"] = "Failed"
            dep["error"] = f"the model server did not become healthy within {limit} s" + (
                f": {log_tail}" if log_tail else ""
            )
            dep["updated_at"] = iso(utcnow())
            return True
        return False

    def _load(self, name: str, *, refresh: bool = True) -> dict[str, Any] | None:
        """The endpoint document, refreshed against its processes (under the endpoint's lock)."""
        if self._read(name) is None:
            return None
        with file_lock(self.files(name).lock):
            doc = self._read(name)
            if doc is None:
                return None
            if refresh and self._refresh(doc):
                self._write(doc)
            return doc

    # --- views ---------------------------------------------------------------------------------

    @staticmethod
    def _deployment_info(endpoint: str, dep: Mapping[str, Any]) -> DeploymentInfo:
        return DeploymentInfo(
            endpoint=endpoint,
            name=dep["name"],
            provisioning_state=ProvisioningState.parse(dep.get("provisioning_state")),
            model_id=(dep.get("model") or {}).get("id"),
            created_at=parse_iso(dep.get("created_at")),
            instance_type=dep.get("instance_type"),
            error=dep.get("error"),
        )

    def _endpoint_info(self, doc: Mapping[str, Any]) -> EndpointInfo:
        deployments = doc.get("deployments") or {}
        return EndpointInfo(
            name=doc["name"],
            provisioning_state=ProvisioningState.parse(doc.get("provisioning_state")),
            tags=dict(doc.get("tags") or {}),
            created_at=parse_iso(doc.get("created_at")),
            scoring_uri=self._scoring_uri(doc),
            traffic={name: int((doc.get("traffic") or {}).get(name, 0)) for name in sorted(deployments)},
            mirror_traffic={k: int(v) for k, v in (doc.get("mirror_traffic") or {}).items() if int(v) > 0},
            deployments=tuple(self._deployment_info(doc["name"], deployments[n]) for n in sorted(deployments)),
        )

    @staticmethod
    def _scoring_uri(doc: Mapping[str, Any]) -> str | None:
        port = (doc.get("router") or {}).get("port")
        return f"http://127.0.0.1:{port}/score" if port else None

    def list_endpoints(self) -> list[EndpointInfo]:
        out = []
        for name in self.names():
            doc = self._load(name)
            if doc is not None:
                out.append(self._endpoint_info(doc))
        return out

    def get_endpoint(self, name: str) -> EndpointInfo | None:
        doc = self._load(name)
        return None if doc is None else self._endpoint_info(doc)

    def get_deployment(self, endpoint: str, name: str) -> DeploymentInfo | None:
        doc = self._load(endpoint)
        dep = (doc or {}).get("deployments", {}).get(name)
        return None if dep is None else self._deployment_info(endpoint, dep)

    # --- changes -------------------------------------------------------------------------------

    def begin_create_endpoint(self, name: str, *, tags: Mapping[str, str], description: str = "") -> Operation:
        """Create and start the router; an existing endpoint keeps its keys and gets the tags merged in."""
        _check_name("endpoint", name)
        files = self.files(name)
        with file_lock(files.lock):
            doc = self._read(name)
            if doc is not None:
                doc["tags"] = {**(doc.get("tags") or {}), **{k: str(v) for k, v in tags.items()}}
                if description:
                    doc["description"] = description
                self._refresh(doc)
                self._write(doc)
                state = doc["provisioning_state"]
                return Operation("create_endpoint", name, status=state, done=state in ("Succeeded", "Failed"))
            doc = {
                "name": name,
                "description": description,
                "tags": {k: str(v) for k, v in tags.items()},
                "created_at": iso(utcnow()),
                "provisioning_state": "Creating",
                "error": None,
                "auth_mode": "key",
                "keys": {"primary": secrets.token_urlsafe(32), "secondary": secrets.token_urlsafe(32)},
                "traffic": {},
                "mirror_traffic": {},
                "deployments": {},
            }
            files.dir.mkdir(parents=True, exist_ok=True)
            self._start_router(doc)
            self._write(doc)
        log.info("endpoint %s: creating (router on port %s)", name, doc["router"]["port"], extra={"endpoint": name})
        return Operation("create_endpoint", name)

    def begin_create_deployment(self, spec: DeploymentSpec) -> Operation:
        """Start a model server for the registered model; the same spec again is a no-op."""
        _check_name("deployment", spec.name)
        if spec.instance_count < 1:
            raise InvalidInput("instance_count must be at least 1")
        if spec.instance_count > 1:
            log.info("deployment %s: instance_count %d served by one local process", spec.name, spec.instance_count)
        model_path = self.resolve_model(spec.model.name, spec.model.version)
        if not model_path.is_dir():
            raise BackendError(f"model {spec.model.name}:{spec.model.version} has no files at {model_path}")
        target = f"{spec.endpoint}/{spec.name}"
        with file_lock(self.files(spec.endpoint).lock):
            doc = self._read(spec.endpoint)
            if doc is None:
                raise NotFound(f"endpoint {spec.endpoint} does not exist")
            if doc.get("provisioning_state") in ("Deleting", "Failed"):
                raise BackendError(f"endpoint {spec.endpoint} is {doc['provisioning_state']}; cannot add a deployment")
            deployments = doc.setdefault("deployments", {})
            existing = deployments.get(spec.name)
            model = {"name": spec.model.name, "version": spec.model.version, "id": spec.model.id}
            if existing is not None:
                same = existing.get("model") == model and existing.get("provisioning_state") != "Failed"
                if same:
                    self._refresh_deployment(doc, existing)
                    self._write(doc)
                    state = existing["provisioning_state"]
                    return Operation("create_deployment", target, status=state, done=state in ("Succeeded", "Failed"))
                old = ProcessHandle.from_dict(existing.get("server"))
                if old is not None:
                    self._stop_all([old])
            now = iso(utcnow())
            dep: dict[str, Any] = {
                "name": spec.name,
                "model": model,
                "model_path": str(model_path),
                "instance_type": spec.instance_type,
                "instance_count": spec.instance_count,
                "request_timeout_ms": spec.request_timeout_ms,
                "liveness_initial_delay_s": spec.liveness_initial_delay_s,
                "max_concurrent_requests_per_instance": spec.max_concurrent_requests_per_instance,
                "tags": {k: str(v) for k, v in spec.tags.items()},
                "provisioning_state": "Updating" if existing is not None else "Creating",
                "error": None,
                "created_at": (existing or {}).get("created_at") or now,
                "updated_at": now,
            }
            self._start_server(doc, dep)
            deployments[spec.name] = dep
            doc.setdefault("traffic", {}).setdefault(spec.name, 0)
            self._write(doc)
        log.info(
            "endpoint %s: deployment %s starting (model %s:%s)",
            spec.endpoint,
            spec.name,
            spec.model.name,
            spec.model.version,
            extra={"endpoint": spec.endpoint},
        )
        return Operation("create_deployment", target)

    def begin_set_traffic(
        self, endpoint: str, traffic: Mapping[str, int], *, mirror_traffic: Mapping[str, int] | None = None
    ) -> Operation:
        """Replace the traffic split (deployments not named get 0) and the mirror setting."""
        with file_lock(self.files(endpoint).lock):
            doc = self._read(endpoint)
            if doc is None:
                raise NotFound(f"endpoint {endpoint} does not exist")
            self._refresh(doc)
            deployments = doc.get("deployments") or {}
            split = _validate_shares(traffic, deployments, what="traffic")
            total = sum(split.values())
            if total not in (0, 100):
                raise BackendError(f"traffic percentages must sum to 0 or 100, got {total}: {dict(traffic)}")
            for name, share in split.items():
                state = deployments[name].get("provisioning_state")
                if share > 0 and state != "Succeeded":
                    raise BackendError(f"deployment {name} is {state}; only a Succeeded deployment can take traffic")
            mirror = _validate_shares(mirror_traffic or {}, deployments, what="mirror_traffic")
            mirror = {k: v for k, v in mirror.items() if v > 0}
            if len(mirror) > 1:
                raise BackendError("traffic can be mirrored to one deployment only")
            if any(v > MAX_MIRROR_PERCENT for v in mirror.values()):
                raise BackendError(f"mirror traffic cannot exceed {MAX_MIRROR_PERCENT} %")
            doc["traffic"] = {name: split.get(name, 0) for name in deployments}
            doc["mirror_traffic"] = mirror
            self._write(doc)
        log.info("endpoint %s: traffic %s mirror %s", endpoint, doc["traffic"], mirror, extra={"endpoint": endpoint})
        return Operation("set_traffic", endpoint, status="Succeeded", done=True)

    def begin_delete_deployment(self, endpoint: str, name: str) -> Operation:
        """Stop the deployment's server and forget it; refused while it has live traffic."""
        with file_lock(self.files(endpoint).lock):
            doc = self._read(endpoint)
            if doc is None:
                raise NotFound(f"endpoint {endpoint} does not exist")
            deployments = doc.get("deployments") or {}
            dep = deployments.get(name)
            if dep is None:
                raise NotFound(f"deployment {name} does not exist on endpoint {endpoint}")
            if int((doc.get("traffic") or {}).get(name, 0)) > 0:
                raise BackendError(
                    f"deployment {name} has {doc['traffic'][name]} % of the traffic; set it to 0 before deleting it"
                )
            server = ProcessHandle.from_dict(dep.get("server"))
            dep["provisioning_state"] = "Deleting"
            self._write(doc)
            self._stop_all([server] if server else [])
            del deployments[name]
            (doc.get("traffic") or {}).pop(name, None)
            (doc.get("mirror_traffic") or {}).pop(name, None)
            self._write(doc)
            shutil.rmtree(self.files(endpoint).dir / "deployments" / name, ignore_errors=True)
        log.info("endpoint %s: deployment %s deleted", endpoint, name, extra={"endpoint": endpoint})
        return Operation("delete_deployment", f"{endpoint}/{name}", status="Succeeded", done=True)

    def begin_delete_endpoint(self, name: str) -> Operation:
        """Stop the router and every deployment's server, then remove the endpoint."""
        files = self.files(name)
        with file_lock(files.lock):
            doc = self._read(name)
            if doc is None:
                raise NotFound(f"endpoint {name} does not exist")
            doc["provisioning_state"] = "Deleting"
            self._write(doc)
            handles = [ProcessHandle.from_dict(doc.get("router"))]
            handles += [ProcessHandle.from_dict(d.get("server")) for d in (doc.get("deployments") or {}).values()]
            self._stop_all([h for h in handles if h is not None])
            shutil.rmtree(files.dir, ignore_errors=True)
        log.info("endpoint %s deleted with its deployments", name, extra={"endpoint": name})
        return Operation("delete_endpoint", name, status="Succeeded", done=True)

    def stop_all_processes(self) -> None:
        """Stop every router and server of this workspace (tests, `local-endpoints stop`); state stays."""
        handles: list[ProcessHandle] = []
        for name in self.names():
            doc = self._read(name) or {}
            handles.append(ProcessHandle.from_dict(doc.get("router")))  # type: ignore[arg-type]
            handles += [ProcessHandle.from_dict(d.get("server")) for d in (doc.get("deployments") or {}).values()]  # type: ignore[misc]
        self._stop_all([h for h in handles if h is not None])

    # --- calling -------------------------------------------------------------------------------

    def get_credentials(self, endpoint: str) -> EndpointCredentials:
        doc = self._load(endpoint)
        if doc is None:
            raise NotFound(f"endpoint {endpoint} does not exist")
        uri = self._scoring_uri(doc)
        if uri is None:
            raise BackendError(f"endpoint {endpoint} has no scoring URI yet")
        return EndpointCredentials(scoring_uri=uri, key=doc["keys"]["primary"])

    def secondary_key(self, endpoint: str) -> str:
        doc = self._read(endpoint)
        if doc is None:
            raise NotFound(f"endpoint {endpoint} does not exist")
        return str(doc["keys"]["secondary"])

    def get_endpoint_activity(self, endpoint: str, *, since: datetime) -> EndpointActivity:
        """Requests counted by the endpoint's router since `since` (per-minute resolution)."""
        import httpx

        doc = self._read(endpoint)
        if doc is None:
            raise NotFound(f"endpoint {endpoint} does not exist")
        counters: Mapping[str, Any] | None = None
        source = "local-router"
        port = (doc.get("router") or {}).get("port")
        router = ProcessHandle.from_dict(doc.get("router"))
        if port and router is not None and router.alive():
            try:
                response = httpx.get(
                    f"http://127.0.0.1:{port}/-/activity",
                    headers={"Authorization": f"Bearer {doc['keys']['primary']}"},
                    timeout=3.0,
                )
                if response.status_code == 200:
                    counters = response.json()
            except httpx.HTTPError:
                counters = None
        if counters is None:
            counters = read_json(self.files(endpoint).activity_file)
            source = "local-router (persisted counters)"
        if not isinstance(counters, Mapping) or "per_minute" not in counters:
            raise MetricsUnavailable(
                f"request counters of endpoint {endpoint} cannot be read: the router is down and no counters were saved"
            )
        last = parse_iso(counters.get("last_request_at"))
        if last is None or last < since:
            requests = 0  # exact: nothing arrived after `since`
        else:
            # Whole minutes from the one holding `since`: may count a few earlier requests of that
            # minute, never misses one (an over-count keeps an endpoint, it never deletes one).
            floor = int(since.timestamp() // 60)
            requests = sum(int(v) for k, v in (counters.get("per_minute") or {}).items() if int(k) >= floor)
        return EndpointActivity(requests=requests, last_request_at=last, source=source)


def _validate_shares(shares: Mapping[str, int], deployments: Mapping[str, Any], *, what: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, share in shares.items():
        if name not in deployments:
            raise BackendError(f"{what}: deployment {name} does not exist")
        if isinstance(share, bool) or not isinstance(share, int) or not 0 <= share <= 100:
            raise BackendError(f"{what}: {name} must be an integer percentage 0-100, got {share!r}")
        out[name] = share
    return out


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
