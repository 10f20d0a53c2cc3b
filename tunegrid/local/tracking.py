"""MLflow tracking and registry of the local backend: sqlite plus a local artifact folder.

Layout under the workspace: `mlflow/mlflow.db` (runs, metrics, registry) and `mlflow/artifacts/`.
The trainer logs metrics and the model; the backend reads metrics and registers models. MLflow
numbers model versions itself (1, 2, ...); our version (from the run id, as in Azure) is kept as the
`tunegrid.version` tag on the MLflow version, which is how `get_model` finds it again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from shared.errors import ConflictError
from tunegrid.local.workspace import file_lock

log = logging.getLogger(__name__)

VERSION_TAG = "tunegrid.version"
JOB_TAG = "tunegrid.job"
PATH_TAG = "tunegrid.model_path"
PIP_REQUIREMENTS = [
    "torch==2.13.0",
    "transformers==5.24.0",
    "peft==0.21.2",
    "accelerate==1.15.0",
    "safetensors",
    "tokenizers",
    "sentencepiece",
    "mlflow==3.17.2",
]
"""Written into the logged model explicitly: MLflow's inference of them imports torchvision."""


def offline_environment() -> None:
    """Without these every MLflow / HF call waits on network retries first."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


_READY: set[str] = set()
"""Databases this process has seen created (no lock needed for them any more)."""


@dataclass(frozen=True)
class Tracking:
    """Where this workspace's MLflow data lives."""

    root: Path

    @classmethod
    def for_workspace(cls, workspace: Path) -> Tracking:
        return cls(root=workspace / "mlflow")

    @property
    def db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.db}"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def exists(self) -> bool:
        return self.db.is_file()

    def client(self) -> Any:
        """An MlflowClient; the first one in a workspace creates the database under a lock
        (two processes migrating one sqlite file at once corrupt it)."""
        offline_environment()
        import mlflow
        from mlflow import MlflowClient

        # Some registry calls build their own MlflowClient() from the global URIs: point them here too.
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        if self.uri in _READY and self.db.is_file():
            return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.root.mkdir(parents=True, exist_ok=True)
        with file_lock(self.root / ".init.lock"):
            # Constructing the client already opens (and, the first time, migrates) the tracking
            # store, and the registry store migrates on its first use: both under the lock.
            client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
        _READY.add(self.uri)
        return client

    def experiment_id(self, name: str) -> str:
        client = self.client()
        with file_lock(self.root / ".init.lock"):
            exp = client.get_experiment_by_name(name)
            if exp is not None:
                return str(exp.experiment_id)
            self.artifacts.mkdir(parents=True, exist_ok=True)
            return str(client.create_experiment(name, artifact_location=self.artifacts.as_uri()))

    def metric_history(self, run_id: str) -> dict[str, list[tuple[int, float]]]:
        """Every metric of a run as (step, value) pairs, in step order."""
        client = self.client()
        run = client.get_run(run_id)
        out: dict[str, list[tuple[int, float]]] = {}
        for key in sorted(run.data.metrics):
            history = client.get_metric_history(run_id, key)
            out[key] = sorted((int(m.step), float(m.value)) for m in history)
        return out

    def find_version(self, name: str, version: str) -> Any | None:
        """The MLflow model version carrying our version tag, or None."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            found = client.search_model_versions(
                f"name = '{_quote(name)}' and tags.`{VERSION_TAG}` = '{_quote(version)}'"
            )
        except MlflowException:
            found = [
                v
                for v in client.search_model_versions(f"name = '{_quote(name)}'")
                if v.tags.get(VERSION_TAG) == version
            ]
        return found[0] if found else None

    def register(
        self,
        *,
        name: str,
        version: str,
        source: str,
        mlflow_run_id: str | None,
        model_id: str | None,
        model_path: str,
        job_name: str,
        description: str,
        tags: Mapping[str, str],
    ) -> Any:
        """Register once: the same name and version again returns the existing MLflow version."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        with file_lock(self.root / ".registry.lock"):
            existing = self.find_version(name, version)
            if existing is not None:
                if existing.tags.get(JOB_TAG) != job_name:
                    raise ConflictError(
                        f"model {name} version {version} is already registered from job {existing.tags.get(JOB_TAG)}"
                    )
                return existing
            try:
                client.get_registered_model(name)
            except MlflowException:
                client.create_registered_model(name)
            all_tags = {
                **{k: str(v) for k, v in tags.items()},
                VERSION_TAG: version,
                JOB_TAG: job_name,
                PATH_TAG: model_path,
            }
            kwargs: dict[str, Any] = {"run_id": mlflow_run_id, "tags": all_tags, "description": description}
            if model_id:
                kwargs["model_id"] = model_id
            return client.create_model_version(name, source, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """`python -m tunegrid.local.tracking MLFLOW_DIR`: create the database ahead of the first job."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tunegrid.local.tracking MLFLOW_DIR", file=sys.stderr)
        return 2
    Tracking(root=Path(args[0])).client()
    return 0


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


def uri_to_path(uri: str) -> Path:
    """A `file://` URI (or a plain path) as a local path."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path if parsed.scheme else uri))
    raise ValueError(f"not a local path: {uri}")


if __name__ == "__main__":
    raise SystemExit(main())
