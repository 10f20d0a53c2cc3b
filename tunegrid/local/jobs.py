"""Local fine-tune jobs on disk: `jobs/<name>/` holds the request, data, state, log and outputs.

`state.json` changes only through `JobFiles.transition`, under the job's lock, and every change
of status writes its Event Grid events to the outbox in the same step, so each transition emits
its events exactly once into the outbox (delivery from there is at least once). A terminal status
never changes again: the first of "completed", "failed" (trainer error, dead process) or
"canceled" wins.

Statuses use Azure ML's words: NotStarted, Running, Completed, Failed, Canceled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.domain.clock import iso, utcnow
from tunegrid.local.events import Outbox, run_events
from tunegrid.local.workspace import ProcessHandle, file_lock, read_json, tail_lines, write_json_atomic

log = logging.getLogger(__name__)

NOT_STARTED = "NotStarted"
RUNNING = "Running"
COMPLETED = "Completed"
FAILED = "Failed"
CANCELED = "Canceled"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELED})


@dataclass(frozen=True)
class JobFiles:
    """The files of one job directory."""

    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def job_file(self) -> Path:
        return self.dir / "job.json"

    @property
    def log_file(self) -> Path:
        return self.dir / "job.log"

    @property
    def error_file(self) -> Path:
        return self.dir / "error.txt"

    @property
    def result_file(self) -> Path:
        return self.dir / "result.json"

    @property
    def run_file(self) -> Path:
        return self.dir / "run.json"

    @property
    def progress_file(self) -> Path:
        return self.dir / "progress.json"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def trained_model(self) -> Path:
        """The local `azureml://jobs/{job}/outputs/trained_model`: the MLflow model folder."""
        return self.dir / "outputs" / "trained_model"

    @property
    def lock(self) -> Path:
        return self.dir / ".state.lock"

    def state(self) -> dict[str, Any] | None:
        return read_json(self.state_file)

    def job(self) -> dict[str, Any]:
        return read_json(self.job_file) or {}

    def transition(self, outbox: Outbox, status: str, *, error: str | None = None, **fields: Any) -> bool:
        """Move to `status` and queue its events; False (and no event) when already there or terminal."""
        with file_lock(self.lock):
            state = self.state()
            if state is None:
                raise FileNotFoundError(f"job {self.name} has no state")
            current = state.get("status")
            if current in TERMINAL or current == status:
                if current == status and fields:
                    state.update(fields)
                    write_json_atomic(self.state_file, state)
                return False
            now = iso(utcnow())
            state.update(fields)
            state["status"] = status
            state["updated_at"] = now
            if error is not None:
                state["error"] = error
            state.setdefault("history", []).append({"status": status, "at": now})
            write_json_atomic(self.state_file, state)
            outbox.put(self.events(state))
        log.info(
            "job %s: %s -> %s%s",
            self.name,
            current,
            status,
            f" ({error})" if error else "",
            extra={"run_id": state.get("run_id")},
        )
        return True

    def update(self, **fields: Any) -> None:
        with file_lock(self.lock):
            state = self.state() or {}
            state.update(fields)
            write_json_atomic(self.state_file, state)

    def events(self, state: Mapping[str, Any]) -> list[dict[str, Any]]:
        props: dict[str, str] = {
            "azureml.runsource": "azureml.PipelineRun",
            "runType": "HTTP",
            "tunegrid.backend": "local",
        }
        for key, value in (state.get("properties") or {}).items():
            props[key] = str(value)
        if state.get("error"):
            props["error"] = str(state["error"])
        return run_events(
            run_id=self.name,
            run_status=str(state["status"]),
            experiment_name=str(state.get("experiment_name") or "tunegrid-local"),
            run_tags=state.get("tags") or {},
            run_properties=props,
        )

    def failure_reason(self, *, fallback: str) -> str:
        """The trainer's own error line, else the last error-looking log line, else `fallback`."""
        try:
            text = self.error_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            text = ""
        if text:
            return text.splitlines()[0]
        lines = tail_lines(self.log_file, count=40)
        for line in reversed(lines):
            if "Error" in line or "Exception" in line or line.startswith("FAILED"):
                return line[:1000]
        return fallback

    def supervisor(self) -> ProcessHandle | None:
        return ProcessHandle.from_dict((self.state() or {}).get("supervisor"))

    def trainer(self) -> ProcessHandle | None:
        return ProcessHandle.from_dict((self.state() or {}).get("trainer"))
