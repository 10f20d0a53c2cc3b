"""The real Azure captures in tests/data/azure-reference (see its README for where each comes from),
turned into what the tests serve or parse.

- `model_version_doc(spec)` / `component_version_doc(spec)`: a registry model or component version as
  the REST API answers azure-ai-ml, built from the azureml-assets spec it was published from.
- `Recording` / `replay(...)`: azure-ai-ml's own test-proxy recordings of the live service, replayed
  at the transport level through an `AzureMLRig`: every recorded response is served to the request
  with the same method and path (the query is not compared: the SDK's api-versions have moved on
  since the recording), in recorded order, with the recordings' sanitised subscription, resource
  group, workspace and registry mapped onto the rig's.
- `event_samples(name)`: the Event Grid sample events, as published.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from tests.azureml_rig import (
    ARM,
    LOCATION,
    REGISTRY,
    RESOURCE_GROUP,
    SUBSCRIPTION,
    WORKSPACE,
    AzureMLRig,
    Call,
    Reply,
    error_reply,
)

REFERENCE = Path(__file__).resolve().parent / "data" / "azure-reference"
ASSETS = REFERENCE / "azureml-assets"
RECORDINGS = REFERENCE / "azure-sdk-recordings"
EVENT_SAMPLES = REFERENCE / "event-samples"
REST_EXAMPLES = REFERENCE / "rest-api-examples"

PHI4 = "model-Phi-4.spec.yaml"
PHI3_MINI_SYSTEM_METADATA = "model-Phi-3-mini-4k-instruct.system-metadata-form.spec.yaml"
PHI3_MINI_TAGS = "model-Phi-3-mini-4k-instruct.tags-form.spec.yaml"
PHI3_SMALL = "model-Phi-3-small-8k-instruct.spec.yaml"
PIPELINE_COMPONENT = "component-chat_completion_pipeline.spec.yaml"

RECORDED_ENDPOINT_E2E = "test_online_endpoint.pyTestOnlineEndpointtest_online_endpoint_e2e.json"
RECORDED_ENDPOINT_DELETE_204 = "test_online_endpoint.pyTestOnlineEndpointtest_online_endpoint_mir_e2e.json"
RECORDED_REGISTRY_403 = (
    "test_online_deployment.pyTestOnlineDeploymenttest_online_deployment_create_when_registry_assets.json"
)
RECORDED_PIPELINE_JOB_400 = "test_pipeline_job.pyTestPipelineJobtest_pipeline_job_create_with_registries.json"


def spec(filename: str) -> dict[str, Any]:
    """An azureml-assets spec (model or component), as YAML loads it."""
    return dict(yaml.safe_load((ASSETS / filename).read_text(encoding="utf-8")))


def _tag_text(value: Any) -> str:
    """The REST schema's tags are `dict[str, str]`: a list or mapping of a spec is stored as its
    Python literal (what the notebook reads back with `ast.literal_eval`), a number as its digits."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _system_data(created: str) -> dict[str, str]:
    return {
        "createdAt": created,
        "createdBy": "azureml",
        "createdByType": "Application",
        "lastModifiedAt": created,
        "lastModifiedBy": "azureml",
        "lastModifiedByType": "Application",
    }


def model_version_doc(filename: str, *, registry: str = REGISTRY) -> dict[str, Any]:
    """The registry's answer for the model version published from the spec `filename`, in the REST
    shape azure-ai-ml deserialises (`ModelVersion`): the spec's tags (as strings), properties and
    `isArchived`, and its `system_metadata` under `properties.system_metadata`, where the SDK's
    `begin_create_or_update_model_with_system_metadata` uploads it. Whether the service answers that
    key on a GET is not in any capture (see docs/azureml.md)."""
    doc = spec(filename)
    name, version = str(doc["name"]), str(doc["version"])
    asset_id = f"azureml://registries/{registry}/models/{name}/versions/{version}"
    properties: dict[str, Any] = {
        "description": str(doc.get("description") or ""),
        "properties": {str(k): _tag_text(v) for k, v in (doc.get("properties") or {}).items()},
        "tags": {str(k): _tag_text(v) for k, v in (doc.get("tags") or {}).items()},
        "flavors": {},
        "isAnonymous": False,
        "isArchived": bool(doc.get("isArchived", False)),
        "modelType": "mlflow_model",
        "modelUri": asset_id,
        "jobName": None,
    }
    if doc.get("system_metadata") is not None:
        properties["system_metadata"] = doc["system_metadata"]
    return {
        "id": asset_id,
        "name": version,
        "type": "Microsoft.MachineLearningServices/registries/models/versions",
        "properties": properties,
        "systemData": _system_data("2025-01-09T00:00:00.0000000Z"),
    }


