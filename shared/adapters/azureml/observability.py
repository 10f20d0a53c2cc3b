"""What a job logged and what an endpoint served, read over plain HTTPS through azure-core.

- Job metrics: the workspace's MLflow tracking server speaks the open MLflow REST API under
  `https://<region>.api.azureml.ms/mlflow/v1.0/<workspace path>/api/2.0/mlflow/...` with an ARM
  token (the `azureml://` tracking URI with `https`, as in Azure ML's "Using MLflow REST" sample).
  That needs neither `mlflow` nor `azureml-mlflow` in the Function App (mlflow is about 100 MB and
  only installed for the local backend; azureml-mlflow pulls azure-storage and more). The component
  logs every numeric Trainer value on the root pipeline run, which is the job (run id = job name).
- Endpoint activity: Azure Monitor's `RequestsPerMinute` of the endpoint resource, read through the
  per-resource metrics API (`GET {resourceId}/providers/Microsoft.Insights/metrics`, api-version
  2023-10-01) on the same ARM pipeline. It needs Monitoring Reader only on the endpoint or a parent
  (the workspace), where the batch API (`metrics:getBatch`) needs it on the subscription. The metric
  (unit Count, default aggregation Average, PT1M grain; Azure Monitor's metric reference) is asked
  for the aggregations read here, `Total,Count,Average`; a minute that carries none of them is
  unknown, never zero, and an answer with unknown minutes and no request is `MetricsUnavailable`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core import PipelineClient
from azure.core.credentials import TokenCredential
from azure.core.exceptions import HttpResponseError, ODataV4Format
from azure.core.pipeline.policies import BearerTokenCredentialPolicy, HeadersPolicy, UserAgentPolicy
from azure.core.pipeline.transport import HttpTransport
from azure.core.rest import HttpRequest

from shared.domain.clock import as_utc, parse_time, utcnow
from shared.domain.resources import EndpointActivity, MetricPoint
from shared.errors import MetricsUnavailable

log = logging.getLogger(__name__)

ARM_ENDPOINT = "https://management.azure.com"
ARM_SCOPE = f"{ARM_ENDPOINT}/.default"
ENDPOINT_METRIC_NAMESPACE = "Microsoft.MachineLearningServices/workspaces/onlineEndpoints"
REQUESTS_METRIC = "RequestsPerMinute"
_MAX_HISTORY_PAGES = 20


def http_client(
    transport: HttpTransport | None, *, credential: TokenCredential | None = None, scope: str | None = None
) -> PipelineClient:
    """A bare azure-core pipeline: our headers, a bearer token when asked, the shared transport."""
    policies: list[Any] = [HeadersPolicy(), UserAgentPolicy(sdk_moniker="tunegrid")]
    if credential is not None and scope:
        policies.append(BearerTokenCredentialPolicy(credential, scope))
    kwargs: dict[str, Any] = {"policies": policies}
    if transport is not None:
        kwargs["transport"] = transport
    return PipelineClient(base_url=ARM_ENDPOINT, **kwargs)


def mlflow_base_url(tracking_uri: str) -> str:
    """`azureml://host/mlflow/v1.0/...` -> `https://host/mlflow/v1.0/...` (query dropped)."""
    uri = tracking_uri.strip().split("?", 1)[0].rstrip("/")
    if uri.startswith("azureml://"):
        uri = "https://" + uri[len("azureml://") :]
    if not uri.startswith("https://"):
        raise ValueError(f"unexpected MLflow tracking URI {tracking_uri!r}")
    return uri


def read_run_metrics(client: PipelineClient, base_url: str, run_id: str) -> dict[str, list[MetricPoint]]:
    """Every numeric metric's history of one MLflow run, ordered by step then time."""

    def get(path: str, params: dict[str, str]) -> dict[str, Any]:
        response = client.send_request(HttpRequest("GET", f"{base_url}/api/2.0/mlflow/{path}", params=params))
        response.raise_for_status()
        return dict(response.json() or {})

    run = get("runs/get", {"run_id": run_id}).get("run") or {}
    keys = sorted({str(m["key"]) for m in (run.get("data") or {}).get("metrics") or [] if "key" in m})
    out: dict[str, list[MetricPoint]] = {}
    for key in keys:
        rows: list[tuple[int, int, float]] = []
        token: str | None = None
        for _ in range(_MAX_HISTORY_PAGES):
            params = {"run_id": run_id, "metric_key": key}
            if token:
                params["page_token"] = token
            page = get("metrics/get-history", params)
            for m in page.get("metrics") or []:
                try:
                    rows.append((int(m.get("step") or 0), int(m.get("timestamp") or 0), float(m["value"])))
                except (KeyError, TypeError, ValueError):
                    continue
            token = page.get("next_page_token") or None
            if not token:
                break
        rows.sort()
        out[key] = [MetricPoint(step=step, value=value) for step, _, value in rows]
    return out


