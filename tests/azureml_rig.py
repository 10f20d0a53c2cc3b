"""Capture and answer the HTTP requests azure-ai-ml sends, under azure-core's real transport.

A `requests` adapter is mounted on a `requests.Session` that is handed to
`RequestsTransport(session=..., session_owner=False)`. Every request the SDK (or our adapter's own
pipeline calls) makes is recorded as a `Call` (method, URL, query, headers, JSON body) and answered
from routes registered by the test with service-shaped JSON (`tests/data/azureml/*.json`).

- `rig.on(method, path_regex, *replies)` answers matching requests with the replies in order (the
  last one repeats); a later registration for the same request wins over an earlier one, so a test
  can override a default route.
- `rig.lro(...)` answers with 201/202 plus an `Azure-AsyncOperation` (or `Location`) header and routes
  the poll URL to a sequence of operation statuses: the long-running-operation path, accepted then polled.
- A request no route matches is recorded in `rig.unmatched` and answered 501 (azure-core does not
  retry 501); the `azureml_rig` fixture fails the test when anything went unmatched.
- `no_sockets` blocks `socket.socket.connect` so a request that escaped the rig fails loudly.

The lead's rollout test can reuse this module: build the backend with `rig.backend(settings)` and
read `rig.calls` (or `rig.summary()`) for the exact order of calls.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests
import urllib3
from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.pipeline.transport import RequestsTransport
from requests.adapters import BaseAdapter

DATA_DIR = Path(__file__).resolve().parent / "data" / "azureml"

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
RESOURCE_GROUP = "rg-tunegrid"
WORKSPACE = "mlw-tunegrid"
LOCATION = "eastus"
REGISTRY = "azureml"
REGISTRY_SUBSCRIPTION = "11111111-1111-1111-1111-111111111111"
REGISTRY_RESOURCE_GROUP = "registry-builtin-prod-eastus-01"

ARM = "https://management.azure.com"
WS_PATH = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"
    f"/providers/Microsoft.MachineLearningServices/workspaces/{WORKSPACE}"
)
"""The workspace's ARM path; every workspace-scoped route starts with it."""
REGISTRY_HOST = f"https://cert-{LOCATION}.experiments.azureml.net"
REGISTRY_PATH = (
    f"/mferp/managementfrontend/subscriptions/{REGISTRY_SUBSCRIPTION}/resourceGroups/{REGISTRY_RESOURCE_GROUP}"
    f"/providers/Microsoft.MachineLearningServices/registries/{REGISTRY}"
)
API_HOST = f"https://{LOCATION}.api.azureml.ms"
MLFLOW_PATH = f"/mlflow/v1.0{WS_PATH}/api/2.0/mlflow"
HISTORY_PATH = f"/history/v1.0{WS_PATH}"
SCORING_HOST_TEMPLATE = "https://{endpoint}.{location}.inference.ml.azure.com"
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def load(filename: str, /, **subs: str) -> Any:
    """A canned service answer from tests/data/azureml, with `{placeholders}` filled in."""
    text = (DATA_DIR / filename).read_text(encoding="utf-8")
    values = {
        "subscription": SUBSCRIPTION,
        "resource_group": RESOURCE_GROUP,
        "workspace": WORKSPACE,
        "location": LOCATION,
        "registry_subscription": REGISTRY_SUBSCRIPTION,
        "registry_resource_group": REGISTRY_RESOURCE_GROUP,
        **subs,
    }
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return json.loads(text)


