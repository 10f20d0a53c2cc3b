"""The janitor sees traffic through Azure Monitor's per-resource metrics API, with the roles it has.

Captures and documents: the answers are shaped like Azure Monitor's `Metrics - List` example
(tests/data/azure-reference/rest-api-examples/monitor_Metrics_List_GetMetric.json, api-version
2023-10-01); the metric's meaning (RequestsPerMinute: unit Count, default aggregation Average, PT1M)
is docs-excerpts/azure-monitor-metric-onlineEndpoints-RequestsPerMinute.txt. The per-resource API
needs Monitoring Reader on the endpoint or its workspace (where the template grants it); the batch
API it replaces needed it on the subscription.
"""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stamina

from shared.adapters.azureml.observability import REQUESTS_METRIC, activity_from_metrics
from shared.domain.janitor_rules import Decision, JanitorPolicy, Rule
from shared.domain.runs import RunRecord, RunState
from shared.errors import MetricsUnavailable
from shared.usecases.janitor import sweep_idle_endpoints
from tests import azure_reference as ref
from tests import azureml_rig as rig_module
from tests.azureml_rig import (
    ARM,
    RESOURCE_GROUP,
    SUBSCRIPTION,
    WORKSPACE,
    WS_PATH,
    AzureMLRig,
    Reply,
    error_reply,
    load,
)

azureml_rig = rig_module.azureml_rig  # fixtures: the rig (no socket may open) and the socket guard alone
no_sockets = rig_module.no_sockets

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
RESOURCE_ID = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.MachineLearningServices"
    f"/workspaces/{WORKSPACE}/onlineEndpoints/ep-chat"
)
METRICS_PATH = f"{RESOURCE_ID}/providers/Microsoft.Insights/metrics"


def _answer(*points: dict[str, Any]) -> dict[str, Any]:
    """The fixture's answer (GetMetric's shape) with the given data points, or as it is when none."""
    doc = load("monitor_requests_per_minute.json", endpoint="ep-chat")
    if points:
        doc["value"][0]["timeseries"][0]["data"] = list(points)
    return doc


def test_the_per_resource_metrics_request_is_pinned(azureml_rig: AzureMLRig) -> None:
    """GET {resourceId}/providers/Microsoft.Insights/metrics on ARM, api-version 2023-10-01, the metric,
    the aggregations read, PT1M and the exact window; answered: 8 requests, the last at 10:02."""
    rig = azureml_rig
    route = rig.on("GET", re.escape(METRICS_PATH), Reply(200, _answer()), host="management.azure.com")
    since = NOW - timedelta(minutes=120)

    activity = rig.backend(clock=lambda: NOW).get_endpoint_activity("ep-chat", since=since)

    assert (activity.requests, activity.last_request_at, activity.source) == (
        8,
        datetime(2025, 6, 1, 10, 2, tzinfo=UTC),
        "azure-monitor",
    )
    [call] = route.calls
    assert call.url.startswith(f"{ARM}{METRICS_PATH}?")
    assert call.query == {
        "api-version": "2023-10-01",
        "metricnames": "RequestsPerMinute",
        "metricnamespace": "Microsoft.MachineLearningServices/workspaces/onlineEndpoints",
        "aggregation": "Total,Count,Average",
        "interval": "PT1M",
        "timespan": "2025-06-01T10:00:00Z/2025-06-01T12:00:00Z",
    }
    assert call.headers["Authorization"].startswith("Bearer ")
    assert ("https://management.azure.com/.default",) in rig.credential.scopes
    assert not rig.requests("POST")  # no metrics:getBatch


@pytest.mark.parametrize(
    ("points", "requests"),
    [
        ([{"timeStamp": "2025-06-01T10:00:00Z", "count": 2.0, "average": 1.5}], 3),  # no Total: Count x Average
        ([{"timeStamp": "2025-06-01T10:00:00Z", "total": 0.0, "count": 0.0}], 0),
        ([{"timeStamp": "2025-06-01T10:00:00Z", "count": 0.0}], 0),
    ],
)
def test_requests_come_from_the_aggregations_asked_for(points: list[dict[str, Any]], requests: int) -> None:
    """Total when there, else Count x Average; Count 0 is zero requests."""
    assert activity_from_metrics(_answer(*points), RESOURCE_ID).requests == requests