def endpoint_resource_id(subscription: str, resource_group: str, workspace: str, endpoint: str) -> str:
    return (
        f"/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.MachineLearningServices"
        f"/workspaces/{workspace}/onlineEndpoints/{endpoint}"
    )


METRICS_API_VERSION = "2023-10-01"
METRIC_AGGREGATIONS = ("Total", "Count", "Average")


def _granularity(span: timedelta) -> timedelta:
    """PT1M (the metric's own grain) for the janitor's windows; coarser for windows over a day, to
    keep the answer small."""
    if span <= timedelta(days=1):
        return timedelta(minutes=1)
    if span <= timedelta(days=7):
        return timedelta(minutes=5)
    return timedelta(hours=1)


def _duration(value: timedelta) -> str:
    minutes = int(value.total_seconds() // 60)
    return f"PT{minutes // 60}H" if minutes % 60 == 0 else f"PT{minutes}M"


def _stamp(value: datetime) -> str:
    return as_utc(value).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def endpoint_metrics_request(resource_id: str, *, since: datetime, end: datetime) -> HttpRequest:
    """The per-resource metrics request for an endpoint's RequestsPerMinute between `since` and `end`."""
    params = {
        "api-version": METRICS_API_VERSION,
        "metricnames": REQUESTS_METRIC,
        "metricnamespace": ENDPOINT_METRIC_NAMESPACE,
        "aggregation": ",".join(METRIC_AGGREGATIONS),
        "interval": _duration(_granularity(end - since)),
        "timespan": f"{_stamp(since)}/{_stamp(end)}",
    }
    return HttpRequest("GET", f"{ARM_ENDPOINT}{resource_id}/providers/Microsoft.Insights/metrics", params=params)


def _requests_in(point: Mapping[str, Any]) -> float | None:
    """Requests in one interval from the aggregations asked for; None when none of them is there."""
    total, count, average = point.get("total"), point.get("count"), point.get("average")
    if total is not None:
        return float(total)
    if count is not None and average is not None:
        return float(count) * float(average)
    if count is not None and float(count) == 0:
        return 0.0
    return None


def activity_from_metrics(doc: Mapping[str, Any], resource_id: str) -> EndpointActivity:
    """Requests and the latest minute with any, from a metrics answer (the shape of Azure Monitor's
    `Metrics - List` example). Unknown minutes never count as zero: with no request seen, an answer
    holding any is `MetricsUnavailable`, and so is one holding no data point at all."""
    total = 0.0
    last: datetime | None = None
    points = unknown = 0
    for metric in doc.get("value") or []:
        name = (metric.get("name") or {}).get("value")
        if name and name != REQUESTS_METRIC:
            continue
        error_code = metric.get("errorCode")
        if error_code and str(error_code).lower() != "success":
            raise MetricsUnavailable(
                f"Azure Monitor returned {error_code} for {REQUESTS_METRIC} of {resource_id}: {metric.get('errorMessage', '')}"
            )
        for series in metric.get("timeseries") or []:
            for point in series.get("data") or []:
                points += 1
                value = _requests_in(point)
                if value is None:
                    unknown += 1
                    continue
                total += value
                stamp = parse_time(point.get("timeStamp"))
                if value > 0 and stamp is not None and (last is None or stamp > last):
                    last = stamp
    if total <= 0 and (unknown or not points):
        what = f"{unknown} of {points} intervals carry none of" if points else "no data point carries"
        raise MetricsUnavailable(
            f"{REQUESTS_METRIC} of {resource_id}: {what} {', '.join(METRIC_AGGREGATIONS)}; not counting them as zero requests"
        )
    return EndpointActivity(requests=round(total), last_request_at=last, source="azure-monitor")


def read_endpoint_activity(
    client: PipelineClient, resource_id: str, *, since: datetime, now: datetime | None = None
) -> EndpointActivity:
    """Requests the endpoint served since `since` (all callers), and the latest minute with any.
    HTTP errors raise `HttpResponseError` (the adapter translates and retries them)."""
    end = now or utcnow()
    since = as_utc(since)
    if since >= end:
        return EndpointActivity(requests=0, last_request_at=None, source="azure-monitor")
    response = client.send_request(endpoint_metrics_request(resource_id, since=since, end=end))
    if response.status_code >= 400:
        raise HttpResponseError(response=response, error_format=ODataV4Format)
    return activity_from_metrics(response.json() or {}, resource_id)