@dataclass(frozen=True)
class Call:
    """One request as it left azure-core's pipeline."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    thread: str

    @property
    def path(self) -> str:
        return unquote(urlsplit(self.url).path)

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.url).query, keep_blank_values=True).items()}

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def __str__(self) -> str:
        return f"{self.method} {self.url}"


@dataclass
class Reply:
    """A canned answer. `json` is serialised; `body` wins when given (raw bytes)."""

    status: int = 200
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None


def error_reply(status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None) -> Reply:
    """An ARM / Azure ML error body, as the services send it."""
    return Reply(status, {"error": {"code": code, "message": message}}, dict(headers or {}))


Responder = Reply | Callable[[Call], Reply]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    replies: list[Responder]
    host: str | None = None
    calls: list[Call] = field(default_factory=list)

    def matches(self, call: Call) -> bool:
        if self.method != "*" and self.method != call.method:
            return False
        if self.host is not None and self.host != call.host:
            return False
        return self.pattern.fullmatch(call.path) is not None

    def answer(self, call: Call) -> Reply:
        self.calls.append(call)
        responder = self.replies[min(len(self.calls), len(self.replies)) - 1]
        return responder(call) if callable(responder) else responder


class FakeCredential:
    """A TokenCredential handing out unsigned JWTs whose `aud` is the scope's resource (azure-ai-ml
    decodes the ml.azure.com token before a pipeline submission) and remembering the scopes asked for."""

    def __init__(self, *, tenant_id: str = "72f988bf-86f1-41af-91ab-2d7cd011db47") -> None:
        self.tenant_id = tenant_id
        self.scopes: list[tuple[str, ...]] = []

    def _jwt(self, scopes: tuple[str, ...]) -> str:
        aud = scopes[0].removesuffix("/.default") if scopes else ""
        claims = {"aud": aud, "tid": self.tenant_id, "oid": "rig-identity", "exp": int(time.time()) + 3600}
        part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
        return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}.sig"

    def get_token(self, *scopes: str, **_: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken(self._jwt(scopes), int(time.time()) + 3600)

    def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo:
        self.scopes.append(scopes)
        return AccessTokenInfo(self._jwt(scopes), int(time.time()) + 3600)


class _Adapter(BaseAdapter):
    def __init__(self, rig: AzureMLRig) -> None:
        super().__init__()
        self._rig = rig

    def send(self, request: requests.PreparedRequest, **_: Any) -> requests.Response:  # type: ignore[override]
        raw: Any = request.body or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        elif not isinstance(raw, bytes):  # a file-like body (uploads): read it
            raw = raw.read()
        call = Call(
            method=request.method or "GET",
            url=request.url or "",
            headers={str(k): str(v) for k, v in request.headers.items()},
            body=bytes(raw),
            thread=threading.current_thread().name,
        )
        reply = self._rig._dispatch(call)
        content = (
            reply.body
            if reply.body is not None
            else (json.dumps(reply.json).encode() if reply.json is not None else b"")
        )
        headers = {"Content-Type": "application/json; charset=utf-8", "x-ms-request-id": "rig", **reply.headers}
        response = requests.Response()
        response.status_code = reply.status
        response.reason = "rig"
        response.url = call.url
        response.request = request
        response.headers.update(headers)
        response.raw = urllib3.HTTPResponse(
            body=io.BytesIO(content), preload_content=False, status=reply.status, headers=headers
        )
        response._content = content
        return response

    def close(self) -> None:
        pass


class AzureMLRig:
    """Routes, recorded calls and ready-made clients for one test."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: list[Route] = []
        self.calls: list[Call] = []
        self.unmatched: list[Call] = []
        self.credential = FakeCredential()
        self.session = requests.Session()
        adapter = _Adapter(self)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self._op_counter = 0

    # -- routes ------------------------------------------------------------------------------
    def on(self, method: str, path: str, *replies: Responder, host: str | None = None) -> Route:
        """Answer `method` requests whose URL path fully matches the regex `path` (query ignored)."""
        if not replies:
            raise ValueError("a route needs at least one reply")
        route = Route(method.upper(), re.compile(path), list(replies), host=host)
        with self._lock:
            self._routes.append(route)
        return route

    def lro(
        self,
        method: str,
        path: str,
        *,
        final: Any = None,
        initial_status: int = 201,
        initial_body: Any = None,
        statuses: Sequence[str] = ("InProgress", "InProgress", "Succeeded"),
        header: str = "Azure-AsyncOperation",
        retry_after_ms: str = "100",
        error: Mapping[str, str] | None = None,
        then: Callable[[], None] | None = None,
    ) -> Route:
        """A long-running operation: the request is accepted (201/202 + async header), the operation
        URL then answers `statuses` in turn (the last repeats). Once the request has arrived, a GET
        of the resource (ARM's "final-state-via", and the adapter's own reads) answers `final`, or
        `then()` is called to serve whatever the test wants. The service's
        `Retry-After` is sent as `retry-after-ms` (azure-core reads both) to keep the polls quick."""
        with self._lock:
            self._op_counter += 1
            op_id = f"op-{self._op_counter}"
        op_path = f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft.MachineLearningServices/locations/{LOCATION}/mfeOperationsStatus/{op_id}"
        op_url = f"{ARM}{op_path}?api-version=2024-04-01"

        location_style = header.lower() == "location"

        def status_reply(status: str) -> Reply:
            doc: dict[str, Any] = {"id": op_path, "name": op_id, "status": status}
            if status == "Failed" and error:
                doc["error"] = dict(error)
            # An Azure-AsyncOperation URL always answers 200 with a status; a Location URL
            # answers 202 while the operation runs and 200 once it is over.
            running = status not in ("Succeeded", "Failed", "Canceled")
            return Reply(202 if location_style and running else 200, doc, {"retry-after-ms": retry_after_ms})

        self.on("GET", re.escape(op_path), *[status_reply(s) for s in statuses])
        headers = {header: op_url, "retry-after-ms": retry_after_ms}
        if header.lower() == "azure-asyncoperation":
            headers["Location"] = op_url.replace("mfeOperationsStatus", "mfeOperationResults")
            self.on("GET", re.escape(op_path.replace("mfeOperationsStatus", "mfeOperationResults")), Reply(200, final))
        initial = Reply(initial_status, initial_body if initial_body is not None else final, headers)

        def accepted(call: Call) -> Reply:
            # From now on the resource reads as created/updated (the final GET of the poller and
            # the adapter's later reads), unless the test serves it itself through `then`.
            if then is not None:
                then()
            elif final is not None and method.upper() in ("PUT", "PATCH"):
                self.on("GET", path, Reply(200, final))
            return initial

        return self.on(method, path, accepted)

    def _dispatch(self, call: Call) -> Reply:
        with self._lock:
            self.calls.append(call)
            for route in reversed(self._routes):
                if route.matches(call):
                    break
            else:
                self.unmatched.append(call)
                return error_reply(501, "RigNoRoute", f"no route for {call.method} {call.url}")
        return route.answer(call)

    # -- reading what was sent ---------------------------------------------------------------
    def requests(self, method: str | None = None, path: str | None = None) -> list[Call]:
        """Recorded calls, optionally filtered by method and a regex searched in the path."""
        with self._lock:
            calls = list(self.calls)
        return [
            c
            for c in calls
            if (method is None or c.method == method.upper()) and (path is None or re.search(path, c.path))
        ]

    def one(self, method: str, path: str) -> Call:
        found = self.requests(method, path)
        assert len(found) == 1, f"expected one {method} {path}, got {[str(c) for c in found]}"
        return found[0]

    def summary(self, *, main_thread_only: bool = True) -> list[str]:
        """`METHOD path` of every call in order, with the common workspace/registry prefixes shortened
        to `{ws}` / `{registry}`; background LRO polling threads left out by default."""
        main = threading.main_thread().name
        with self._lock:
            calls = list(self.calls)
        out = []
        for c in calls:
            if main_thread_only and c.thread != main:
                continue
            path = c.path.replace(WS_PATH, "{ws}").replace(REGISTRY_PATH, "{registry}")
            out.append(f"{c.method} {path}")
        return out

    def wait_for(self, method: str, path: str, *, count: int = 1, timeout_s: float = 15.0) -> list[Call]:
        """Test-side wait (never the adapter's) for background pollers to reach a URL."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.requests(method, path)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {count} x {method} {path}; saw {[str(c) for c in self.calls]}")

    # -- clients -----------------------------------------------------------------------------
    def transport(self) -> RequestsTransport:
        return RequestsTransport(session=self.session, session_owner=False)

    def settings(self, **env: str) -> Any:
        """Settings for the Azure ML backend against the rig's workspace; `env` overrides."""
        from shared.settings import Settings

        return Settings.from_env(
            {
                "FINETUNE_BACKEND": "azureml",
                "AZURE_SUBSCRIPTION_ID": SUBSCRIPTION,
                "AZURE_RESOURCE_GROUP": RESOURCE_GROUP,
                "AZUREML_WORKSPACE_NAME": WORKSPACE,
                **env,
            }
        )

    def backend(self, settings: Any = None, *, clock: Callable[[], Any] | None = None, **caller: Any) -> Any:
        """An `AzureMLBackend` whose every request goes through this rig. Retries wait at most
        milliseconds unless the test asks otherwise (`caller` goes to `ServiceCaller`); `clock` fixes
        "now" (retirement dates, the metrics window)."""
        from shared.adapters.azureml.backend import AzureMLBackend
        from shared.adapters.azureml.service_calls import ServiceCaller

        options = {"wait_initial_s": 0.001, "wait_jitter_s": 0.0, "timeout_s": 30.0, **caller}
        return AzureMLBackend(
            settings or self.settings(),
            credential=self.credential,
            transport=self.transport(),
            caller=ServiceCaller(**options),
            **({"clock": clock} if clock is not None else {}),
        )

    def workspace_client(self, **kwargs: Any) -> Any:
        from azure.ai.ml import MLClient

        return MLClient(
            self.credential,
            subscription_id=SUBSCRIPTION,
            resource_group_name=RESOURCE_GROUP,
            workspace_name=WORKSPACE,
            transport=self.transport(),
            enable_telemetry=False,
            **kwargs,
        )

    # -- default answers ---------------------------------------------------------------------
    def serve_registry_discovery(self) -> None:
        self.on(
            "GET",
            rf"/registrymanagement/v1\.0/registries/{REGISTRY}/discovery",
            Reply(200, load("registry_discovery.json")),
        )

    def serve_workspace(self) -> None:
        self.on("GET", re.escape(WS_PATH), Reply(200, load("workspace.json")))
        self.on("GET", "/discovery", Reply(200, load("workspace_discovery.json")), host=f"{LOCATION}.api.azureml.ms")

    def serve_model_version(self, model: Any) -> None:
        """A registry model version (a REST document) by version and as the label `latest`."""
        name = model["id"].split("/models/")[1].split("/")[0]
        base = re.escape(REGISTRY_PATH) + f"/models/{re.escape(name)}/versions"
        self.on("GET", base, Reply(200, {"value": [model]}))
        self.on("GET", base + "/" + re.escape(str(model["name"])), Reply(200, model))

    def serve_registry(self, *, model: Any = None, component: Any = None, listed: Sequence[str] | None = None) -> None:
        """Discovery, the registry's model listing (`listed`: azureml-assets model specs, default all of
        tests/data/azure-reference's), each listed model's latest version, the base model (default:
        Phi-4 from its spec) and the pipeline component (default: chat_completion_pipeline 0.0.82 from
        its spec). The base model is registered last, so it wins over a listed spec of the same name."""
        from tests import azure_reference as ref

        self.serve_registry_discovery()
        specs = list(listed) if listed is not None else [ref.PHI3_MINI_SYSTEM_METADATA, ref.PHI3_SMALL, ref.PHI4]
        self.on(
            "GET",
            re.escape(REGISTRY_PATH) + "/models",
            Reply(200, {"value": [ref.model_container_doc(f) for f in specs]}),
        )
        for filename in specs:
            self.serve_model_version(ref.model_version_doc(filename))
        self.serve_model_version(model if model is not None else ref.model_version_doc(ref.PHI4))
        component = component if component is not None else ref.component_version_doc()
        cbase = re.escape(REGISTRY_PATH) + "/components/chat_completion_pipeline/versions"
        self.on("GET", cbase, Reply(200, {"value": [component]}))
        self.on("GET", cbase + "/" + re.escape(component["name"]), Reply(200, component))

    def serve_vm_sizes(self) -> None:
        self.on(
            "GET",
            rf"/subscriptions/{SUBSCRIPTION}/providers/Microsoft\.MachineLearningServices/locations/{LOCATION}/vmSizes",
            Reply(200, load("vm_sizes.json")),
        )

    def serve_cluster(self, name: str, *, vm_size: str = "STANDARD_NC24ADS_A100_V4", state: str = "Succeeded") -> None:
        doc = load("compute_gpu_cluster.json", name=name, vm_size=vm_size, provisioning_state=state)
        self.on("GET", re.escape(f"{WS_PATH}/computes/{name}"), Reply(200, doc))

    def serve_job(
        self, name: str, *, status: str = "Running", run_id: str = "run-1", tags: Mapping[str, str] | None = None
    ) -> Any:
        doc = load("job_pipeline.json", job_name=name, status=status, run_id=run_id)
        if tags is not None:
            doc["properties"]["tags"] = dict(tags)
        self.on("GET", re.escape(f"{WS_PATH}/jobs/{name}"), Reply(200, doc))
        return doc

    def accept_job_submission(self) -> Route:
        """PUT jobs/{name} answered 201 with the job as the service returns it (the body echoed,
        plus id, status and services), after a 404 for the check-before-act GET."""

        def created(call: Call) -> Reply:
            body = call.json
            name = call.path.rsplit("/", 1)[1]
            doc = load("job_pipeline.json", job_name=name, status="NotStarted", run_id="")
            doc["properties"].update({k: v for k, v in body["properties"].items() if k != "status"})
            return Reply(201, doc)

        self.on(
            "GET",
            re.escape(f"{WS_PATH}/jobs/") + r"[^/]+",
            error_reply(404, "UserError", "The specified resource was not found."),
        )
        return self.on("PUT", re.escape(f"{WS_PATH}/jobs/") + r"[^/]+", created)

    def serve_endpoint(
        self,
        name: str,
        *,
        state: str = "Succeeded",
        traffic: Mapping[str, int] | None = None,
        deployments: Sequence[Any] = (),
        mirror: Mapping[str, int] | None = None,
    ) -> Any:
        doc = load("endpoint.json", endpoint=name, provisioning_state=state)
        doc["properties"]["traffic"] = dict(traffic or {})
        doc["properties"]["mirrorTraffic"] = dict(mirror or {})
        self.on("GET", re.escape(f"{WS_PATH}/onlineEndpoints/{name}"), Reply(200, doc))
        self.on(
            "GET", re.escape(f"{WS_PATH}/onlineEndpoints/{name}/deployments"), Reply(200, {"value": list(deployments)})
        )
        return doc

    def deployment_doc(
        self, endpoint: str, name: str, *, state: str = "Succeeded", model_name: str = "ft", model_version: str = "1"
    ) -> Any:
        return load(
            "deployment.json",
            endpoint=endpoint,
            deployment=name,
            provisioning_state=state,
            model_name=model_name,
            model_version=model_version,
        )

    def serve_deployment(self, endpoint: str, name: str, **kwargs: Any) -> Any:
        doc = self.deployment_doc(endpoint, name, **kwargs)
        self.on("GET", re.escape(f"{WS_PATH}/onlineEndpoints/{endpoint}/deployments/{name}"), Reply(200, doc))
        return doc

    def serve_model(
        self, name: str, version: str, *, job_name: str = "job-1", tags: Mapping[str, str] | None = None
    ) -> Any:
        doc = load("model_finetuned.json", model_name=name, model_version=version, job_name=job_name)
        if tags is not None:
            doc["properties"]["tags"] = dict(tags)
        self.on("GET", re.escape(f"{WS_PATH}/models/{name}/versions/{version}"), Reply(200, doc))
        return doc

    def run_doc(
        self,
        run_id: str,
        *,
        parent: str,
        root: str,
        status: str = "Completed",
        display_name: str | None = None,
        failed_with: bool = False,
    ) -> Any:
        """A run-history Run (what the children listing and `runs/{id}` return)."""
        doc = load(
            "run_history_run.json",
            run_id=run_id,
            parent_run_id=parent,
            root_run_id=root,
            status=status,
            display_name=display_name or run_id,
        )
        if failed_with:
            doc["error"] = load("run_history_error.json")
        return doc

    def serve_run(self, doc: Any) -> None:
        self.on(
            "GET", re.escape(f"{HISTORY_PATH}/runs/{doc['runId']}"), Reply(200, doc), host=f"{LOCATION}.api.azureml.ms"
        )

    def serve_run_children(self, parent: str, docs: Sequence[Any]) -> None:
        self.on(
            "GET",
            re.escape(f"{HISTORY_PATH}/runs/{parent}/children"),
            Reply(200, {"value": list(docs), "continuationToken": None, "nextLink": None}),
            host=f"{LOCATION}.api.azureml.ms",
        )

    def serve_failed_pipeline_steps(self, root: str) -> list[Any]:
        """Run history of a failed pipeline job `root`: its node failed because the fine-tune step
        failed with an error (the validation step completed). Returns the two step documents."""
        node = self.run_doc(
            "node-run", parent=root, root=root, status="Failed", display_name="chat_completion_pipeline"
        )
        self.serve_job("node-run", status="Failed")
        self.serve_run_children(root, [node])
        steps = [
            self.run_doc(
                "step-validation",
                parent="node-run",
                root=root,
                status="Completed",
                display_name="ft_nlp_common_validation",
            ),
            self.run_doc(
                "step-finetune",
                parent="node-run",
                root=root,
                status="Failed",
                display_name="chat_completion_finetune",
                failed_with=True,
            ),
        ]
        self.serve_run_children("node-run", steps)
        self.serve_job("step-finetune", status="Failed")
        self.serve_run_children("step-finetune", [])
        self.serve_run(steps[1])
        return steps