@pytest.mark.parametrize(
    "points",
    [
        [{"timeStamp": "2025-06-01T10:00:00Z", "total": 0.0, "count": 0.0}, {"timeStamp": "2025-06-01T10:01:00Z"}],
        [{"timeStamp": "2025-06-01T10:00:00Z", "average": 2.0}],  # the default aggregation alone: no count
        [{"timeStamp": "2025-06-01T10:00:00Z", "count": 3.0}],  # samples, but how many requests?
    ],
)
def test_a_point_without_the_aggregations_is_unknown_not_zero(points: list[dict[str, Any]]) -> None:
    """A minute carrying none of Total, Count, Average (or not enough of them) is unknown: with no
    request seen, the answer is MetricsUnavailable and the janitor keeps the endpoint."""
    with pytest.raises(MetricsUnavailable, match="not counting them as zero requests"):
        activity_from_metrics(_answer(*points), RESOURCE_ID)


def test_requests_seen_beside_unknown_minutes_are_kept() -> None:
    """An unknown minute does not hide the requests that are known: the endpoint is in use."""
    activity = activity_from_metrics(
        _answer({"timeStamp": "2025-06-01T10:00:00Z", "total": 4.0}, {"timeStamp": "2025-06-01T10:01:00Z"}),
        RESOURCE_ID,
    )
    assert (activity.requests, activity.last_request_at) == (4, datetime(2025, 6, 1, 10, 0, tzinfo=UTC))


def test_the_rest_examples_average_only_answer_is_not_read_as_requests() -> None:
    """Azure Monitor's own example answer (average, minimum, maximum per point): under our metric's name
    it is unknown, not idle. Without it, an answer holding nothing at all is unknown too."""
    example = ref.rest_example("monitor_Metrics_List_GetMetric.json")["responses"]["200"]["body"]
    answer = copy.deepcopy(example)
    answer["value"][0]["name"]["value"] = REQUESTS_METRIC
    with pytest.raises(MetricsUnavailable, match="25 of 25 intervals carry none of Total, Count, Average"):
        activity_from_metrics(answer, RESOURCE_ID)
    with pytest.raises(MetricsUnavailable, match="no data point carries"):
        activity_from_metrics(example, RESOURCE_ID)  # only BlobCount / BlobCapacity: nothing of ours


def test_a_failed_metric_is_metrics_unavailable() -> None:
    """A metric whose errorCode is not Success is unavailable, with the service's code."""
    answer = _answer()
    answer["value"][0].update(errorCode="MetricNotFound", errorMessage="no such metric")
    with pytest.raises(MetricsUnavailable, match="MetricNotFound"):
        activity_from_metrics(answer, RESOURCE_ID)


@pytest.fixture
def retry_waits() -> Any:
    """The waits stamina decided on, recorded through its instrumentation hook."""
    waits: list[float] = []
    previous = stamina.instrumentation.get_on_retry_hooks()
    stamina.instrumentation.set_on_retry_hooks([lambda details: waits.append(details.wait_for)])
    yield waits
    stamina.instrumentation.set_on_retry_hooks(previous)


def test_429_503_and_529_are_retried_with_backoff(azureml_rig: AzureMLRig, retry_waits: list[float]) -> None:
    """Throttled (429, Retry-After), unavailable (503, retry-after-ms) and overloaded (529, no hint:
    stamina's backoff) are retried, then the answer is read."""
    rig = azureml_rig
    route = rig.on(
        "GET",
        re.escape(METRICS_PATH),
        error_reply(429, "TooManyRequests", "throttled", headers={"Retry-After": "0"}),
        error_reply(503, "ServiceUnavailable", "busy", headers={"retry-after-ms": "5"}),
        error_reply(529, "ServerBusy", "overloaded"),
        Reply(200, _answer()),
    )
    activity = rig.backend(clock=lambda: NOW).get_endpoint_activity("ep-chat", since=NOW - timedelta(hours=2))
    assert activity.requests == 8 and len(route.calls) == 4
    assert retry_waits[:2] == [0.0, 0.005] and len(retry_waits) == 3


