"""Small helpers shared by test modules."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from shared.settings import TRAINING_CONTAINER
from shared.usecases.ingest import IngestOutcome, ingest_dataset

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | None], *, timeout_s: float = 10.0, what: str = "the condition", interval_s: float = 0.02
) -> T:
    """Poll `predicate` until it returns something truthy, and return that. Background work (a poller, a
    timer, a server thread) has no callback a test can join, so the test polls, with a deadline that
    fails loudly instead of hanging. An exception from `predicate` propagates at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last value: {value!r})")
        time.sleep(interval_s)


INGEST_PORTS = ("blobs", "ledger", "backend", "settings")


def upload_and_ingest(ports: Any, name: str, data: bytes, **overrides: Any) -> IngestOutcome:
    """Upload `data` as `training-data/<name>` and ingest it as the blob trigger would; returns the outcome.
    `ports` holds the blob store, ledger, backend and settings as keys (a test's dict) or attributes (an
    AppContext, a test's world object); `overrides` replace any of them or pass ingest's other arguments."""
    pick = ports.__getitem__ if isinstance(ports, Mapping) else ports.__getattribute__
    kwargs = {port: pick(port) for port in INGEST_PORTS if port not in overrides} | overrides
    kwargs["blobs"].upload(TRAINING_CONTAINER, name, data)
    return ingest_dataset(container=TRAINING_CONTAINER, name=name, **kwargs)
