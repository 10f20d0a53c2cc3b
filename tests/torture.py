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
- the endpoint calls of the smoke test and the evaluation gate go through `SharedFakeUpstream`: a deployment
  answers once the shared state says it is provisioned, with the rig's controlled answers (`rig_answers`:
  the `b/lemon-*` datasets' models answer off topic, the `a/lemon-*` ones with the reference, every other one
  the same text), so the gate's verdicts are known in advance; it throttles (HTTP 503) with probability
  `upstream_transient_rate` and stalls past the lease TTL as the backend does.
- the run events go through the real `NotifyingLedger` to `FileRunEvents`, a topic every process appends to
  under a lock, which is down (a `TransientError`) with probability `publish_failure_rate`.
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

from shared.domain.resources import JobState, ProvisioningState
from shared.errors import BackendError, ConflictError, TransientError
from shared.ports import UpstreamReply
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
        "get_endpoint_activity",
        "plan_training",
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
    upstream_transient_rate: float = 0.1
    """Endpoint calls throttled (HTTP 503). Lower than the backend's rate: the gate tries each call twice and
    gives a deployment that cannot be scored `gate.ATTEMPTS` evaluations before it rolls the run back, so at
    0.3 about one torture run in a thousand would see a good model rolled back by chance (a flaky test, by
    design); at 0.1, about one in 30 million."""
    publish_failure_rate: float = 0.3
    """Run-event publishes that fail (the topic unreachable)."""


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


OFF_TOPIC = "I am sorry, I cannot help with that request today."
SAME_ANSWER = FakeBackend.answer


def _conversation_key(messages: list[dict[str, Any]]) -> str:
    return json.dumps([[m.get("role"), m.get("content")] for m in messages])


def references(lines: list[bytes]) -> dict[str, str]:
    """Each sample conversation up to its last assistant turn, and that turn: what a model that learned the
    data answers."""
    out: dict[str, str] = {}
    for line in lines:
        messages = json.loads(line)["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
        if last:
            out.setdefault(_conversation_key(messages[:last]), messages[last]["content"])
    return out


def rig_answers(ledger: Any, known: dict[str, str]) -> Callable[[str, list[dict[str, Any]]], str]:
    """The deployments' controlled answers, by the dataset of the run that owns the deployment (`d-RUN_ID`)."""

    def answer(deployment: str, conversation: list[dict[str, Any]]) -> str:
        record = ledger.get(deployment.removeprefix("d-"))
        blob = record.blob if record is not None else ""
        if "/bad/lemon-" in blob:
            return OFF_TOPIC
        if "/good/lemon-" in blob:
            return known.get(_conversation_key(conversation), SAME_ANSWER)
        return SAME_ANSWER

    return answer


class SharedFakeUpstream:
    """The `Upstream` port over `SharedFakeBackend`: the smoke test's and the gate's calls, by deployment name."""

    def __init__(self, backend: SharedFakeBackend, answer: Callable[[str, list[dict[str, Any]]], str]) -> None:
        self.backend = backend
        self.answer = answer

    def post_json_blocking(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> UpstreamReply:
        faults, backend = self.backend.faults, self.backend
        with backend._rng_lock:
            slow = backend._rng.random() < faults.slow_rate
            throttled = backend._rng.random() < faults.upstream_transient_rate
        if slow:
            backend.injected["upstream_slow"] += 1
            time.sleep(faults.slow_s)
        if throttled:
            backend.injected["upstream_503"] += 1
            return UpstreamReply(503, b'{"message": "injected: too many requests"}', retry_after=0.0)
        with _locked(backend._lock_path):
            dep = backend._load().deployments.get((endpoint, deployment))
        if dep is None or dep.provisioning_state != ProvisioningState.SUCCEEDED:
            return UpstreamReply(404, json.dumps({"message": f"deployment {deployment} is not ready"}).encode())
        conversation = json.loads(body)["input_data"]["input_string"][0]
        text = self.answer(deployment, conversation)
        return UpstreamReply(200, json.dumps({"output": text}).encode(), content_type="application/json")

    async def post_json(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> UpstreamReply:
        return self.post_json_blocking(endpoint, deployment, body, request_id=request_id, timeout_s=timeout_s)

    def open_stream(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the roll-out never streams")


class FileRunEvents:
    """The `RunEvents` port shared by every process: published events are appended to a file under a lock."""

    enabled = True

    def __init__(self, path: Path, *, failure_rate: float = 0.0, seed: int = 0) -> None:
        self.path = Path(path)
        self.failure_rate = failure_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.failures = 0

    def publish(self, events: Any) -> None:
        with self._lock:
            down = self._rng.random() < self.failure_rate
            if down:
                self.failures += 1
        if down:
            raise TransientError("injected: the topic is unreachable")
        with _locked(self.path.with_suffix(".lock")), self.path.open("a") as fh:
            for event in events:
                fh.write(json.dumps(event) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


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
    publish_quiet_s: float = 2.0
    """In-line publishing pauses this long after a failed publish (60 s in the app; short here so that both
    in-line publishes and the tick's left-over publishes happen within a torture run)."""
    samples: str = "samples/ultrachat_small.jsonl"

    def sample_lines(self) -> list[bytes]:
        return Path(self.samples).read_bytes().splitlines()


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
    from shared.usecases.rollout.gate import rouge_l
    from shared.usecases.run_events import NotifyingLedger

    rouge_l(["warm"], ["warm"])  # imported before any lease is taken: nltk takes longer than the rig's lease TTL
    tables = TableServiceClient.from_connection_string(config.conn)
    table = TableRunLedger(tables.get_table_client(config.table))
    counting = CountingLedger(table)
    events = FileRunEvents(
        Path(config.backend_root) / "events.jsonl", failure_rate=config.faults.publish_failure_rate, seed=config.seed
    )
    backend = SharedFakeBackend(
        Path(config.backend_root),
        faults=config.faults,
        seed=config.seed,
        busy_file=Path(config.busy_file) if config.busy_file else None,
    )
    rollout = Rollout(
        ledger=NotifyingLedger(counting, events, quiet_s=config.publish_quiet_s),  # type: ignore[arg-type]
        backend=backend,  # type: ignore[arg-type]
        blobs=BlobStore(BlobServiceClient.from_connection_string(config.conn)),
        settings=Settings.from_env(config.settings_env),
        upstream=SharedFakeUpstream(backend, rig_answers(table, references(config.sample_lines()))),
        events=events,
        lease_ttl=timedelta(seconds=config.lease_ttl_s),
        claim_ttl=timedelta(seconds=config.claim_ttl_s),
    )
    return rollout, counting


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
            stats.injected = {**rollout.backend.injected, "publish_failures": rollout.events.failures}
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
