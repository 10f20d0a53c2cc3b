"""Files and processes of the local backend's workspace: atomic JSON, file locks, process handles.

Everything the local backend knows lives in files under one workspace directory, so a restarted
app (or a second app process) sees the same jobs, models and endpoints. Processes it starts run in
their own session; they are found again by pid and start time, never by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout holding `shared/` and `tunegrid/`: child processes run `python -m tunegrid...` from here."""


def write_json_atomic(path: Path, doc: Any, *, private: bool = False) -> None:
    """Write JSON so readers see the old or the new document, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if private:
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True, default=str)
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise


def read_json(path: Path) -> Any | None:
    """The document, or None when the file does not exist (or is not valid JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("unreadable JSON file %s", path)
        return None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process on this machine (flock on `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def try_file_lock(path: Path) -> Iterator[bool]:
    """Like `file_lock` but does not wait: yields False when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail_lines(path: Path, *, count: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last non-empty lines of a log file (empty when it does not exist)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return []
    lines = [ln.strip() for ln in data.decode("utf-8", errors="replace").splitlines()]
    return [ln for ln in lines if ln][-count:]


_children: dict[int, subprocess.Popen[bytes]] = {}


def reap_children() -> None:
    """Collect exit codes of processes this process started, so they do not linger as zombies."""
    for pid, proc in list(_children.items()):
        if proc.poll() is not None:
            _children.pop(pid, None)


@dataclass(frozen=True)
class ProcessHandle:
    """A process we started: pid plus its start time, so a reused pid is never mistaken for it."""

    pid: int
    started: float

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "started": self.started}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> ProcessHandle | None:
        if not doc or not doc.get("pid"):
            return None
        return cls(pid=int(doc["pid"]), started=float(doc.get("started") or 0.0))

    def alive(self) -> bool:
        import psutil

        reap_children()
        try:
            proc = psutil.Process(self.pid)
            if self.started and abs(proc.create_time() - self.started) > 1.0:
                return False
            return proc.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    def signal(self, sig: int, *, group: bool = False) -> bool:
        """Send `sig` (to the process group the handle leads when `group`); False when it is gone."""
        if not self.alive():
            return False
        try:
            if group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def stop(self, *, grace_s: float = 3.0, group: bool = True) -> None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL. Returns once the process is gone."""
        if not self.signal(signal.SIGTERM, group=group):
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not self.alive():
                return
            time.sleep(0.05)
        self.signal(signal.SIGKILL, group=group)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.05)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a child process: offline ML stack, the checkout on the path."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def spawn(module: str, args: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None) -> ProcessHandle:
    """Start `python -m module args...` in its own session, output appended to `log_path`."""
    import psutil

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(env),
            start_new_session=True,
        )
    _children[proc.pid] = proc
    try:
        started = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        started = 0.0
    return ProcessHandle(pid=proc.pid, started=started)
