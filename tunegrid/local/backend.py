"""`LocalBackend`: the whole `FineTuneBackend` port on this machine, for the demo, CI and a GPU box.

- Jobs: `submit_finetune` copies the train/test/validation blobs into `jobs/<name>/data/` and starts
  the job supervisor (its own OS process and session), which runs the trainer. Status, cancel,
  failure reasons and logs come from files, so a restarted app sees the same jobs; a job whose
  process died without a final status is marked Failed.
- Registry: the trainer already logged the merged model to MLflow (the job's output,
  `jobs/<name>/outputs/trained_model`, is that MLflow model folder); `register_model` only adds a
  registry entry, so it takes well under a second.
- Endpoints: see `endpoints.py`. Events: see `events.py`.

No method waits on training or provisioning. Heavy imports (torch, transformers, mlflow) happen only
in the child processes, except mlflow for the registry and metrics calls.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from shared.domain.clock import iso, utcnow
from shared.domain.clock import parse_time as parse_iso
from shared.domain.costs import TrainingPlan
from shared.domain.resources import (
    DataRef,
    DeploymentInfo,
    DeploymentSpec,
    EndpointActivity,
    EndpointCredentials,
    EndpointInfo,
    Finding,
    FindingLevel,
    FineTuneRequest,
    JobRef,
    JobStatus,
    MetricPoint,
    ModelRef,
    Operation,
    job_state_from_run_status,
)
from shared.domain.sidecar import LOCAL_BUILTIN_MODELS, local_model_problem
from shared.errors import BackendError, ConfigError, ConflictError, InvalidInput, NotFound, TransientError
from tunegrid.local.base_models import SMOLLM2, cache_root
from tunegrid.local.endpoints import LocalEndpoints
from tunegrid.local.events import DeliveryResult, Outbox
from tunegrid.local.jobs import CANCELED, FAILED, NOT_STARTED, TERMINAL, JobFiles
from tunegrid.local.params import resolve_train_config
from tunegrid.local.tracking import JOB_TAG, PATH_TAG, Tracking, uri_to_path
from tunegrid.local.workspace import file_lock, read_json, spawn, tail_lines, write_json_atomic

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)

DataFetcher = Callable[[DataRef, Path], None]
"""Copies one prepared dataset file to a local path (streamed)."""

_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
_AZUREML_OUTPUT = re.compile(r"^azureml://jobs/(?P<job>[^/]+)/outputs/(?P<output>[^/]+)/?$")
NEVER_STARTED_AFTER_S = 60.0
CANCEL_SETTLE_S = 0.5
OUTBOX_RETRY_MAX_S = 60.0


def fetch_local_file(ref: DataRef, dest: Path) -> None:
    """The constructor's default fetcher: `file://` URLs and plain local paths only."""
    parsed = urlparse(ref.url)
    if parsed.scheme == "file":
        source = Path(unquote(parsed.path))
    elif parsed.scheme == "" and ref.url:
        source = Path(ref.url)
    else:
        raise ConfigError(
            f"no blob fetcher configured for {ref.url!r}: pass fetch_data, or use LocalBackend.from_settings"
        )
    with source.open("rb") as src, dest.open("wb") as out:
        shutil.copyfileobj(src, out, 1024 * 1024)


