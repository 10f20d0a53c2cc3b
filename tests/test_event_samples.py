"""Event Grid's published sample events, parsed the way the app's triggers parse them.

Captures (tests/data/azure-reference/event-samples, see its README):
- `eventgrid-ml-RunCompleted.json`, `eventgrid-ml-RunStatusChanged.json`: Azure ML run events (the
  second derived by the README's authors from the first: envelope renamed, `runStatus` added), read by
  the `job_events` trigger through `shared.domain.events.parse_run_event`;
- `eventgrid-storage-BlobCreated.json`, `eventgrid-storage-BlobCreated-datalake-gen2.json` (Event Grid
  schema) and `cloudevents-storage-BlobCreated-datalake-gen2.json` (CloudEvents schema): what the
  Functions host's Event Grid blob trigger receives. The host turns the event's `data.url` into the
  `BlobClient` the `ingest_dataset` function is given (the blob extension; not our code), so the test
  derives the container and name the same way and hands them to the ingest use case.
"""

from __future__ import annotations

from typing import Any

import azure.functions as func
import pytest
from azure.core.messaging import CloudEvent
from azure.eventgrid import EventGridEvent
from azure.storage.blob import BlobClient

from shared.domain.events import RUN_COMPLETED, RUN_STATUS_CHANGED, parse_run_event
from shared.domain.resources import JobState
from shared.settings import Settings
from shared.usecases.ingest import ingest_dataset
from shared.usecases.rollout import Rollout, handle_run_event
from tests import azure_reference as ref
from tests.fakes import FakeBackend, FakeUpstream

SAMPLE_RUN_ID = "AutoML_ad912b2d-6467-4f32-a616-dbe4af6dd8fc_5"


def _as_the_worker_gives_it(event: dict[str, Any]) -> func.EventGridEvent:
    """The trigger's argument, as the Python worker builds it from an Event Grid schema event."""
    return func.EventGridEvent(
        id=event["id"],
        data=event["data"],
        topic=event["topic"],
        subject=event["subject"],
        event_type=event["eventType"],
        event_time=None,
        data_version=event["dataVersion"],
    )


@pytest.mark.parametrize(
    ("filename", "event_type", "status", "state"),
    [
        ("eventgrid-ml-RunCompleted.json", RUN_COMPLETED, "Completed", JobState.COMPLETED),
        ("eventgrid-ml-RunStatusChanged.json", RUN_STATUS_CHANGED, "failed", JobState.FAILED),
    ],
)
def test_azure_ml_run_events_parse(filename: str, event_type: str, status: str, state: JobState) -> None:
    """The samples parse with azure-eventgrid and with our parser, as `job_events` calls it: the run id,
    its (lower-case) status, a null runType and empty runTags (so not a run of ours)."""
    [raw] = ref.event_samples(filename)
    sdk = EventGridEvent.from_dict(raw)
    assert (sdk.event_type, sdk.subject) == (
        event_type,
        f"experiments/0fa9dfaa-cba3-4fa7-b590-23e48548f5c1/runs/{SAMPLE_RUN_ID}",
    )
    event = _as_the_worker_gives_it(raw)
    parsed = parse_run_event(
        event_id=event.id, event_type=event.event_type, subject=event.subject, data=event.get_json()
    )
    assert parsed is not None
    assert (parsed.event_type, parsed.run_id, parsed.run_status, parsed.state) == (
        event_type,
        SAMPLE_RUN_ID,
        status,
        state,
    )
    assert (parsed.run_type, parsed.experiment_name, parsed.run_tags) == ("", "automl-local-regression", {})
    assert parsed.our_run_id is None and not parsed.is_child_step


class _EmptyLedger:
    def get(self, run_id: str) -> None:
        return None

    def find_by_job(self, job_name: str) -> None:
        return None


def test_a_sample_run_event_is_a_foreign_run_to_the_rollout() -> None:
    """The rollout ignores the sample's run: no tag of ours and no job of that name in the ledger."""
    [raw] = ref.event_samples("eventgrid-ml-RunCompleted.json")
    parsed = parse_run_event(event_id=raw["id"], event_type=raw["eventType"], subject=raw["subject"], data=raw["data"])
    assert parsed is not None
    backend = FakeBackend()
    rollout = Rollout(
        ledger=_EmptyLedger(),
        backend=backend,
        blobs=None,
        settings=Settings.from_env({}),
        upstream=FakeUpstream(backend),
    )  # type: ignore[arg-type]
    outcome = handle_run_event(parsed, rollout)
    assert (outcome.action, outcome.reason) == ("ignored", "foreign run")


@pytest.mark.parametrize(
    ("filename", "schema", "container", "name"),
    [
        ("eventgrid-storage-BlobCreated.json", "eventgrid", "testcontainer", "new-file.txt"),
        ("eventgrid-storage-BlobCreated-datalake-gen2.json", "eventgrid", "my-file-system", "new-file.txt"),
        ("cloudevents-storage-BlobCreated-datalake-gen2.json", "cloudevents", "my-file-system", "new-file.txt"),
    ],
)
def test_blob_created_in_both_schemas_gives_the_blob_ingest_is_called_with(
    filename: str, schema: str, container: str, name: str
) -> None:
    """Both schemas parse (azure-eventgrid / azure-core's CloudEvent); the blob's URL gives the container
    and name the trigger function passes on; ingest ignores this one (not a .jsonl) without any I/O."""
    [raw] = ref.event_samples(filename)
    data: Any
    if schema == "eventgrid":
        event = EventGridEvent.from_dict(raw)
        event_type, data = event.event_type, event.data
    else:
        cloud: CloudEvent[Any] = CloudEvent.from_dict(raw)
        event_type, data = cloud.type, cloud.data
    assert event_type == "Microsoft.Storage.BlobCreated"
    assert isinstance(data, dict) and data["blobType"] == "BlockBlob"
    client = BlobClient.from_blob_url(data["url"])
    assert (client.container_name, client.blob_name) == (container, name)

    class NoStorage:
        def __getattr__(self, attr: str) -> Any:
            raise AssertionError(f"ingest touched storage ({attr}) for a blob it ignores")

    outcome = ingest_dataset(
        container=client.container_name,
        name=client.blob_name,
        blobs=NoStorage(),
        ledger=NoStorage(),
        backend=FakeBackend(),
        settings=Settings.from_env({}),
    )
    assert (outcome.action, outcome.reason) == ("ignored", "not a .jsonl file")