def scoring_uri(endpoint: str) -> str:
    return SCORING_HOST_TEMPLATE.format(endpoint=endpoint, location=LOCATION) + "/score"


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Block every outgoing socket connection: a request that escaped the rig fails loudly."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any, *args: Any, **kwargs: Any) -> Any:
        attempts.append(address)
        raise RuntimeError(f"test tried to open a real socket to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts
    assert not attempts, f"real sockets were attempted: {attempts}"


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Azurite on 127.0.0.1 is reachable; any other socket (a request that escaped the rig) fails."""
    attempts: list[Any] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if host not in LOOPBACK:
            attempts.append(address)
            raise RuntimeError(f"test tried to open a real socket to {address!r}")

    def connect(self: socket.socket, address: Any) -> Any:
        guard(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        guard(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield attempts
    assert not attempts, f"real sockets were attempted: {attempts}"


@pytest.fixture
def azureml_rig(no_sockets: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AzureMLRig]:
    """A fresh rig with the workspace and its discovery served; the test fails if any request
    found no route. The working directory is a temporary one: azure-ai-ml adds the git details of
    the current directory to a job's properties, which would make the captured bodies depend on
    this checkout."""
    monkeypatch.chdir(tmp_path)
    rig = AzureMLRig()
    rig.serve_workspace()
    yield rig
    assert not rig.unmatched, "requests with no route:\n" + "\n".join(str(c) for c in rig.unmatched)
