"""What a job logged and what an endpoint served, read over plain HTTPS through azure-core.

- Job metrics: the workspace's MLflow tracking server speaks the open MLflow REST API under
  `https://<region>.api.azureml.ms/mlflow/v1.0/<workspace path>/api/2.0/mlflow/...` with an ARM
  token (the `azureml://` tracking URI with `https`, as in Azure ML's "Using MLflow REST" sample).
  That needs neither `mlflow` nor `azureml-mlflow` in the Function App (mlflow is about 100 MB and
  only installed for the local backend; azureml-mlflow pulls azure-storage and more). The component
  logs every numeric Trainer value on the root pipeline run, which is the job (run id = job name).
- Endpoint activity: Azure Monitor's `RequestsPerMinute` of the endpoint resource, PT1M grain, via
  azure-monitor-querymetrics' MetricsClient. No data point means no request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from azure.core import PipelineClient
from azure.core.credentials import TokenCredential
from azure.core.pipeline.policies import BearerTokenCredentialPolicy, HeadersPolicy, UserAgentPolicy
from azure.core.pipeline.transport import HttpTransport
from azure.core.rest import HttpRequest

from shared.domain.clock import as_utc, utcnow
from shared.domain.resources import EndpointActivity, MetricPoint
from shared.errors import MetricsUnavailable

log = logging.getLogger(__name__)

ARM_SCOPE = "https://management.azure.com/.default"
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
    return PipelineClient(base_url="https://management.azure.com", **kwargs)


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


def _granularity(span: timedelta) -> timedelta:
    if span <= timedelta(days=1):
        return timedelta(minutes=1)
    if span <= timedelta(days=7):
        return timedelta(minutes=5)
    return timedelta(hours=1)


def read_endpoint_activity(
    metrics_client_factory: Callable[[], Any],
    resource_id: str,
    *,
    since: datetime,
    now: datetime | None = None,
) -> EndpointActivity:
    """Requests the endpoint served since `since` (all callers), and the latest minute with any.
    Transport and service errors propagate (the adapter translates them); a metric the service
    reports as failed is `MetricsUnavailable`."""
    end = now or utcnow()
    since = as_utc(since)
    if since >= end:
        return EndpointActivity(requests=0, last_request_at=None, source="azure-monitor")
    client = metrics_client_factory()
    results = client.query_resources(
        resource_ids=[resource_id],
        metric_namespace=ENDPOINT_METRIC_NAMESPACE,
        metric_names=[REQUESTS_METRIC],
        timespan=(since, end),
        granularity=_granularity(end - since),
        aggregations=["Total"],
    )
    total = 0.0
    last: datetime | None = None
    for result in results or []:
        for metric in getattr(result, "metrics", None) or []:
            error_code = getattr(metric, "error_code", None)
            if error_code and str(error_code).lower() != "success":
                raise MetricsUnavailable(
                    f"Azure Monitor returned {error_code} for {REQUESTS_METRIC} of {resource_id}: {getattr(metric, 'error_message', '')}"
                )
            for series in getattr(metric, "timeseries", None) or []:
                for point in getattr(series, "data", None) or []:
                    value = getattr(point, "total", None)
                    if value is None:
                        continue
                    total += float(value)
                    stamp = getattr(point, "timestamp", None)
                    if value > 0 and stamp is not None and (last is None or stamp > last):
                        last = stamp
    return EndpointActivity(requests=round(total), last_request_at=last, source="azure-monitor")