def local_device() -> str:
    """The device the trainer will pick (`trainer.pick_device`: CUDA when torch sees a GPU), told without
    importing torch in the app's process: an NVIDIA driver listing a GPU, not hidden by CUDA_VISIBLE_DEVICES."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return "cpu"
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        return "cuda" if gpus.is_dir() and any(gpus.iterdir()) else "cpu"
    except OSError:
        return "cpu"


def blob_fetcher(storage_connection: Mapping[str, str]) -> DataFetcher:
    """Streams blobs of our storage account (Azurite locally); `file://` URLs still work."""
    store: Any = None

    def fetch(ref: DataRef, dest: Path) -> None:
        nonlocal store
        if urlparse(ref.url).scheme == "file":
            fetch_local_file(ref, dest)
            return
        if store is None:
            from shared.adapters.storage import BlobStore, StorageClients

            store = BlobStore(StorageClients.from_connection(storage_connection).blobs)
        with dest.open("wb") as out:
            for chunk in store.chunks(ref.container, ref.blob):
                out.write(chunk)

    return fetch


class LocalBackend:
    """The embedded backend. State lives under `workspace`; see the module docstring."""

    name = "local"

    def __init__(
        self,
        workspace: Path | str,
        *,
        base_model: str = SMOLLM2,
        webhook_url: str | None = None,
        event_key: str = "",
        fetch_data: DataFetcher = fetch_local_file,
        instance: str = "tunegrid",
        experiment_name: str = "tunegrid-local",
        model_cache_dir: Path | str | None = None,
        max_eval_rows: int = 8,
        redeliver_for_s: float = 300.0,
        model_roots: tuple[str, ...] = (),
    ) -> None:
        self.workspace = Path(workspace).expanduser().resolve()
        self.model_roots = model_roots
        """LOCAL_MODEL_ROOTS: the folders a request's `local_model` may name a folder under."""
        self.base_model = base_model
        self.instance = instance
        self.experiment_name = experiment_name
        self.model_cache_dir = cache_root(model_cache_dir)
        self.max_eval_rows = max_eval_rows
        self.redeliver_for_s = redeliver_for_s
        self._fetch_data = fetch_data
        self._event_key = event_key
        self.outbox = Outbox(self.workspace / "outbox", webhook_url=webhook_url, key=event_key)
        self.tracking = Tracking.for_workspace(self.workspace)
        self.endpoints = LocalEndpoints(self.workspace / "endpoints", resolve_model=self._model_path)
        self._delivery_lock = threading.Lock()
        self._delivery_thread: threading.Thread | None = None
        self._next_delivery = 0.0
        self._delivery_backoff = 1.0
        (self.workspace / "jobs").mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalBackend:
        return cls(
            settings.local_workspace_dir,
            base_model=settings.local_base_model or SMOLLM2,
            webhook_url=settings.local_event_webhook_url or None,
            event_key=settings.local_event_key,
            fetch_data=blob_fetcher(settings.storage_connection),
            instance=settings.instance,
            # AZUREML_EXPERIMENT_NAME's `{model}` is the base model's name, here the local one.
            experiment_name=settings.experiment_name.replace("{model}", settings.local_base_model or SMOLLM2)
            or "tunegrid-local",
            model_cache_dir=settings.local_model_cache_dir or None,
            max_eval_rows=settings.local_max_eval_rows,
            model_roots=settings.local_model_roots,
        )

    def __repr__(self) -> str:
        return f"LocalBackend(workspace={str(self.workspace)!r}, base_model={self.base_model!r})"

    # --- events --------------------------------------------------------------------------------

    def deliver_events(self) -> DeliveryResult:
        """Deliver the outbox now, in this thread (the CLI and tests use it)."""
        return self.outbox.deliver()

    def _kick_outbox(self) -> None:
        """Redeliver pending events in a background thread, with backoff; never blocks the caller."""
        if not self.outbox.webhook_url or time.monotonic() < self._next_delivery:
            return
        if not self.outbox.pending_files():
            return
        with self._delivery_lock:
            if self._delivery_thread is not None and self._delivery_thread.is_alive():
                return

            def run() -> None:
                result = self.outbox.deliver()
                if result.pending and not result.busy:
                    self._next_delivery = time.monotonic() + self._delivery_backoff
                    self._delivery_backoff = min(self._delivery_backoff * 2, OUTBOX_RETRY_MAX_S)
                else:
                    self._delivery_backoff = 1.0

            self._delivery_thread = threading.Thread(target=run, name="tunegrid-outbox", daemon=True)
            self._delivery_thread.start()

    # --- jobs ----------------------------------------------------------------------------------

    def _job(self, name: str) -> JobFiles:
        if not _JOB_NAME.match(name) or ".." in name:
            raise InvalidInput(f"job name {name!r}: letters, digits, '-', '_' and '.', at most 255 characters")
        return JobFiles(self.workspace / "jobs" / name)

    def job_dir(self, job_name: str) -> Path:
        return self._job(job_name).dir

    def check_finetune(self, request: FineTuneRequest) -> list[Finding]:
        """The local trainer's own check of the parameters (its choices, not a component's), and of the base
        model folder the request names."""
        findings = []
        try:
            resolve_train_config(request.params)
        except InvalidInput as exc:
            findings.append(Finding(FindingLevel.ERROR, "invalid_parameter", str(exc)))
        refused = self._local_model_problem(request.local_model)
        if refused is not None:
            findings.append(Finding(FindingLevel.ERROR, "invalid_local_model", refused))
        return findings

    def _local_model_problem(self, local_model: str | None) -> str | None:
        """Ingest checked the text (`shared.domain.sidecar.local_model_problem`); here the folder itself is
        checked once symlinks are resolved, so a link under a root cannot lead out of it."""
        if not local_model:
            return None
        refused = local_model_problem(local_model, self.model_roots)
        if refused is not None or local_model.strip().lower() in LOCAL_BUILTIN_MODELS:
            return refused
        real = Path(local_model).resolve()
        if not any(
            real.is_relative_to(Path(root).resolve()) and real != Path(root).resolve() for root in self.model_roots
        ):
            return f"local_model: {local_model!r} resolves to {str(real)!r}, outside LOCAL_MODEL_ROOTS"
        if not real.is_dir():
            return f"local_model: {local_model!r} is not a folder"
        return None

    def plan_training(self, request: FineTuneRequest) -> TrainingPlan:
        """This machine and the local trainer's resolved parameters: the estimate is a time, not money."""
        config = resolve_train_config(request.params)
        return TrainingPlan(
            backend=self.name,
            sku=f"local-{local_device()}",
            epochs=float(config.num_train_epochs),
            max_steps=config.max_steps,
            rows_per_step=config.per_device_train_batch_size * config.gradient_accumulation_steps,
            max_seq_length=config.max_seq_length,
            priced=False,
        )

    def submit_finetune(self, request: FineTuneRequest) -> JobRef:
        """Copy the data, start the job process, return. The same job name again returns the same job."""
        self._kick_outbox()
        files = self._job(request.job_name)
        resolve_train_config(request.params)  # bad parameters fail here, before anything starts
        refused = self._local_model_problem(request.local_model)
        if refused is not None:
            raise InvalidInput(refused)
        model = request.local_model or self.base_model
        with file_lock(self.workspace / "jobs" / f".{request.job_name}.submit.lock"):
            if files.state() is not None:
                log.info("job %s already submitted", request.job_name, extra={"run_id": request.run_id})
                return self._job_ref(files)
            shutil.rmtree(files.dir, ignore_errors=True)  # a submit that died half-way
            files.data_dir.mkdir(parents=True)
            try:
                data = {
                    "train": self._copy(request.train, files.data_dir / "train.jsonl"),
                    "test": self._copy(request.test, files.data_dir / "test.jsonl"),
                }
                if request.validation is not None:
                    data["validation"] = self._copy(request.validation, files.data_dir / "validation.jsonl")
            except BaseException:
                shutil.rmtree(files.dir, ignore_errors=True)
                raise
            write_json_atomic(
                files.job_file,
                {
                    "job_name": request.job_name,
                    "run_id": request.run_id,
                    "dataset": request.dataset,
                    "model": model,
                    "params": dict(request.params),
                    "tags": dict(request.tags),
                    "data": data,
                    "cache_dir": str(self.model_cache_dir),
                    "tracking_dir": str(self.tracking.root),
                    "experiment_name": self.experiment_name,
                    "outbox_dir": str(self.outbox.directory),
                    "webhook_url": self.outbox.webhook_url,
                    "max_eval_rows": self.max_eval_rows,
                    "redeliver_for_s": self.redeliver_for_s,
                },
            )
            now = iso(utcnow())
            state = {
                "name": request.job_name,
                "run_id": request.run_id,
                "status": NOT_STARTED,
                "error": None,
                "tags": {k: str(v) for k, v in request.tags.items()},
                "experiment_name": self.experiment_name,
                "model": model,
                "created_at": now,
                "updated_at": now,
                "history": [{"status": NOT_STARTED, "at": now}],
            }
            write_json_atomic(files.state_file, state)
            self.outbox.put(files.events(state))
            if not self.tracking.exists():
                # Creating MLflow's database takes seconds: do it while the trainer imports torch.
                spawn(
                    "tunegrid.local.tracking",
                    [str(self.tracking.root)],
                    log_path=self.workspace / "mlflow-init.log",
                )
            handle = spawn(
                "tunegrid.local.supervisor",
                [str(files.dir)],
                log_path=files.log_file,
                env={"TUNEGRID_EVENT_KEY": self._event_key},
            )
            files.update(supervisor=handle.to_dict())
        log.info(
            "job %s submitted (model %s, pid %d)", request.job_name, model, handle.pid, extra={"run_id": request.run_id}
        )
        return self._job_ref(files)

    def _copy(self, ref: DataRef, dest: Path) -> str:
        try:
            self._fetch_data(ref, dest)
        except (ConfigError, InvalidInput):
            raise
        except FileNotFoundError as exc:
            raise InvalidInput(f"dataset file {ref.container}/{ref.blob} not found ({ref.url})") from exc
        except Exception as exc:
            if type(exc).__name__ == "ResourceNotFoundError":
                raise InvalidInput(f"dataset blob {ref.container}/{ref.blob} not found") from exc
            raise TransientError(f"could not copy {ref.container}/{ref.blob}: {type(exc).__name__}: {exc}") from exc
        return str(dest)

    def _job_ref(self, files: JobFiles) -> JobRef:
        state = files.state() or {}
        return JobRef(
            name=files.name, studio_url=files.dir.as_uri(), display_name=files.name, base_model_id=state.get("model")
        )

    def _check_process(self, files: JobFiles, state: dict[str, Any]) -> dict[str, Any]:
        """A job whose process is gone without a final status failed (or was canceled)."""
        if state.get("status") in TERMINAL:
            return state
        supervisor = files.supervisor()
        if supervisor is not None and supervisor.alive():
            return state
        if supervisor is None:
            created = parse_iso(state.get("created_at"))
            if created is None or (utcnow() - created).total_seconds() < NEVER_STARTED_AFTER_S:
                return state  # submit is still starting it
        trainer = files.trainer()
        if trainer is not None and trainer.alive():
            trainer.stop(grace_s=1.0, group=False)
        if state.get("cancel_requested"):
            files.transition(self.outbox, CANCELED)
        else:
            fallback = "the job process exited without a final status (killed, or the machine restarted)"
            files.transition(
                self.outbox,
                FAILED,
                error=files.failure_reason(fallback=fallback) if supervisor else "the job process was never started",
            )
        self._kick_outbox()
        return files.state() or state

    def get_job(self, job_name: str) -> JobStatus | None:
        self._kick_outbox()
        files = self._job(job_name)
        state = files.state()
        if state is None:
            return None
        state = self._check_process(files, state)
        raw = str(state.get("status") or NOT_STARTED)
        if state.get("cancel_requested") and raw not in TERMINAL:
            raw = "CancelRequested"
        return JobStatus(
            name=job_name,
            state=job_state_from_run_status(raw),
            raw_status=raw,
            error=state.get("error"),
            studio_url=files.dir.as_uri(),
            tags=dict(state.get("tags") or {}),
        )

    def cancel_job(self, job_name: str) -> Operation:
        """Ask the job process to stop (SIGTERM); it records Canceled. Idempotent."""
        self._kick_outbox()
        files = self._job(job_name)
        state = files.state()
        if state is None:
            raise NotFound(f"job {job_name} does not exist")
        if state.get("status") in TERMINAL:
            return Operation("cancel_job", job_name, status=str(state["status"]), done=True)
        files.update(cancel_requested=True)
        supervisor = files.supervisor()
        if supervisor is not None:
            supervisor.signal(signal.SIGTERM)
        deadline = time.monotonic() + CANCEL_SETTLE_S
        while time.monotonic() < deadline:
            state = self._check_process(files, files.state() or {})
            if state.get("status") in TERMINAL:
                return Operation("cancel_job", job_name, status=str(state["status"]), done=True)
            time.sleep(0.05)
        log.info("job %s: cancel requested", job_name)
        return Operation("cancel_job", job_name, status="CancelRequested")

    def get_job_metrics(self, job_name: str) -> dict[str, list[MetricPoint]]:
        """Every metric the trainer logged to MLflow, as step-ordered points ({} before it starts)."""
        self._kick_outbox()
        files = self._job(job_name)
        if files.state() is None:
            raise NotFound(f"job {job_name} does not exist")
        run = read_json(files.run_file)
        if not run or not self.tracking.exists():
            return {}
        history = self.tracking.metric_history(run["mlflow_run_id"])
        return {key: [MetricPoint(step=s, value=v) for s, v in points] for key, points in history.items()}

    def job_log(self, job_name: str, *, lines: int = 50) -> list[str]:
        """The last lines of the job's log (supervisor and trainer output, progress lines)."""
        return tail_lines(self._job(job_name).log_file, count=lines)

    def job_progress(self, job_name: str) -> dict[str, Any] | None:
        """The trainer's latest progress: step, total, loss, tokens_per_s, eta_s."""
        return read_json(self._job(job_name).progress_file)

    def job_output(self, uri: str) -> Path:
        """The local folder of `azureml://jobs/{job}/outputs/{output}` (output `trained_model`)."""
        match = _AZUREML_OUTPUT.match(uri)
        if not match:
            raise InvalidInput(f"not a job output URI: {uri!r} (expected azureml://jobs/JOB/outputs/trained_model)")
        if match["output"] != "trained_model":
            raise NotFound(f"job output {match['output']!r} does not exist locally (only trained_model)")
        path = self._job(match["job"]).trained_model
        if not path.exists():
            raise NotFound(f"job {match['job']} has no trained_model output (not completed?)")
        return path.resolve()

    # --- registry ------------------------------------------------------------------------------

    def register_model(
        self, *, job_name: str, name: str, version: str, description: str, tags: Mapping[str, str]
    ) -> ModelRef:
        """Register the job's logged MLflow model; the same name and version again returns the same ModelRef."""
        self._kick_outbox()
        files = self._job(job_name)
        state = files.state()
        if state is None:
            raise NotFound(f"job {job_name} does not exist")
        existing = self.tracking.find_version(name, version) if self.tracking.exists() else None
        if existing is None:
            if state.get("status") != "Completed":
                raise BackendError(
                    f"job {job_name} is {state.get('status')}; only a completed job has a model to register"
                )
            result = read_json(files.result_file)
            if not result or not result.get("model_uri"):
                raise BackendError(f"job {job_name} completed without a logged model (result.json missing)")
            existing = self.tracking.register(
                name=name,
                version=str(version),
                source=result["model_uri"],
                mlflow_run_id=result.get("mlflow_run_id"),
                model_id=result.get("model_id"),
                model_path=result["model_path"],
                job_name=job_name,
                description=description,
                tags=tags,
            )
            log.info(
                "model %s version %s registered (MLflow version %s) from job %s",
                name,
                version,
                existing.version,
                job_name,
            )
        elif existing.tags.get(JOB_TAG) != job_name:
            raise ConflictError(
                f"model {name} version {version} is already registered from job {existing.tags.get(JOB_TAG)}"
            )
        return ModelRef(name=name, version=str(version), id=f"models:/{name}/{existing.version}")

    def get_model(self, name: str, version: str) -> ModelRef | None:
        self._kick_outbox()
        if not self.tracking.exists():
            return None
        found = self.tracking.find_version(name, str(version))
        if found is None:
            return None
        return ModelRef(name=name, version=str(version), id=f"models:/{name}/{found.version}")

    def _model_path(self, name: str, version: str) -> Path:
        found = self.tracking.find_version(name, str(version)) if self.tracking.exists() else None
        if found is None:
            raise NotFound(f"model {name} version {version} is not registered")
        path = found.tags.get(PATH_TAG)
        return Path(path) if path else uri_to_path(found.source)

    # --- endpoints -----------------------------------------------------------------------------

    def list_endpoints(self) -> list[EndpointInfo]:
        self._kick_outbox()
        return self.endpoints.list_endpoints()

    def get_endpoint(self, name: str) -> EndpointInfo | None:
        self._kick_outbox()
        return self.endpoints.get_endpoint(name)

    def begin_create_endpoint(self, name: str, *, tags: Mapping[str, str], description: str = "") -> Operation:
        self._kick_outbox()
        return self.endpoints.begin_create_endpoint(name, tags=tags, description=description)

    def begin_create_deployment(self, spec: DeploymentSpec) -> Operation:
        self._kick_outbox()
        return self.endpoints.begin_create_deployment(spec)

    def get_deployment(self, endpoint: str, name: str) -> DeploymentInfo | None:
        self._kick_outbox()
        return self.endpoints.get_deployment(endpoint, name)

    def begin_set_traffic(
        self, endpoint: str, traffic: Mapping[str, int], *, mirror_traffic: Mapping[str, int] | None = None
    ) -> Operation:
        self._kick_outbox()
        return self.endpoints.begin_set_traffic(endpoint, traffic, mirror_traffic=mirror_traffic)

    def begin_delete_deployment(self, endpoint: str, name: str) -> Operation:
        self._kick_outbox()
        return self.endpoints.begin_delete_deployment(endpoint, name)

    def begin_delete_endpoint(self, name: str) -> Operation:
        self._kick_outbox()
        return self.endpoints.begin_delete_endpoint(name)

    def get_credentials(self, endpoint: str) -> EndpointCredentials:
        return self.endpoints.get_credentials(endpoint)

    def get_endpoint_activity(self, endpoint: str, *, since: datetime) -> EndpointActivity:
        self._kick_outbox()
        return self.endpoints.get_endpoint_activity(endpoint, since=since)

    # --- housekeeping --------------------------------------------------------------------------

    def stop_processes(self) -> None:
        """Stop every process this workspace started (jobs, routers, servers); state stays on disk.

        For tests and `python -m tunegrid local-endpoints stop`; an app never needs it."""
        for files in self._all_jobs():
            for handle in (files.supervisor(), files.trainer()):
                if handle is not None:
                    handle.stop(grace_s=2.0)
        self.endpoints.stop_all_processes()

    def _all_jobs(self) -> list[JobFiles]:
        root = self.workspace / "jobs"
        return [JobFiles(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / "state.json").is_file()]

    def list_jobs(self) -> list[JobStatus]:
        out = []
        for files in self._all_jobs():
            status = self.get_job(files.name)
            if status is not None:
                out.append(status)
        return out
