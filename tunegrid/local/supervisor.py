"""The job process: `python -m tunegrid.local.supervisor JOB_DIR`.

Started by `LocalBackend.submit_finetune` in its own session. It runs the trainer as a child,
records every status change (with its Event Grid events) and delivers the outbox, retrying with
backoff while the webhook is down (for `redeliver_for_s`, then the backend takes over). SIGTERM
(from `cancel_job`) stops the trainer and records Canceled. Whatever way the trainer ends, the
job ends Completed, Failed (with the reason) or Canceled: never silently.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tunegrid.local.events import Outbox
from tunegrid.local.jobs import CANCELED, COMPLETED, FAILED, RUNNING, TERMINAL, JobFiles
from tunegrid.local.workspace import ProcessHandle, child_env, read_json

log = logging.getLogger("tunegrid.supervisor")

TRAINER_STOP_GRACE_S = 3.0


class OutboxPump:
    """Delivers the outbox in a thread, with backoff while the webhook does not answer."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.kick = threading.Event()
        self.done = threading.Event()
        self.deadline: float | None = None
        self.thread = threading.Thread(target=self._run, name="outbox", daemon=True)

    def start(self) -> None:
        if self.outbox.webhook_url:
            self.thread.start()

    def _run(self) -> None:
        delay = 0.5
        while True:
            result = self.outbox.deliver()
            if result.error:
                log.info(
                    "events not delivered yet (%s); %d pending, retrying in %.1f s", result.error, result.pending, delay
                )
            if self.done.is_set() and (
                not result.pending or (self.deadline is not None and time.monotonic() >= self.deadline)
            ):
                return
            if result.pending:
                self.kick.wait(delay)
                delay = min(delay * 2, 30.0)
            else:
                self.kick.wait(5.0)
                delay = 0.5
            self.kick.clear()

    def finish(self, *, within_s: float) -> None:
        """Stop after the outbox is empty, or after `within_s` seconds of trying."""
        self.deadline = time.monotonic() + within_s
        self.done.set()
        self.kick.set()
        if self.thread.is_alive():
            self.thread.join(timeout=within_s + 130)


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return str(-returncode)


def supervise(job_dir: Path) -> int:
    files = JobFiles(job_dir)
    job = files.job()
    outbox = Outbox(
        Path(job["outbox_dir"]), webhook_url=job.get("webhook_url"), key=os.environ.get("TUNEGRID_EVENT_KEY")
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    pump = OutboxPump(outbox)
    pump.start()
    redeliver_for = float(job.get("redeliver_for_s", 300))

    if (files.state() or {}).get("cancel_requested") or stop.is_set():
        files.transition(outbox, CANCELED)
        pump.finish(within_s=redeliver_for)
        return 0

    with files.log_file.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tunegrid.local.trainer", str(job_dir)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
    import psutil

    try:
        started = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        started = 0.0
    files.transition(outbox, RUNNING, trainer=ProcessHandle(proc.pid, started).to_dict())
    pump.kick.set()

    canceled = False
    while True:
        try:
            returncode = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if stop.is_set():
                canceled = True
                proc.terminate()
                try:
                    returncode = proc.wait(timeout=TRAINER_STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    returncode = proc.wait()
                break

    requested = bool((files.state() or {}).get("cancel_requested"))
    result = read_json(files.result_file)
    if canceled or (requested and returncode != 0):
        if requested:
            files.transition(outbox, CANCELED)
        else:
            files.transition(outbox, FAILED, error="the job process was stopped (SIGTERM) before the trainer finished")
    elif returncode == 0 and result:
        properties = {
            "mlflow.runId": result.get("mlflow_run_id"),
            "tunegrid.model_uri": result.get("model_uri"),
            "__azureml_ft_training_tokens": result.get("training_tokens"),
            "__azureml_ft_assistant_tokens": result.get("assistant_tokens"),
        }
        files.transition(
            outbox,
            COMPLETED,
            properties={k: v for k, v in properties.items() if v is not None},
            outputs={"trained_model": {"path": str(files.trained_model), "model_uri": result.get("model_uri")}},
        )
    else:
        if returncode < 0:
            fallback = f"the trainer process was killed by {_signal_name(returncode)}"
            reason = fallback if not files.error_file.exists() else files.failure_reason(fallback=fallback)
        elif returncode == 0:
            reason = "the trainer exited without a result (result.json missing)"
        else:
            reason = files.failure_reason(fallback=f"the trainer exited with code {returncode}")
        files.transition(outbox, FAILED, error=reason)
    state = files.state() or {}
    log.info("job %s finished: %s", files.name, state.get("status"))
    assert state.get("status") in TERMINAL
    pump.finish(within_s=redeliver_for)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s supervisor %(levelname)s: %(message)s"
    )
    for noisy in ("azure", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if len(args) != 1:
        print("usage: python -m tunegrid.local.supervisor JOB_DIR", file=sys.stderr)
        return 2
    return supervise(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