def test_a_403_is_metrics_unavailable_naming_monitoring_reader(azureml_rig: AzureMLRig) -> None:
    """Refused: MetricsUnavailable (the janitor keeps the endpoint) naming the role and where it is needed."""
    rig = azureml_rig
    rig.on("GET", re.escape(METRICS_PATH), error_reply(403, "AuthorizationFailed", "no access"))
    with pytest.raises(MetricsUnavailable) as info:
        rig.backend(clock=lambda: NOW).get_endpoint_activity("ep-chat", since=NOW - timedelta(hours=2))
    message = str(info.value)
    assert (
        "HTTP 403" in message
        and "lacks the role 'Monitoring Reader' on the online endpoint (or its workspace)" in message
    )


class _NoRuns:
    def list(self) -> list[RunRecord]:
        return []

    def transition(self, run_id: str, to: RunState, **_: Any) -> RunRecord:
        raise AssertionError("no run to retire")


class _Audit:
    def __init__(self) -> None:
        self.decisions: list[Decision] = []

    def write(self, decision: Decision, *, at: datetime, dry_run: bool, sweep_id: str) -> None:
        self.decisions.append(decision)


def _serve_idle_endpoint(rig: AzureMLRig) -> None:
    """One endpoint this app owns (created 09:00, three hours before NOW), with one deployment."""
    endpoint = load("endpoint.json", endpoint="ep-chat", provisioning_state="Succeeded")
    endpoint["properties"]["traffic"] = {"blue": 100}
    rig.on("GET", re.escape(f"{WS_PATH}/onlineEndpoints"), Reply(200, {"value": [endpoint]}))
    rig.serve_endpoint("ep-chat", traffic={"blue": 100}, deployments=[rig.deployment_doc("ep-chat", "blue")])


@pytest.mark.parametrize(
    ("points", "deleted", "rule"),
    [
        (
            [
                {"timeStamp": f"2025-06-01T{h}:{m:02d}:00Z", "total": 0.0, "count": 0.0}
                for h in (10, 11)
                for m in range(60)
            ],
            True,
            Rule.IDLE,
        ),
        (
            [{"timeStamp": "2025-06-01T10:00:00Z", "total": 0.0, "count": 0.0}, {"timeStamp": "2025-06-01T10:01:00Z"}],
            False,
            Rule.METRICS_UNAVAILABLE,
        ),
    ],
    ids=["idle-for-two-hours", "one-minute-unknown"],
)
def test_the_janitor_deletes_an_idle_endpoint_it_can_see_and_keeps_an_unknown_one(
    azureml_rig: AzureMLRig, points: list[dict[str, Any]], deleted: bool, rule: Rule
) -> None:
    """A janitor pass over the Azure ML adapter: the per-resource metrics read decides; zero requests for
    the idle window deletes the endpoint, one unknown minute keeps it."""
    rig = azureml_rig
    _serve_idle_endpoint(rig)
    metrics = rig.on("GET", re.escape(METRICS_PATH), Reply(200, _answer(*points)))
    delete = rig.lro("DELETE", re.escape(f"{WS_PATH}/onlineEndpoints/ep-chat"), initial_status=202, header="Location")
    audit = _Audit()

    report = sweep_idle_endpoints(
        backend=rig.backend(clock=lambda: NOW),
        ledger=_NoRuns(),
        audit=audit,
        last_proxy_use=lambda endpoint: None,
        policy=JanitorPolicy(instance="tunegrid", idle=timedelta(minutes=120), grace=timedelta(minutes=60)),
        now=lambda: NOW,
    )

    [call] = metrics.calls
    assert call.query["timespan"] == "2025-06-01T10:00:00Z/2025-06-01T12:00:00Z"
    [decision] = [d for d in report.decisions if d.target == "ep-chat"]
    assert decision.rule == rule
    assert bool(delete.calls) is deleted
    assert [d.rule for d in audit.decisions] == [rule]
