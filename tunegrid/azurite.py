"""Start and stop a real Azurite (blob, queue, table) on free loopback ports, by PID.

Used by the test session and by the demo (`make demo`). Runs node directly (not npx) so the PID we hold is Azurite's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_connection_string(host: str, blob_port: int, queue_port: int, table_port: int) -> str:
    """The well-known Azurite development account on the given ports."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://{host}:{blob_port}/{AZURITE_ACCOUNT};"
        f"QueueEndpoint=http://{host}:{queue_port}/{AZURITE_ACCOUNT};"
        f"TableEndpoint=http://{host}:{table_port}/{AZURITE_ACCOUNT};"
    )


ROOT = Path(__file__).resolve().parent.parent  # the repo root (node_modules lives there)
AZURITE_JS = ROOT / "node_modules" / "azurite" / "dist" / "src" / "azurite.js"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Azurite:
    pid: int
    blob_port: int
    queue_port: int
    table_port: int

    @property
    def connection_string(self) -> str:
        return azurite_connection_string("127.0.0.1", self.blob_port, self.queue_port, self.table_port)


def _wait_listening(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def run_azurite(*, log_path: Path | None = None, timeout_s: float = 30.0) -> Iterator[Azurite]:
    if not AZURITE_JS.exists():
        raise RuntimeError(f"Azurite is not installed ({AZURITE_JS} missing): run `npm ci` (make deps does)")
    ports = [free_port(), free_port(), free_port()]
    workdir = Path(tempfile.mkdtemp(prefix="azurite-"))
    cmd = [
        "node",
        str(AZURITE_JS),
        "--blobHost",
        "127.0.0.1",
        "--queueHost",
        "127.0.0.1",
        "--tableHost",
        "127.0.0.1",
        "--blobPort",
        str(ports[0]),
        "--queuePort",
        str(ports[1]),
        "--tablePort",
        str(ports[2]),
        "--inMemoryPersistence",
        "--skipApiVersionCheck",
        "--loose",
        "--disableTelemetry",
    ]
    log_file = (log_path or workdir / "azurite.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        if not all(_wait_listening(p, deadline) for p in ports):
            raise RuntimeError(f"Azurite did not start within {timeout_s}s; see {log_file.name}")
        yield Azurite(pid=proc.pid, blob_port=ports[0], queue_port=ports[1], table_port=ports[2])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.close()
