"""The torture rig of tests/test_torture.py: workers (threads and processes) that ingest, handle run events
and tick against one Azurite ledger and blob store and one fake backend shared by every process.

Processes cannot share the in-memory fakes, so:
- the ledger and the blobs are the real adapters (`TableRunLedger`, `BlobStore`) on Azurite, a table of
  their own per torture run;
- the backend is `SharedFakeBackend`: the state of a `tests.fakes.FakeBackend` kept in a file, loaded,
  changed and saved under an exclusive `flock` for every call, so every worker in every process sees one
  backend, as every Function App instance sees one Azure ML workspace. Faults are injected outside the
  lock, before the call acts (as Azure fails a call before doing anything): a transient error with
  probability `transient_rate`, a stall longer than the lease TTL with probability `slow_rate`, and a
  non-transient refusal (no quota) for every deployment on an endpoint whose name starts with `poison`.
  A journal (JSON lines, written under the same lock) keeps the calls the invariants are checked on.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pickle
import random
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from shared.domain.resources import JobState
from shared.errors import BackendError, ConflictError, TransientError
from tests.fakes import FakeBackend

PORT_METHODS = frozenset(
    {
        "check_finetune",
        "submit_finetune",
        "get_job",
        "cancel_job",
        "get_job_metrics",
        "register_model",
        "get_model",
        "list_endpoints",
        "get_endpoint",
        "begin_create_endpoint",
        "begin_create_deployment",
        "get_deployment",
        "begin_set_traffic",
        "begin_delete_deployment",
        "begin_delete_endpoint",
        "get_credentials",
        "invoke",
        "get_endpoint_activity",
    }
)
STATE_FIELDS = (
    "jobs",
    "models",
    "endpoints",
    "deployments",
    "pending",
    "calls",
    "failing_deployments",
    "mute_deployments",
)


@dataclass(frozen=True)
class Faults:
    """What goes wrong, and how often."""

    transient_rate: float = 0.3
    slow_rate: float = 0.02
    slow_s: float = 1.5
    every_call_s: float = 0.0
    """A delay on every call (the worker that gets killed mid-step spends its time inside calls)."""
    late_after_s: float = 1.0
    """A call that acts this long after it was made (a stall, or a queue for the backend's lock) is marked
    `stalled` in the journal: it may act on a lease that has lapsed meanwhile (set to the lease TTL)."""
    refuse_prefix: str = "poison"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class SharedFakeBackend:
    """The `FineTuneBackend` port over a `FakeBackend` whose state every process shares through a file."""

    def __init__(self, root: Path, *, faults: Faults = Faults(), seed: int = 0, busy_file: Path | None = None) -> None:
        self.root = Path(root)
        self.faults = faults
        self.busy_file = busy_file
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.injected: Counter[str] = Counter()

    @classmethod
    def create(cls, root: Path) -> SharedFakeBackend:
        root.mkdir(parents=True, exist_ok=True)
        backend = cls(root)
        with _locked(backend._lock_path):
            backend._save(FakeBackend())
        (root / "journal.jsonl").write_text("")
        return backend

    @property
    def _lock_path(self) -> Path:
        return self.root / "state.lock"

    def _load(self) -> FakeBackend:
        fake = FakeBackend()
        with (self.root / "state.pickle").open("rb") as fh:
            for name, value in pickle.load(fh).items():
                setattr(fake, name, value)
        return fake

    def _save(self, fake: FakeBackend) -> None:
        tmp = self.root / f"state.{os.getpid()}.{threading.get_ident()}.tmp"
        with tmp.open("wb") as fh:
            pickle.dump({name: getattr(fake, name) for name in STATE_FIELDS}, fh)
        tmp.replace(self.root / "state.pickle")  # atomic: a worker killed mid-write leaves the old state

    def _journal(self, entry: dict[str, Any]) -> None:
        with (self.root / "journal.jsonl").open("a") as fh:
            fh.write(json.dumps({**entry, "pid": os.getpid(), "t": time.time()}) + "\n")

    def _inject(self, method: str, args: tuple[Any, ...]) -> bool:
        """Delay, refuse or fail the call before it acts; True when it was stalled past the lease TTL."""
        with self._rng_lock:
            slow = self._rng.random() < self.faults.slow_rate
            transient = self._rng.random() < self.faults.transient_rate
        delay = self.faults.every_call_s + (self.faults.slow_s if slow else 0.0)
        if delay:
            if slow:
                self.injected["slow"] += 1
            time.sleep(delay)
        if method == "begin_create_deployment" and args[0].endpoint.startswith(self.faults.refuse_prefix):
            raise BackendError("quota exceeded: 0 of 24 cores of Standard_NC24ads_A100_v4 left in this region")
        if transient:
            self.injected["transient"] += 1
            raise TransientError(f"injected transient failure in {method}")
        return slow

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        busy = self.busy_file
        if busy is not None:
            busy.write_text(str(os.getpid()))
        made = time.monotonic()
        try:
            stalled = self._inject(method, args)
            with _locked(self._lock_path):
                fake = self._load()
                entry = self._entry(fake, method, args, kwargs)
                if entry is not None:
                    entry["stalled"] = stalled or time.monotonic() - made > self.faults.late_after_s
                try:
                    result = getattr(fake, method)(*args, **kwargs)
                finally:
                    self._save(fake)
                    if entry is not None:
                        self._journal(entry)
            return result
        finally:
            if busy is not None:
                with contextlib.suppress(FileNotFoundError):
                    busy.unlink()

    @staticmethod
    def _entry(fake: FakeBackend, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
        if method == "begin_set_traffic":
            return {"m": method, "endpoint": args[0], "traffic": dict(args[1])}
        if method == "begin_delete_deployment":
            endpoint, name = args
            ep = fake.endpoints.get(endpoint)
            traffic = ep.traffic.get(name, 0) if ep is not None else 0
            return {"m": method, "endpoint": endpoint, "deployment": name, "traffic": traffic}
        if method == "register_model":
            return {"m": method, "name": kwargs["name"], "version": kwargs["version"]}
        if method == "begin_create_deployment":
            return {"m": method, "endpoint": args[0].endpoint, "deployment": args[0].name}
        if method in ("submit_finetune", "cancel_job"):
            return {"m": method, "job": args[0].job_name if method == "submit_finetune" else args[0]}
        return None

    def __getattr__(self, name: str) -> Any:
        if name not in PORT_METHODS:
            raise AttributeError(name)
        return lambda *args, **kwargs: self.call(name, *args, **kwargs)

    # ---- the orchestrator's hands on the backend (no faults) ----

    def snapshot(self) -> FakeBackend:
        with _locked(self._lock_path):
            return self._load()

    def set_jobs(self, states: dict[str, JobState]) -> None:
        with _locked(self._lock_path):
            fake = self._load()
            for job, state in states.items():
                fake.set_job(job, state)
            self._save(fake)

    def journal(self) -> list[dict[str, Any]]:
        lines = (self.root / "journal.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


class CountingLedger:
    """A ledger that counts the conditional writes it lost (`ConflictError`)."""

    WRITES = frozenset({"create", "update", "transition", "put_endpoint_lease", "put_dataset_head"})

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.conflicts = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self.WRITES:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except ConflictError:
                with self._lock:
                    self.conflicts += 1
                raise

        return counted


@dataclass(frozen=True)
class WorkerConfig:
    conn: str
    table: str
    backend_root: str
    settings_env: dict[str, str]
    lease_ttl_s: float
    claim_ttl_s: float
    faults: Faults
    seed: int
    busy_file: str | None = None


@dataclass
class WorkerStats:
    name: str
    tasks: int = 0
    conflicts: int = 0
    injected: dict[str, int] = field(default_factory=dict)


def _ports(config: WorkerConfig) -> tuple[Any, Any]:
    from azure.data.tables import TableServiceClient
    from azure.storage.blob import BlobServiceClient

    from shared.adapters.storage import BlobStore
    from shared.adapters.tables import TableRunLedger
    from shared.settings import Settings
    from shared.usecases.rollout import Rollout

    tables = TableServiceClient.from_connection_string(config.conn)
    ledger = CountingLedger(TableRunLedger(tables.get_table_client(config.table)))
    backend = SharedFakeBackend(
        Path(config.backend_root),
        faults=config.faults,
        seed=config.seed,
        busy_file=Path(config.busy_file) if config.busy_file else None,
    )
    rollout = Rollout(
        ledger=ledger,  # type: ignore[arg-type]
        backend=backend,  # type: ignore[arg-type]
        blobs=BlobStore(BlobServiceClient.from_connection_string(config.conn)),
        settings=Settings.from_env(config.settings_env),
        lease_ttl=timedelta(seconds=config.lease_ttl_s),
        claim_ttl=timedelta(seconds=config.claim_ttl_s),
    )
    return rollout, ledger


def run_worker(config: WorkerConfig, tasks: Any, results: Any, name: str) -> None:
    """Take tasks until told to stop; put one result per task. Used by threads and by processes."""
    from shared.usecases.ingest import ingest_dataset
    from shared.usecases.rollout import receive_run_event, tick

    rollout, ledger = _ports(config)
    stats = WorkerStats(name)
    handlers: dict[str, Callable[..., Any]] = {}

    def do_ingest(container: str, blob: str) -> tuple[Any, ...]:
        outcome = ingest_dataset(
            container=container,
            name=blob,
            blobs=rollout.blobs,
            ledger=rollout.ledger,
            backend=rollout.backend,
            settings=rollout.settings,
            claim_ttl=rollout.claim_ttl,
        )
        return ("ingest", blob, outcome.action, outcome.run_id)

    def do_event(event: dict[str, Any]) -> tuple[Any, ...]:
        outcome = receive_run_event(
            event_id=event["id"],
            event_type=event["eventType"],
            subject=event["subject"],
            data=event["data"],
            rollout=rollout,
        )
        return ("event", outcome.action)

    def do_tick(round_no: int) -> tuple[Any, ...]:
        started = time.time()
        report = tick(rollout)
        return (
            "tick",
            {
                "round": round_no,
                "started": started,
                "ended": time.time(),
                "attempted": report.attempted,
                "failed": report.failed,
                "moved": [(r.run_id, r.state.value) for r in report.moved],
            },
        )

    handlers.update(ingest=do_ingest, event=do_event, tick=do_tick)
    while True:
        task_id, task = tasks.get()
        if task[0] == "stop":
            stats.conflicts = ledger.conflicts
            stats.injected = dict(rollout.backend.injected)
            results.put((task_id, name, ("stopped", asdict(stats))))
            return
        results.put((task_id, name, ("start",)))
        stats.tasks += 1
        try:
            outcome = handlers[task[0]](*task[1:])
        except (TransientError, OSError) as exc:
            outcome = ("retry", task, f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            outcome = ("crash", task, "".join(traceback.format_exception(exc)))
        results.put((task_id, name, outcome))


def process_main(config: WorkerConfig, tasks: Any, results: Any, name: str) -> None:
    """A worker process: the same loop, its log quiet (each fault is expected and counted)."""
    logging.getLogger().setLevel(logging.CRITICAL)
    run_worker(config, tasks, results, name)
