"""What ingest answers and the names it reads beside a dataset (shared by the modules of `shared.usecases.ingest`)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.domain.runs import RunState
from shared.usecases.rollout.model import DEFAULT_CLAIM_TTL

CLAIM_TTL = DEFAULT_CLAIM_TTL


INGEST_STATES = (RunState.RECEIVED, RunState.VALIDATING, RunState.SUBMITTING)


COMPANION_SUFFIXES = (".test.jsonl", ".validation.jsonl")


SIDECAR_SUFFIX = ".config.json"


MIN_TRAIN_ROWS = 10


@dataclass(frozen=True)
class IngestOutcome:
    action: str
    """ignored | rejected | duplicate | invalid | superseded | submitted | canceled | error"""
    reason: str
    run_id: str | None = None
    report_url: str | None = None
    job_name: str | None = None
    duplicate_of: str | None = None
