"""Do the storage account and the workspace deliver their events to this app?

Each source has one Event Grid system topic (`properties.source` is the source's resource id,
compared case-insensitively: the service answers it lower-cased). The app needs one subscription on
each, delivering to its host:
- storage: `Microsoft.Storage.BlobCreated` to `/runtime/webhooks/blobs?functionName=Host.Functions.ingest_dataset`
  (the Event Grid based blob trigger), limited to the training container;
- workspace: `Microsoft.MachineLearningServices.RunCompleted` (and `RunStatusChanged`, for failed runs)
  to `/runtime/webhooks/eventgrid?functionName=job_events`.
(infra/event-subscriptions.bicep creates both; scripts/post-deploy.* deploys it.)

A subscription's GET shows only `endpointBaseUrl` (no query); the function name is in the query, read
through `getFullUrl`, whose answer also carries the host's system key: `webhook_target` keeps the
host, the path and `functionName`, and drops the rest before anything else sees it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tunegrid.doctor.report import CheckResult, Status

INGEST_FUNCTION = "ingest_dataset"
JOB_EVENTS_FUNCTION = "job_events"
"""The function names of functions/ingest.py and functions/job_events.py (a test keeps them in step)."""
POSTDEPLOY_FIX = (
    "run `azd hooks run postdeploy` (or ./scripts/post-deploy.sh) to create the event subscriptions "
    "(infra/event-subscriptions.bicep)"
)


@dataclass(frozen=True)
class WebhookTarget:
    """Where a webhook delivers, without its key: host, path and the `functionName` query value."""

    host: str
    path: str
    function: str | None

    @property
    def where(self) -> str:
        fn = f"?functionName={self.function}" if self.function else ""
        return f"https://{self.host}{self.path}{fn}"


def webhook_target(url: str, *, function_known: bool = True) -> WebhookTarget:
    """The host, path and function name of a webhook URL; every other query value (the `code` key) is dropped."""
    parts = urlsplit(url)
    names = parse_qs(parts.query).get("functionName") or []
    function = names[-1] if function_known and names else None
    return WebhookTarget(parts.hostname or "", parts.path.rstrip("/"), function)


@dataclass(frozen=True)
class Route:
    """One delivery the app needs."""

    check: str
    source_kind: str
    topic_type: str
    path: str
    function: str
    """The function name the webhook query must carry (compared case-insensitively)."""
    aliases: frozenset[str]
    required_events: tuple[str, ...]
    wanted_events: tuple[str, ...] = ()
    subject_prefix: str | None = None


def storage_route(*, container: str) -> Route:
    return Route(
        check=f"BlobCreated -> {INGEST_FUNCTION}",
        source_kind="storage account",
        topic_type="Microsoft.Storage.StorageAccounts",
        path="/runtime/webhooks/blobs",
        function=f"Host.Functions.{INGEST_FUNCTION}",
        aliases=frozenset({INGEST_FUNCTION}),
        required_events=("Microsoft.Storage.BlobCreated",),
        subject_prefix=f"/blobServices/default/containers/{container}/",
    )


def workspace_route() -> Route:
    return Route(
        check=f"job events -> {JOB_EVENTS_FUNCTION}",
        source_kind="workspace",
        topic_type="Microsoft.MachineLearningServices.Workspaces",
        path="/runtime/webhooks/eventgrid",
        function=JOB_EVENTS_FUNCTION,
        aliases=frozenset(),
        required_events=("Microsoft.MachineLearningServices.RunCompleted",),
        wanted_events=("Microsoft.MachineLearningServices.RunStatusChanged",),
    )


def find_system_topic(topics: Sequence[Mapping[str, Any]], source_id: str) -> Mapping[str, Any] | None:
    """The system topic whose source is `source_id`."""
    want = source_id.rstrip("/").lower()
    for topic in topics:
        source = str((topic.get("properties") or {}).get("source") or "").rstrip("/").lower()
        if source == want:
            return topic
    return None


@dataclass(frozen=True)
class Delivery:
    """One event subscription of the topic, with where it delivers (None: not a webhook / unknown)."""

    doc: Mapping[str, Any]
    target: WebhookTarget | None
    function_unread: str = ""
    """Why the function name could not be read (getFullUrl refused), if so."""

    @property
    def name(self) -> str:
        return str(self.doc.get("name") or "")

    @property
    def props(self) -> Mapping[str, Any]:
        return self.doc.get("properties") or {}


def base_target(doc: Mapping[str, Any], *, app_site_id: str = "") -> WebhookTarget | None:
    """Where a subscription delivers as its GET shows it: a WebHook's `endpointBaseUrl`, or an
    AzureFunction destination's `resourceId` (`.../sites/{app}/functions/{name}`) on the app."""
    dest = (doc.get("properties") or {}).get("destination") or {}
    kind = str(dest.get("endpointType") or "").lower()
    props = dest.get("properties") or {}
    if kind == "webhook" and props.get("endpointBaseUrl"):
        return webhook_target(str(props["endpointBaseUrl"]), function_known=False)
    if kind == "azurefunction" and app_site_id:
        rid = str(props.get("resourceId") or "")
        site, _, function = rid.rpartition("/functions/")
        if site.lower() == app_site_id.lower() and function:
            return WebhookTarget("", "", function)
    return None