def model_container_doc(filename: str, *, registry: str = REGISTRY) -> dict[str, Any]:
    """A model container (what `registry.models.list()` pages through), for the spec's model. Hand-
    written after the `ModelContainer` schema of azure-rest-api-specs (no capture of a listing)."""
    doc = spec(filename)
    name, version = str(doc["name"]), str(doc["version"])
    return {
        "id": f"azureml://registries/{registry}/models/{name}",
        "name": name,
        "type": "Microsoft.MachineLearningServices/registries/models",
        "properties": {
            "description": "",
            "properties": {},
            "tags": {},
            "isArchived": bool(doc.get("isArchived", False)),
            "latestVersion": version,
            "nextVersion": str(int(version) + 1) if version.isdigit() else None,
        },
        "systemData": _system_data("2025-01-09T00:00:00.0000000Z"),
    }


def component_version_doc(filename: str = PIPELINE_COMPONENT, *, registry: str = REGISTRY) -> dict[str, Any]:
    """The registry's answer for the component version published from the spec `filename`: the
    spec itself as `componentSpec` (inputs with their enums and defaults, outputs, jobs)."""
    doc = spec(filename)
    name, version = str(doc["name"]), str(doc["version"])
    return {
        "id": f"azureml://registries/{registry}/components/{name}/versions/{version}",
        "name": version,
        "type": "Microsoft.MachineLearningServices/registries/components/versions",
        "properties": {
            "description": str(doc.get("description") or ""),
            "properties": {},
            "tags": {str(k): _tag_text(v) for k, v in (doc.get("tags") or {}).items()},
            "isAnonymous": False,
            "isArchived": False,
            "componentSpec": doc,
        },
        "systemData": _system_data("2025-07-01T00:00:00.0000000Z"),
    }


