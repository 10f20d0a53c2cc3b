"""Shared fixtures: one real Azurite per test session, fresh containers and tables per test; every test
that needs Azurite is marked `azurite`; no test may leave a thread running."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses the Azurite fixture (directly or through `storage`, `storage_conn`)
    `azurite`, so `-m "not azurite"` never starts Node. Tests that reach Azurite only through
    `request.getfixturevalue` carry the mark themselves (a `pytest.param(..., marks=...)`)."""
    for item in items:
        if "azurite" in getattr(item, "fixturenames", ()) and item.get_closest_marker("azurite") is None:
            item.add_marker(pytest.mark.azurite)


THREAD_GRACE_S = 5.0
"""How long a thread that was told to stop may take to end (a joined pool worker, a server's accept loop)."""

ALLOWED_THREADS: dict[str, str] = {
    "tqdm_monitor": "tqdm's one monitor per process (daemon), started by the first progress bar of the Hub and"
    " datasets downloads; tqdm ends it when its last bar is closed, which those libraries leave to garbage"
    " collection, so it may outlive the test that drew the bar. It only refreshes bars.",
}
"""Library threads that outlive a test by design, by name, each with the reason."""

_THREAD_OWNERS: set[str] = set()
"""Module- and session-scoped fixtures whose set-up started threads (a server, a host). Threads a test
starts through them (a handler per keep-alive connection, an event loop's executor worker) belong to the
fixture: they are checked when the module ends, not after each test."""

_SESSION_THREADS: set[threading.Thread] = set()
_REPORTED: set[threading.Thread] = set()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Iterator[Any]:
    """Note which wider-scoped fixtures start threads (see `_THREAD_OWNERS`)."""
    if fixturedef.scope == "function":
        return (yield)
    before = set(threading.enumerate())
    result = yield
    started = {t for t in threading.enumerate() if t not in before}
    if started:
        _THREAD_OWNERS.add(fixturedef.argname)
        if fixturedef.scope == "session":
            _SESSION_THREADS.update(started)
    return result


def _still_running(threads: list[threading.Thread]) -> list[threading.Thread]:
    """The threads, less allowed ones, that are still alive after a bounded join."""
    watched = [t for t in threads if t.name not in ALLOWED_THREADS and t not in _SESSION_THREADS | _REPORTED]
    deadline = time.monotonic() + THREAD_GRACE_S
    for thread in watched:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [t for t in watched if t.is_alive()]
    _REPORTED.update(alive)  # one failure per leaked thread, not one per later test or module
    return alive


def _describe(threads: list[threading.Thread]) -> str:
    return ", ".join(f"{t.name} (daemon={t.daemon}, target={getattr(t, '_target', None)!r})" for t in threads)


@pytest.fixture(scope="module", autouse=True)
def no_threads_left_by_the_module(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every thread started while this module ran (by its tests or its module-scoped fixtures) has ended
    once its module-scoped fixtures are torn down."""
    before = set(threading.enumerate())
    yield
    alive = _still_running([t for t in threading.enumerate() if t not in before])
    if alive:
        pytest.fail(f"{request.node.nodeid} left {len(alive)} thread(s) running: {_describe(alive)}", pytrace=False)


@pytest.fixture(autouse=True)
def no_threads_left_by_the_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a thread it started running, daemon or not: a leaked poller, server or
    pool keeps working in the next test, holds ports and files, and makes the next failure unexplainable.
    Threads of the wider-scoped fixtures the test uses are left to the module's check."""
    before = set(threading.enumerate())
    yield
    if any(name in _THREAD_OWNERS for name in request.fixturenames):
        return
    alive = _still_running([t for t in threading.enumerate() if t not in before])
    if alive:
        pytest.fail(f"{request.node.nodeid} left {len(alive)} thread(s) running: {_describe(alive)}", pytrace=False)
