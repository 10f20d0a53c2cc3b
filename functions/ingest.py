"""Blob trigger: a dataset dropped into `training-data` is validated, reported and submitted.

Event Grid source (the only one Flex Consumption supports) and an SDK-typed `BlobClient` binding,
so the host never loads the file into memory: the use case streams it.
"""

from __future__ import annotations

import logging

import azure.functions as func
import azurefunctions.extensions.bindings.blob as blob

from shared.bootstrap import app_context, build_token_counter, deferred_costs
from shared.settings import STORAGE_CONNECTION, TRAINING_CONTAINER
from shared.usecases.ingest import ingest_dataset

log = logging.getLogger(__name__)
bp = func.Blueprint()


@bp.function_name("ingest_dataset")
@bp.blob_trigger(
    arg_name="client",
    path=f"{TRAINING_CONTAINER}/{{name}}",
    connection=STORAGE_CONNECTION,
    source=func.BlobSource.EVENT_GRID,
)
def ingest_dataset_blob(client: blob.BlobClient) -> None:
    """Raise on transient errors (the platform retries); invalid data is a recorded, terminal outcome."""
    ctx = app_context()
    outcome = ingest_dataset(
        container=client.container_name,
        name=client.blob_name,
        blobs=ctx.blobs,
        ledger=ctx.ledger,
        backend=ctx.backend,
        settings=ctx.settings,
        token_counter=build_token_counter,
        costs=deferred_costs(ctx),
    )
    log.info(
        "ingest %s/%s: %s (%s)",
        client.container_name,
        client.blob_name,
        outcome.action,
        outcome.reason,
        extra={"run_id": outcome.run_id, "action": outcome.action, "report": outcome.report_url},
    )
