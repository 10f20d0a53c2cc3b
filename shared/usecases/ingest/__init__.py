"""Ingest use case: a dataset blob arrived -> validate -> report -> prepare train/test -> submit.

Idempotent by construction: the run id is derived from the blob version (container, name, ETag); the
first delivery creates the ledger record and claims it, every concurrent or repeated delivery finds
the record and does nothing. The claim is fenced like a run lease: every later write of this delivery is
conditional on the ETag of the record it holds, so a delivery whose claim was taken over (it was stale) or
whose run was canceled or superseded meanwhile stops at its next write, and undoes what it submitted. A
delivery that fails with a transient error releases its claim and re-raises, so the platform's retry takes
over; a crashed one is taken over once its claim is stale.

Supersession and reuse: `heads.py`. Validation, the report and the split: `prepare.py` and `reports.py`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta

from shared.domain.clock import utcnow
from shared.domain.leases import claim_binds
from shared.domain.naming import DATASET_TAG, OWNER_TAG, RUN_TAG, blob_name_problem
from shared.domain.resources import DataRef, FineTuneRequest
from shared.domain.runs import RunRecord, RunState, new_record, run_id_for
from shared.domain.sidecar import Sidecar, parse_sidecar
from shared.domain.validation import TokenCounterFactory
from shared.errors import BackendError, ConfigError, ConflictError, InvalidInput, TransientError
from shared.ports import Blobs, FineTuneBackend, Ledger
from shared.settings import Settings
from shared.usecases.estimate import CostPorts, estimate_before_submission
from shared.usecases.ingest.model import CLAIM_TTL, COMPANION_SUFFIXES, INGEST_STATES, IngestOutcome
from shared.usecases.ingest.prepare import holdout_indices, validate_and_prepare
from shared.usecases.ingest.reports import record_findings
from shared.usecases.rollout import Rollout
from shared.usecases.rollout.ending import end_if_alive, end_run, undo_or_mark

__all__ = ["CLAIM_TTL", "INGEST_STATES", "IngestOutcome", "holdout_indices", "ingest_dataset", "resume_stale_ingest"]

log = logging.getLogger(__name__)


def _claim_is_stale(record: RunRecord, now: datetime, ttl: timedelta = CLAIM_TTL) -> bool:
    return not claim_binds(record, now, ttl)


def _claim(
    ledger: Ledger,
    container: str,
    name: str,
    etag: str,
    settings: Settings,
    now: datetime,
    ttl: timedelta = CLAIM_TTL,
) -> RunRecord | None:
    """The record of this blob version, claimed by this delivery (`claimed_at` = time|token, written with the
    record: the claim is fenced by the returned record's ETag); None when another delivery has it."""
    run_id = run_id_for(container, name, etag)
    claim = f"{now.isoformat()}|{uuid.uuid4().hex[:12]}"
    fresh = replace(
        new_record(run_id=run_id, container=container, blob=name, blob_version=etag, backend=settings.backend),
        claimed_at=claim,
    )
    record, created = ledger.create(fresh)
    if created:
        return record
    if record.state not in (RunState.RECEIVED, RunState.VALIDATING, RunState.SUBMITTING):
        log.info(
            "duplicate delivery of %s/%s: run %s is already %s",
            container,
            name,
            run_id,
            record.state.value,
            extra={"run_id": run_id},
        )
        return None
    if not _claim_is_stale(record, now, ttl):
        log.info(
            "duplicate delivery of %s/%s: run %s is being processed", container, name, run_id, extra={"run_id": run_id}
        )
        return None
    try:
        taken = ledger.update(record, claimed_at=claim)
    except ConflictError:
        return None
    log.warning(
        "taking over run %s (state %s, stale or released claim)", run_id, record.state.value, extra={"run_id": run_id}
    )
    return taken


def _ours(ledger: Ledger, run_id: str, claim: str) -> RunRecord | None:
    """The current record when this delivery's claim is still on it, else None."""
    current = ledger.get(run_id)
    return current if current is not None and current.claimed_at == claim and not current.state.terminal else None


def _release(ledger: Ledger, run_id: str, claim: str) -> None:
    try:
        current = _ours(ledger, run_id, claim)
        if current is not None:
            ledger.update(current, claimed_at="")
    except Exception:  # best effort: a stale claim is taken over after CLAIM_TTL anyway
        log.exception("could not release claim on run %s", run_id, extra={"run_id": run_id})


def ingest_dataset(
    *,
    container: str,
    name: str,
    blobs: Blobs,
    ledger: Ledger,
    backend: FineTuneBackend,
    settings: Settings,
    now: Callable[[], datetime] = utcnow,
    token_counter: TokenCounterFactory | None = None,
    costs: CostPorts | None = None,
    claim_ttl: timedelta = CLAIM_TTL,
) -> IngestOutcome:
    """Handle one delivery of a dataset blob. Safe to call any number of times, concurrently.

    `costs`: prices and throughput history for the estimate made before submission (None: no price, the
    default throughput). `claim_ttl`: how long a claim binds before another delivery may take the run over
    (tests shorten it)."""
    if not name.endswith(".jsonl"):
        log.info("ignoring %s/%s: not a .jsonl dataset", container, name)
        return IngestOutcome("ignored", "not a .jsonl file")
    if name.endswith(COMPANION_SUFFIXES):
        log.info("ignoring %s/%s: companion file, read when its dataset arrives", container, name)
        return IngestOutcome("ignored", "companion test/validation file")
    problem = blob_name_problem(name)
    if problem is not None:
        log.warning("rejecting %r in %s: %s", name, container, problem)
        ledger.reject("ingest", f"{container}/{name}", problem)
        return IngestOutcome("rejected", problem)
    props = blobs.properties(container, name)
    if props is None:
        log.info("ignoring %s/%s: blob no longer exists", container, name)
        return IngestOutcome("ignored", "blob not found")
    etag = str(props["etag"])
    record = _claim(ledger, container, name, etag, settings, now(), claim_ttl)
    if record is None:
        return IngestOutcome(
            "duplicate", "this blob version was already delivered", run_id=run_id_for(container, name, etag)
        )
    rollout = Rollout(
        ledger=ledger,
        backend=backend,
        blobs=blobs,
        settings=settings,
        now=now,
        costs=costs,
        claim_ttl=claim_ttl,
        token_counter=token_counter,
    )
    return _run_claimed(record, rollout, etag=etag, token_counter=token_counter)


def resume_stale_ingest(
    record: RunRecord,
    rollout: Rollout,
    *,
    claim_ttl: timedelta = CLAIM_TTL,
    token_counter: TokenCounterFactory | None = None,
) -> IngestOutcome | None:
    """Timer-side safety net, so that no run is left in `received`, `validating` or `submitting`: when the
    delivery that claimed the run died (its claim went stale) and no redelivery came, take the claim over and
    go on from where it stopped. A run whose blob version is gone before it passed validation ends
    `superseded` (a newer version exists) or `error` (the blob was deleted). None when the claim still binds."""
    now = rollout.now()
    if record.state not in INGEST_STATES or not _claim_is_stale(record, now, claim_ttl):
        return None
    if record.state != RunState.SUBMITTING:  # a submitting run has its data prepared: the blob is not read again
        props = rollout.blobs.properties(record.container, record.blob)
        if props is None or str(props["etag"]) != record.blob_version:
            to = RunState.SUPERSEDED if props is not None else RunState.ERROR
            reason = (
                f"a newer version of {record.container}/{record.blob} replaced this one before its ingest finished"
                if props is not None
                else f"{record.container}/{record.blob} was deleted before its ingest finished"
            )
            ended = end_if_alive(record.run_id, rollout, to, reason)
            return IngestOutcome(to.value, reason, run_id=record.run_id) if ended is not None else None
    try:
        taken = rollout.ledger.update(record, claimed_at=f"{now.isoformat()}|{uuid.uuid4().hex[:12]}")
    except ConflictError:
        return None
    log.warning("taking over run %s (state %s, stale claim)", record.run_id, record.state.value)
    return _run_claimed(taken, rollout, etag=record.blob_version, token_counter=token_counter)


def _run_claimed(
    record: RunRecord, rollout: Rollout, *, etag: str, token_counter: TokenCounterFactory | None
) -> IngestOutcome:
    """Process a run this delivery has claimed; every write is fenced by the claimed record's ETag."""
    ledger = rollout.ledger
    run_id, claim = record.run_id, record.claimed_at
    try:
        return _process(record, rollout=rollout, etag=etag, token_counter=token_counter)
    except ConflictError as exc:
        return _lost(record, rollout, etag=etag, claim=claim, exc=exc)
    except (TransientError, OSError):
        _release(ledger, run_id, claim)
        raise
    except Exception as exc:
        log.exception("ingest of run %s failed", run_id, extra={"run_id": run_id})
        _fail(rollout, run_id, claim, f"{type(exc).__name__}: {exc}")
        return IngestOutcome("error", str(exc), run_id=run_id)


def _lost(record: RunRecord, rollout: Rollout, *, etag: str, claim: str, exc: ConflictError) -> IngestOutcome:
    """A conditional read or write failed. Either the blob changed under the read (a newer version was
    uploaded: this run is superseded), or the run changed under this delivery's claim (another delivery took
    it over, or it was canceled or superseded: undo what this delivery may have submitted).

    The blob counts only while the run is still being read (`received`, `validating`). A run past validation
    holds its dataset's head, and its data is prepared; a newer version decides for itself through the head:
    it supersedes this run, or it is a copy that reuses it. Ending the run here on the blob's newer ETag would
    leave such a copy pointing at a superseded run, with nothing to train the data."""
    run_id, ledger = record.run_id, rollout.ledger
    current = ledger.get(run_id)
    if current is None or current.state in (RunState.RECEIVED, RunState.VALIDATING):
        props = rollout.blobs.properties(record.container, record.blob)
        if props is None or str(props["etag"]) != etag:
            reason = f"a newer version of {record.container}/{record.blob} was uploaded while this one was being read"
            ended = end_if_alive(run_id, rollout, RunState.SUPERSEDED, reason)
            current = ended or ledger.get(run_id)
            if current is not None and current.state != RunState.SUPERSEDED:
                reason = current.error or f"run is {current.state.value}"
            return IngestOutcome(current.state.value if current is not None else "ignored", reason, run_id=run_id)
    if current is not None and current.claimed_at == claim and not current.state.terminal:
        # Still ours and the dataset is unchanged: a companion file changed mid-read. Read it all again.
        raise TransientError(f"run {run_id}: {exc}; retrying with the current files") from exc
    if current is not None and current.state.terminal:
        undo_or_mark(current, rollout, was=RunState.SUBMITTING)
        log.info("run %s ended %s while ingest held it", run_id, current.state.value, extra={"run_id": run_id})
        return IngestOutcome(current.state.value, current.error or f"run is {current.state.value}", run_id=run_id)
    log.info("run %s: another delivery took it over (%s)", run_id, exc, extra={"run_id": run_id})
    return IngestOutcome("duplicate", "another delivery is processing this blob version", run_id=run_id)


def _fail(rollout: Rollout, run_id: str, claim: str, reason: str) -> None:
    current = _ours(rollout.ledger, run_id, claim)
    if current is None:
        return
    try:
        end_run(current, rollout, RunState.ERROR, reason)
    except ConflictError:
        log.warning("run %s moved while recording its error", run_id, extra={"run_id": run_id})


def _process(
    record: RunRecord,
    *,
    rollout: Rollout,
    etag: str,
    token_counter: TokenCounterFactory | None = None,
) -> IngestOutcome:
    """Every write is conditional on the record this delivery holds (`ConflictError` when it lost it). The
    cost estimate is made once, after the backend's checks and right before submission (`rollout.costs`)."""
    ledger, backend, blobs, settings = rollout.ledger, rollout.backend, rollout.blobs, rollout.settings
    costs = rollout.costs or CostPorts()
    run_id = record.run_id
    extra = {"run_id": run_id, "blob": f"{record.container}/{record.blob}"}
    if record.state == RunState.RECEIVED:
        record = ledger.transition(record, RunState.VALIDATING)
    if record.state == RunState.VALIDATING:
        outcome = validate_and_prepare(record, rollout=rollout, etag=etag, token_counter=token_counter)
        if isinstance(outcome, IngestOutcome):
            return outcome
        record = outcome
    if record.state != RunState.SUBMITTING:
        return IngestOutcome("duplicate", f"run is {record.state.value}", run_id=run_id)
    job = backend.get_job(record.job_name)
    if job is None:
        request = _request_from_record(record, settings)
        try:
            findings = backend.check_finetune(request)
            record_findings(blobs, record, findings)
            errors = [f.message for f in findings if f.is_error]
            if errors:
                raise ConfigError("; ".join(errors))
            record, refusal = estimate_before_submission(
                record, request, backend=backend, blobs=blobs, ledger=ledger, settings=settings, costs=costs
            )
            if refusal:
                raise ConfigError(refusal)
            log.info("submitting fine-tune job %s for run %s", record.job_name, run_id, extra=extra)
            ref = backend.submit_finetune(request)
        except (BackendError, ConfigError, InvalidInput) as exc:
            reason = f"submission refused: {exc}"
            ledger.transition(record, RunState.ERROR, error=reason[:4000], claimed_at="")
            return IngestOutcome("error", str(exc), run_id=run_id, report_url=record.report_url)
        job_url = ref.studio_url or ""
        base_model = ref.base_model_id or record.base_model
    else:
        log.info("job %s already exists (%s): not submitting again", record.job_name, job.raw_status, extra=extra)
        job_url = job.studio_url or ""
        base_model = record.base_model
    ledger.transition(record, RunState.SUBMITTED, job_url=job_url, base_model=base_model, claimed_at="")
    return IngestOutcome(
        "submitted", "fine-tune job submitted", run_id=run_id, report_url=record.report_url, job_name=record.job_name
    )


def _request_from_record(record: RunRecord, settings: Settings) -> FineTuneRequest:
    extra = record.extra
    sidecar = parse_sidecar(None) if not extra.get("sidecar") else Sidecar(**extra["sidecar"])
    train, test = extra["train"], extra["test"]
    return FineTuneRequest(
        run_id=record.run_id,
        job_name=record.job_name,
        dataset=record.blob,
        train=DataRef(train["container"], train["blob"], train["url"]),
        test=DataRef(test["container"], test["blob"], test["url"]),
        base_model=sidecar.model or settings.base_model_name,
        base_model_label=sidecar.model_label or (None if sidecar.model_version else settings.base_model_label) or None,
        base_model_version=sidecar.model_version or settings.base_model_version or None,
        local_model=sidecar.local_model,
        params=dict(record.params),
        compute=dict(sidecar.compute),
        tags={RUN_TAG: record.run_id, DATASET_TAG: record.blob[:256], OWNER_TAG: settings.instance},
    )