# -- recordings ----------------------------------------------------------------------------------
_SANITISED: tuple[tuple[str, str], ...] = (
    # the recordings' sanitised values (test-proxy sanitisers) -> the rig's
    (r"https://Sanitized\.azure\.com", ARM),
    (r"https://Sanitized\.api\.azureml\.ms", f"https://{LOCATION}.api.azureml.ms"),
    (r"/subscriptions/00000000-0000-0000-0000-000000000(?=/)", f"/subscriptions/{SUBSCRIPTION}"),
    (r"/(resourceGroups|resourcegroups)/00000(?=[/?\"])", rf"/\1/{RESOURCE_GROUP}"),
    (r"/workspaces/00000(?=[/?\"]|$)", f"/workspaces/{WORKSPACE}"),
    (r"registries/sdkv2-testFeed", f"registries/{REGISTRY}"),
    (r"registry sdkv2-testFeed", f"registry {REGISTRY}"),
    (r"\"feedName\": \"sdkv2-testFeed\"", f'"feedName": "{REGISTRY}"'),
)
_KEPT_HEADERS = ("Azure-AsyncOperation", "Location", "Retry-After", "x-ms-async-operation-timeout", "Content-Type")
_WRITES = frozenset({"PUT", "POST", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Entry:
    index: int
    method: str
    url: str
    status: int
    headers: Mapping[str, str]
    body: Any

    @property
    def path(self) -> str:
        return unquote(urlsplit(self.url).path)

    @property
    def key(self) -> tuple[str, str]:
        return (self.method, self.path)

    def reply(self) -> Reply:
        headers = {k: v for k, v in self.headers.items() if k in _KEPT_HEADERS and isinstance(v, str)}
        if "Azure-AsyncOperation" in headers or "/mfeOperationsStatus/" in self.path:
            # The one change to what was recorded: a long-running operation's answers ask the poller
            # to come back after 1 ms instead of azure-core's default interval (seconds).
            headers["retry-after-ms"] = "1"
        if self.body is None:
            return Reply(self.status, headers=headers, body=b"")
        if isinstance(self.body, str):
            return Reply(self.status, headers=headers, body=self.body.encode("utf-8"))
        return Reply(self.status, self.body, headers)


@dataclass(frozen=True)
class Recording:
    name: str
    entries: tuple[Entry, ...]

    @classmethod
    def load(cls, filename: str) -> Recording:
        text = (RECORDINGS / filename).read_text(encoding="utf-8")
        for pattern, replacement in _SANITISED:
            text = re.sub(pattern, replacement, text)
        doc = json.loads(text)
        entries = tuple(
            Entry(
                index=i,
                method=str(e["RequestMethod"]).upper(),
                url=str(e["RequestUri"]),
                status=int(e["StatusCode"]),
                headers=dict(e.get("ResponseHeaders") or {}),
                body=e.get("ResponseBody"),
            )
            for i, e in enumerate(doc["Entries"])
        )
        return cls(name=filename, entries=entries)

    def first(self, method: str, path_regex: str) -> Entry:
        return next(e for e in self.entries if e.method == method and re.search(path_regex, e.path))


@dataclass
class Replayer:
    """Serves a recording through a rig. A recorded read (GET) of a path is served only once every write
    (PUT, POST, PATCH, DELETE) recorded before it on that same path has been replayed: a GET recorded
    after the PUT that created an endpoint is not what a GET before that PUT sees. Such a request gets
    the test's `before` answer (which a test also uses to start from a resource that exists). Writes
    are served in recorded order; once a path's recorded answers are used up, its last one repeats."""

    recording: Recording
    before: Mapping[tuple[str, str], Reply] = field(default_factory=dict)
    served: list[Entry] = field(default_factory=list)
    _consumed: set[int] = field(default_factory=set)
    _last: dict[tuple[str, str], Reply] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _rig: AzureMLRig | None = None

    def _ready(self, entry: Entry) -> bool:
        if entry.method in _WRITES:
            return True
        earlier_writes = (
            e.index
            for e in self.recording.entries[: entry.index]
            if e.method in _WRITES and e.path == entry.path and e.index != entry.index
        )
        return all(i in self._consumed for i in earlier_writes)

    def answer(self, call: Call) -> Reply:
        key = (call.method, call.path)
        with self._lock:
            pending = [e for e in self.recording.entries if e.key == key and e.index not in self._consumed]
            if pending and self._ready(pending[0]):
                entry = pending[0]
                self._consumed.add(entry.index)
                self.served.append(entry)
                self._last[key] = entry.reply()
                return self._last[key]
            if key in self._last and not pending:
                return self._last[key]
            if key in self.before:
                return self.before[key]
        if self._rig is not None:  # the rig's fixture fails the test for it
            self._rig.unmatched.append(call)
        return error_reply(501, "ReplayNoAnswer", f"{self.recording.name} has no answer yet for {call}")

    def install(self, rig: AzureMLRig) -> Replayer:
        self._rig = rig
        for method, path in {e.key for e in self.recording.entries} | set(self.before):
            rig.on(method, re.escape(path), self.answer)
        return self


def replay(rig: AzureMLRig, filename: str, *, before: Mapping[tuple[str, str], Reply] | None = None) -> Replayer:
    """Install the recording `filename` on the rig (see `Replayer`)."""
    return Replayer(Recording.load(filename), before=dict(before or {})).install(rig)


# -- events ----------------------------------------------------------------------------------------
def event_samples(filename: str) -> list[dict[str, Any]]:
    """A published Event Grid sample: a JSON array of events (Event Grid or CloudEvents schema)."""
    return list(json.loads((EVENT_SAMPLES / filename).read_text(encoding="utf-8")))


def rest_example(filename: str) -> dict[str, Any]:
    return dict(json.loads((REST_EXAMPLES / filename).read_text(encoding="utf-8")))
