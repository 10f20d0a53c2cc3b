"""One local endpoint with one deployment, started from a model folder without the backend's bookkeeping:
the deployment server (`tunegrid.local.server`) behind its router (`tunegrid.local.router`), as the
local backend starts them. For the proxy's tests and `bench/proxy.py` (time to first token)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from shared.domain.resources import EndpointCredentials
from tunegrid.local.workspace import free_port

DEPLOYMENT = "blue"


class StandaloneEndpoint:
    """`name` served by one deployment (`blue`, capacity `max_concurrent`) of the model in `model`."""

    def __init__(self, model: Path, workdir: Path, *, name: str, key: str, token: str, max_concurrent: int = 1) -> None:
        self.name, self.key, self.token = name, key, token
        self.server_port, self.router_port = free_port(), free_port()
        endpoint_dir = workdir / name
        endpoint_dir.mkdir(parents=True)
        doc = {
            "name": name,
            "provisioning_state": "Succeeded",
            "keys": {"primary": key, "secondary": key + "-2"},
            "traffic": {DEPLOYMENT: 100},
            "deployments": {
                DEPLOYMENT: {
                    "name": DEPLOYMENT,
                    "provisioning_state": "Succeeded",
                    "token": token,
                    "request_timeout_ms": 90_000,
                    "server": {"port": self.server_port},
                }
            },
        }
        (endpoint_dir / "endpoint.json").write_text(json.dumps(doc))
        server = ["tunegrid.local.server", "--model", str(model), "--port", str(self.server_port)]
        server += ["--name", DEPLOYMENT, "--max-concurrent", str(max_concurrent)]
        router = ["tunegrid.local.router", "--endpoint-dir", str(endpoint_dir), "--port", str(self.router_port)]
        quiet = subprocess.DEVNULL
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", *server],
                env={**os.environ, "TUNEGRID_SERVER_TOKEN": token},
                stdout=quiet,
                stderr=quiet,
            ),
            subprocess.Popen([sys.executable, "-m", *router], stdout=quiet, stderr=quiet),
        ]

    def wait_ready(self, timeout_s: float = 180.0) -> StandaloneEndpoint:
        deadline = time.monotonic() + timeout_s
        while not (self._up(self.server_port) and self._up(self.router_port)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                self.stop()
                raise RuntimeError(f"the local endpoint {self.name} did not start")
            time.sleep(0.25)
        return self

    @staticmethod
    def _up(port: int) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def scoring_uri(self) -> str:
        return f"http://127.0.0.1:{self.router_port}/score"

    def get_credentials(self, endpoint: str) -> EndpointCredentials:
        """The backend port's credential call: the router's scoring URI and the endpoint key."""
        return EndpointCredentials(scoring_uri=self.scoring_uri, key=self.key)

    def server_status(self, max_new_tokens: int = 1) -> int:
        """Status of one call straight to the deployment server (429 while it generates for someone)."""
        conversation = [{"role": "user", "content": "hi"}]
        body = {"input_data": {"input_string": [conversation], "parameters": {"max_new_tokens": max_new_tokens}}}
        reply = httpx.post(
            f"http://127.0.0.1:{self.server_port}/score",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )
        return reply.status_code

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