def _events(props: Mapping[str, Any]) -> list[str]:
    return [str(e) for e in (props.get("filter") or {}).get("includedEventTypes") or []]


def _matches_app(target: WebhookTarget | None, app_host: str) -> bool:
    return target is not None and (target.host == "" or target.host.lower() == app_host.lower())


def route_result(
    route: Route,
    *,
    source_id: str,
    topic: Mapping[str, Any] | None,
    deliveries: Sequence[Delivery],
    app_host: str,
) -> CheckResult:
    """Pass when one subscription delivers the required events to the right function on the app's
    host; warn when it probably does but something could not be read or is broader than needed."""
    area = "event grid"
    if topic is None:
        return CheckResult(
            area,
            route.check,
            Status.FAIL,
            f"no Event Grid system topic has the {route.source_kind} {source_id} as its source",
            "run `azd provision` (infra/main.bicep creates the system topics), then `azd hooks run postdeploy`",
        )
    topic_name = str(topic.get("name") or "")
    ours = [d for d in deliveries if _matches_app(d.target, app_host)]
    if not ours:
        elsewhere = sorted({d.target.where for d in deliveries if d.target is not None})
        seen = f" (it delivers to: {', '.join(elsewhere)})" if elsewhere else " (it has none)"
        return CheckResult(
            area,
            route.check,
            Status.FAIL,
            f"no event subscription of system topic {topic_name} delivers to {app_host}{seen}",
            POSTDEPLOY_FIX,
        )
    problems: list[tuple[Status, str, Delivery]] = []
    for d in ours:
        found = _judge(route, d)
        if found is None:
            return CheckResult(
                area,
                route.check,
                Status.PASS,
                f"{topic_name}/{d.name} delivers {', '.join(_events(d.props) or ['every event type'])} "
                f"to {d.target.where if d.target else app_host}",
            )
        problems.append((*found, d))
    status, text, d = min(problems, key=lambda p: 0 if p[0] is Status.WARN else 1)
    return CheckResult(area, route.check, status, f"{topic_name}/{d.name}: {text}", POSTDEPLOY_FIX)


def _judge(route: Route, d: Delivery) -> tuple[Status, str] | None:
    """None when the delivery is what the route needs, else the worst thing wrong with it."""
    target = d.target
    assert target is not None
    state = str(d.props.get("provisioningState") or "")
    if state and state.lower() != "succeeded":
        return Status.FAIL, f"provisioning state {state}"
    if target.path and target.path.lower() != route.path:
        return Status.FAIL, f"delivers to {target.path}, not {route.path}"
    events = {e.lower() for e in _events(d.props)}
    missing = [e for e in route.required_events if events and e.lower() not in events]
    if missing:
        return Status.FAIL, f"does not deliver {', '.join(missing)} (only {', '.join(sorted(events))})"
    if target.function is None:
        why = d.function_unread or "its full URL was not read"
        return Status.WARN, f"delivers to https://{target.host}{target.path}, function name not verified ({why})"
    if target.function.lower() not in {route.function.lower(), *(a.lower() for a in route.aliases)}:
        return Status.FAIL, f"delivers to function {target.function}, not {route.function}"
    lacking = [e for e in route.wanted_events if events and e.lower() not in events]
    if lacking:
        return Status.WARN, f"does not deliver {', '.join(lacking)} (the status changes of runs, failures included)"
    prefix = str((d.props.get("filter") or {}).get("subjectBeginsWith") or "")
    if route.subject_prefix and not prefix.lower().startswith(route.subject_prefix.lower()):
        return (
            Status.WARN,
            f"subjectBeginsWith is {prefix!r}: every blob outside {route.subject_prefix} is delivered too",
        )
    return None
