"""What the backend's pre-submission checks (`check_finetune`) do to an ingest, against a real Azurite:
warnings go into the validation report and the job is submitted; errors go into the report and the
run's error, and nothing is submitted. The last test runs the Azure ML adapter over the rig, its
registry answering from tests/data/azure-reference/azureml-assets (Phi-3-mini in the tags form, Phi-4)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared.adapters.storage import BlobStore
from shared.adapters.tables import TableRunLedger
from shared.domain.resources import Finding, FindingLevel
from shared.domain.runs import RunState
from shared.settings import LEDGER_TABLE, REPORTS_CONTAINER, Settings
from tests import azure_reference as ref
from tests import azureml_rig as rig_module
from tests.azureml_rig import AzureMLRig
from tests.fakes import FakeBackend
from tests.support import upload_and_ingest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
loopback_only = rig_module.loopback_only  # fixture: Azurite on 127.0.0.1, nothing else


@pytest.fixture
def env(storage: Any, storage_conn: str, unique: str) -> dict[str, Any]:
    return {
        "conn": storage_conn,
        "ledger": TableRunLedger(storage.tables.get_table_client(LEDGER_TABLE)),
        "blobs": BlobStore(storage.blobs),
        "prefix": f"c{unique}/",
    }


def _ingest(env: dict[str, Any], backend: Any, settings: Settings) -> tuple[Any, dict[str, Any], str]:
    rows = (SAMPLES / "ultrachat_small.jsonl").read_bytes().splitlines()[:30]
    name = env["prefix"] + "chat.jsonl"
    outcome = upload_and_ingest(env, name, b"\n".join(rows) + b"\n", backend=backend, settings=settings)
    base = f"{name}/{outcome.run_id}"
    report = json.loads(env["blobs"].read_bytes(REPORTS_CONTAINER, f"{base}.report.json"))
    markdown = (env["blobs"].read_bytes(REPORTS_CONTAINER, f"{base}.report.md") or b"").decode()
    return outcome, report, markdown


def _local(env: dict[str, Any]) -> Settings:
    return Settings.from_env({"DataStorage": env["conn"], "FINETUNE_BACKEND": "local", "TUNEGRID_INSTANCE": "test"})


def test_a_warning_is_reported_and_the_job_submitted(env: dict[str, Any]) -> None:
    """A deprecated base model: the report's `submission_checks` and markdown say so; the job goes out."""
    warning = Finding(
        FindingLevel.WARNING, "model_deprecated", "base model M:1 is deprecated for fine-tuning since 2026-06-30"
    )
    backend = FakeBackend(findings=[warning])
    outcome, report, markdown = _ingest(env, backend, _local(env))
    assert outcome.action == "submitted"
    assert report["valid"] is True
    assert report["submission_checks"] == {"passed": True, "findings": [warning.to_dict()]}
    assert "## Submission checks\n- **warning** `model_deprecated`: base model M:1 is deprecated" in markdown
    assert len(backend.submissions) == 1


def test_an_error_refuses_the_run_before_submitting(env: dict[str, Any]) -> None:
    """A retired base model: recorded in the report and as the run's error; no job submitted, no retry."""
    error = Finding(FindingLevel.ERROR, "model_retired", "base model M:1 was retired for fine-tuning on 2025-08-30")
    backend = FakeBackend(findings=[error])
    outcome, report, markdown = _ingest(env, backend, _local(env))
    assert outcome.action == "error" and "2025-08-30" in outcome.reason
    record = env["ledger"].get(outcome.run_id)
    assert record.state == RunState.ERROR
    assert record.error == "submission refused: base model M:1 was retired for fine-tuning on 2025-08-30"
    assert report["submission_checks"]["passed"] is False
    assert "- **error** `model_retired`" in markdown
    assert backend.submissions == [] and backend.calls["submit_finetune"] == 0


@pytest.fixture
def rig(loopback_only: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AzureMLRig]:
    """The capture rig (Azurite's loopback allowed); fails the test when a request found no route."""
    monkeypatch.chdir(tmp_path)
    azureml = AzureMLRig()
    azureml.serve_workspace()
    yield azureml
    assert not azureml.unmatched, "requests with no route:\n" + "\n".join(str(c) for c in azureml.unmatched)


def test_the_notebooks_model_is_refused_with_its_date_and_an_alternative(env: dict[str, Any], rig: AzureMLRig) -> None:
    """BASE_MODEL_NAME=Phi-3-mini-4k-instruct on the Azure ML backend: the report the user reads and the
    run's error name the retirement date and Phi-4; no job is submitted."""
    rig.serve_registry(model=ref.model_version_doc(ref.PHI3_MINI_TAGS))
    rig.accept_job_submission()
    settings = rig.settings(DataStorage=env["conn"], TUNEGRID_INSTANCE="test", BASE_MODEL_NAME="Phi-3-mini-4k-instruct")
    backend = rig.backend(settings, clock=lambda: datetime(2026, 7, 23, tzinfo=UTC))

    outcome, report, markdown = _ingest(env, backend, settings)

    assert outcome.action == "error"
    record = env["ledger"].get(outcome.run_id)
    assert record.state == RunState.ERROR
    for text in (record.error, markdown, json.dumps(report["submission_checks"])):
        assert "was retired for fine-tuning on 2025-08-30 (the FinetuneRetirementDate tag)" in text
        assert "Fine-tunable alternative in registry azureml: Phi-4 (version 8, no deprecation date)" in text
    assert not rig.requests("PUT")
