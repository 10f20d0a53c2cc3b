"""Shared fixtures: one real Azurite per test session, fresh containers and tables per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "samples"


@pytest.fixture(scope="session")
def azurite() -> Iterator[object]:
    """A real Azurite on free loopback ports for the whole session, stopped by PID at the end."""
    from tunegrid.azurite import run_azurite

    with run_azurite() as instance:
        yield instance


@pytest.fixture
def storage_conn(azurite: object) -> str:
    return azurite.connection_string  # type: ignore[attr-defined]


@pytest.fixture
def storage(storage_conn: str) -> object:
    """Storage clients with the app's containers and tables created (Azurite is shared, names are fixed)."""
    from shared.adapters.storage import StorageClients

    clients = StorageClients.from_connection({"": storage_conn})
    clients.ensure_resources()
    return clients


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]
