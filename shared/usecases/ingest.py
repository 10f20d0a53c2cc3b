"""Ingest use case: a dataset blob arrived -> validate -> report -> prepare train/test -> submit.

Idempotent by construction: the run id is derived from the blob version (container, name, ETag); the
first delivery creates the ledger record and claims it, every concurrent or repeated delivery finds
the record and does nothing. The claim is fenced like a run lease: every later write of this delivery is
conditional on the ETag of the record it holds, so a delivery whose claim was taken over (it was stale) or
whose run was canceled or superseded meanwhile stops at its next write, and undoes what it submitted. A
delivery that fails with a transient error releases its claim and re-raises, so the platform's retry takes
over; a crashed one is taken over once its claim is stale.

Supersession and reuse, per dataset name (container + blob name):
- The newest version wins. When a version passes validation it takes the dataset's head
  (`shared.domain.leases.DatasetHead`, an ETag-conditional row with a sequence number), but only while its
  blob version is still the blob's current one (checked after reading the head, so two versions racing for
  the head are ordered by the blob itself). The runs of older versions that are not live yet end
  `superseded` (their jobs canceled, their 0 % deployments removed, see `shared.usecases.rollout.ending`),
  now or at their next roll-out step. A version overwritten while it is being validated ends `superseded`.
- Identical content is not trained twice: when the head's run is alive (in flight or live) and has the
  same fingerprint (dataset SHA-256, companion test file, effective sidecar and base model), the new version
  ends `duplicate`, pointing at that run, which is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import IO, Any

from shared.domain.clock import utcnow
from shared.domain.leases import DatasetHead, claim_binds, superseded_by
from shared.domain.naming import (
    DATASET_TAG,
    OWNER_TAG,
    RUN_TAG,
    blob_name_problem,
    dataset_stem,
    job_name_for,
    report_base,
)
from shared.domain.resources import DataRef, Finding, FineTuneRequest
from shared.domain.runs import ALIVE, RunRecord, RunState, new_record, run_id_for
from shared.domain.sidecar import Sidecar, local_model_problem, parse_sidecar
from shared.domain.validation import (
    Issue,
    TokenCounterFactory,
    ValidationOptions,
    ValidationReport,
    iter_lines,
    validate_chunks,
)
from shared.errors import BackendError, ConfigError, ConflictError, InvalidInput, TransientError
from shared.ports import Blobs, FineTuneBackend, Ledger
from shared.settings import PREPARED_CONTAINER, REPORTS_CONTAINER, Settings
from shared.usecases.estimate import CostPorts, estimate_before_submission
from shared.usecases.rollout import Rollout
from shared.usecases.rollout.ending import end_if_alive, end_run, undo_or_mark
from shared.usecases.rollout.model import DEFAULT_CLAIM_TTL

log = logging.getLogger(__name__)

CLAIM_TTL = DEFAULT_CLAIM_TTL
INGEST_STATES = (RunState.RECEIVED, RunState.VALIDATING, RunState.SUBMITTING)
COMPANION_SUFFIXES = (".test.jsonl", ".validation.jsonl")
SIDECAR_SUFFIX = ".config.json"
MIN_TRAIN_ROWS = 10
REPORT_READ_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True)
class IngestOutcome:
    action: str
    """ignored | rejected | duplicate | invalid | superseded | submitted | canceled | error"""
    reason: str
    run_id: str | None = None
    report_url: str | None = None
    job_name: str | None = None
    duplicate_of: str | None = None


def holdout_indices(rows: int, percent: int) -> tuple[int, Callable[[int], bool]]:
    """How many rows to hold out, and a predicate saying whether row index i (0-based) is held out.

    Evenly spaced, deterministic, and exact: the same dataset always gives the same split.
    """
    test_rows = max(1, round(rows * percent / 100)) if rows > 1 else 0

    def is_test(i: int) -> bool:
        return (i + 1) * test_rows // rows > i * test_rows // rows

    return test_rows, is_test


def _summary(report: ValidationReport) -> str:
    parts = [f"{code}×{n}" for code, n in sorted(report.error_counts.items())]
    return f"{sum(report.error_counts.values())} errors: " + ", ".join(parts)


def _claim_is_stale(record: RunRecord, now: datetime, ttl: timedelta = CLAIM_TTL) -> bool:
    return not claim_binds(record, now, ttl)


def _split_stream(
    lines: Iterable[tuple[int, bytes | None]], rows: int, percent: int, train_file: IO[bytes], test_file: IO[bytes]
) -> dict[str, int]:
    """One pass over the dataset into two temporary files (disk, not memory), rewound for the upload: a
    seekable file can be sent again should its container have to be created first."""
    _, is_test = holdout_indices(rows, percent)
    counts = {"train_rows": 0, "test_rows": 0}
    index = 0
    for _, line in lines:
        if line is None or not line.strip():
            continue
        if is_test(index):
            test_file.write(line + b"\n")
            counts["test_rows"] += 1
        else:
            train_file.write(line + b"\n")
            counts["train_rows"] += 1
        index += 1
    train_file.seek(0)
    test_file.seek(0)
    return counts


def _validation_options(settings: Settings, token_counter: TokenCounterFactory | None) -> ValidationOptions:
    """`token_counter` loads VALIDATION_TOKENIZER (the composition root chooses it: this module imports no adapter)."""
    name = settings.validation_tokenizer
    if name and token_counter is None:
        raise ConfigError(f"VALIDATION_TOKENIZER={name!r} is set, but no token counter was wired into ingest")
    return ValidationOptions(
        max_line_bytes=settings.validation_max_line_bytes,
        max_seq_length=settings.validation_max_seq_length,
        token_counter=token_counter(name) if name and token_counter is not None else None,
    )


def _store_report(blobs: Blobs, *, name: str, run_id: str, report: dict[str, Any], markdown: str) -> str:
    import orjson

    base = report_base(name, run_id)
    url = blobs.upload(
        REPORTS_CONTAINER,
        f"{base}.report.json",
        orjson.dumps(report, option=orjson.OPT_INDENT_2),
        content_type="application/json",
    )
    blobs.upload(REPORTS_CONTAINER, f"{base}.report.md", markdown.encode(), content_type="text/markdown; charset=utf-8")
    return url


CHECKS_HEADING = "\n## Submission checks\n"


def _record_findings(blobs: Blobs, record: RunRecord, findings: list[Finding]) -> None:
    """The backend's pre-submission findings go into the stored report (JSON `submission_checks`,
    a markdown section), replacing any earlier ones, so a repeated delivery writes the same report."""
    if not findings:
        return
    base = report_base(record.blob, record.run_id)
    raw = blobs.read_bytes(REPORTS_CONTAINER, f"{base}.report.json", limit=REPORT_READ_LIMIT)
    markdown = (blobs.read_bytes(REPORTS_CONTAINER, f"{base}.report.md", limit=REPORT_READ_LIMIT) or b"").decode()
    import orjson

    doc = orjson.loads(raw) if raw else {}
    doc["submission_checks"] = {
        "passed": not any(f.is_error for f in findings),
        "findings": [f.to_dict() for f in findings],
    }
    markdown = markdown.split(CHECKS_HEADING, 1)[0].rstrip("\n") + "\n" + CHECKS_HEADING
    markdown += "".join(f"- **{f.level.value}** `{f.code}`: {f.message}\n" for f in findings)
    _store_report(blobs, name=record.blob, run_id=record.run_id, report=doc, markdown=markdown)


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
    it over, or it was canceled or superseded: undo what this delivery may have submitted)."""
    run_id, ledger = record.run_id, rollout.ledger
    props = rollout.blobs.properties(record.container, record.blob)
    if props is None or str(props["etag"]) != etag:
        reason = f"a newer version of {record.container}/{record.blob} was uploaded while this one was being read"
        ended = end_if_alive(run_id, rollout, RunState.SUPERSEDED, reason)
        current = ended or ledger.get(run_id)
        if current is not None and current.state != RunState.SUPERSEDED:
            reason = current.error or f"run is {current.state.value}"
        return IngestOutcome(current.state.value if current is not None else "ignored", reason, run_id=run_id)
    current = ledger.get(run_id)
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
        outcome = _validate_and_prepare(record, rollout=rollout, etag=etag, token_counter=token_counter)
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
            _record_findings(blobs, record, findings)
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


def _fingerprint(report: ValidationReport, test_report: ValidationReport | None, sidecar: Sidecar, base: str) -> str:
    """What makes two versions train the same model: the data, the test rows, the effective sidecar and the
    base model. Equal fingerprints mean the same job would be submitted again."""
    doc = {
        "data": report.stats.get("sha256", ""),
        "test": test_report.stats.get("sha256", "") if test_report is not None else "",
        "sidecar": sidecar.to_dict(),
        "base_model": base,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _take_head(record: RunRecord, rollout: Rollout, *, etag: str, fingerprint: str) -> DatasetHead | RunRecord | None:
    """Make this version the dataset's head: the new head (this run is the newest version), the alive run with
    the same fingerprint to reuse (this version is a duplicate), or None (the blob moved on: superseded)."""
    ledger = rollout.ledger
    for _ in range(16):
        head = ledger.get_dataset_head(record.container, record.blob) or DatasetHead(record.container, record.blob)
        if head.run_id == record.run_id:
            return head  # taken by an earlier delivery of this version (a takeover resumes here)
        props = rollout.blobs.properties(record.container, record.blob)  # read after the head: see the module doc
        if props is None or str(props["etag"]) != etag:
            return None
        if head.run_id:
            current = ledger.get(head.run_id)
            if current is not None and current.state in ALIVE and current.extra.get("fingerprint") == fingerprint:
                return current
        try:
            return ledger.put_dataset_head(head.advanced_to(record.run_id))
        except ConflictError:
            continue  # another version took it first: look again
    raise TransientError(f"dataset head of {record.container}/{record.blob} kept changing")


def _supersede_older(record: RunRecord, head: DatasetHead, rollout: Rollout) -> None:
    """End the older versions' runs that are not live yet, now rather than at their next step (their jobs are
    canceled at once). Best effort: the roll-out ends any it misses (`superseded_by`)."""
    reason = f"superseded by run {record.run_id}, a newer version of {record.container}/{record.blob}"
    for other in rollout.ledger.find_by_dataset(record.container, record.blob):
        if superseded_by(other, head) is None:
            continue
        try:
            end_if_alive(other.run_id, rollout, RunState.SUPERSEDED, reason)
        except (ConflictError, TransientError, OSError) as exc:
            log.warning("run %s: not superseded now (%s); its next step will", other.run_id, exc)


def _validate_and_prepare(
    record: RunRecord,
    *,
    rollout: Rollout,
    etag: str,
    token_counter: TokenCounterFactory | None = None,
) -> IngestOutcome | RunRecord:
    """Validate, store the report, take the dataset head, split and upload; returns an outcome when the run
    ends here, else the record in `submitting`."""
    ledger, blobs, settings = rollout.ledger, rollout.blobs, rollout.settings
    run_id, container, name = record.run_id, record.container, record.blob
    extra = {"run_id": run_id, "blob": f"{container}/{name}"}
    stem = dataset_stem(name)
    options = _validation_options(settings, token_counter)
    report = validate_chunks(blobs.chunks(container, name, etag=etag), options)
    doc = report.to_dict()
    problems: list[Issue] = []

    sidecar: Sidecar | None = None
    sidecar_name = f"{stem}{SIDECAR_SUFFIX}"
    try:
        sidecar = parse_sidecar(blobs.read_bytes(container, sidecar_name))
    except (InvalidInput, ValueError) as exc:
        problems.append(Issue(line=None, code="invalid_config", message=f"{sidecar_name}: {exc}"))
    if sidecar is not None and sidecar.local_model:
        refused = local_model_problem(sidecar.local_model, settings.local_model_roots)
        if refused is not None:
            problems.append(Issue(line=None, code="invalid_config", message=f"{sidecar_name}: {refused}"))

    test_name = f"{stem}.test.jsonl"
    test_props = blobs.properties(container, test_name)
    test_report: ValidationReport | None = None
    if test_props is not None:
        test_report = validate_chunks(
            blobs.chunks(container, test_name, etag=str(test_props["etag"])), replace(options, min_rows=1)
        )
        doc["test_file"] = {"name": test_name, **test_report.to_dict()}
        if not test_report.valid:
            problems.append(Issue(line=None, code="invalid_test_file", message=f"{test_name}: {_summary(test_report)}"))

    percent = (
        sidecar.test_split_percent if sidecar and sidecar.test_split_percent else None
    ) or settings.test_split_percent
    if report.valid and test_report is None:
        test_rows, _ = holdout_indices(report.valid_rows, percent)
        if report.valid_rows - test_rows < MIN_TRAIN_ROWS:
            problems.append(
                Issue(
                    line=None,
                    code="too_few_rows",
                    message=f"holding out {test_rows} test rows ({percent} %) leaves {report.valid_rows - test_rows} training rows; the pipeline needs {MIN_TRAIN_ROWS}. Upload more rows or a {test_name}.",
                )
            )
    for issue in problems:
        doc["errors"].append({"line": issue.line, "code": issue.code, "message": issue.message})
        doc["error_counts"][issue.code] = doc["error_counts"].get(issue.code, 0) + 1
    valid = report.valid and not problems
    doc["valid"] = valid
    doc["dataset"] = {"container": container, "name": name, "etag": etag, "run_id": run_id}
    markdown = report.to_markdown(title=f"Validation report: {name}")
    if problems:
        markdown += "\n## Other problems\n" + "\n".join(f"- `{p.code}`: {p.message}" for p in problems) + "\n"
    report_url = _store_report(blobs, name=name, run_id=run_id, report=doc, markdown=markdown)
    log.info(
        "validated %s: valid=%s rows=%d errors=%d",
        name,
        valid,
        report.rows,
        sum(doc["error_counts"].values()),
        extra=extra,
    )

    sha256 = str(report.stats.get("sha256", ""))
    if not valid:
        summary = ", ".join(f"{c}×{n}" for c, n in sorted(doc["error_counts"].items()))
        ledger.transition(
            record,
            RunState.INVALID,
            report_url=report_url,
            error=f"invalid dataset: {summary}"[:4000],
            claimed_at="",
            sha256=sha256,
        )
        return IngestOutcome("invalid", summary, run_id=run_id, report_url=report_url)

    assert sidecar is not None
    base_model = (
        (sidecar.model or settings.base_model_name)
        if settings.backend == "azureml"
        else (sidecar.local_model or settings.local_base_model)
    )
    fingerprint = _fingerprint(report, test_report, sidecar, base_model)
    head = _take_head(record, rollout, etag=etag, fingerprint=fingerprint)
    if head is None:
        reason = f"a newer version of {container}/{name} was uploaded before this one passed validation"
        end_run(record, rollout, RunState.SUPERSEDED, reason)
        return IngestOutcome("superseded", reason, run_id=run_id, report_url=report_url)
    if isinstance(head, RunRecord):
        reason = f"same content and settings as run {head.run_id} ({head.state.value}), which is reused"
        ledger.transition(
            record,
            RunState.DUPLICATE,
            report_url=report_url,
            error=reason,
            claimed_at="",
            sha256=sha256,
            extra={"duplicate_of": head.run_id, "fingerprint": fingerprint},
        )
        log.info("run %s: %s", run_id, reason, extra=extra)
        return IngestOutcome("duplicate", reason, run_id=run_id, report_url=report_url, duplicate_of=head.run_id)

    train_blob, test_blob = f"{run_id}/train.jsonl", f"{run_id}/test.jsonl"
    if test_report is not None and test_props is not None:
        train_bytes = (
            line + b"\n"
            for _, line in iter_lines(blobs.chunks(container, name, etag=etag), max_line_bytes=options.max_line_bytes)
            if line is not None and line.strip()
        )
        blobs.upload(PREPARED_CONTAINER, train_blob, train_bytes, content_type="application/jsonl")
        test_bytes = (
            line + b"\n"
            for _, line in iter_lines(
                blobs.chunks(container, test_name, etag=str(test_props["etag"])), max_line_bytes=options.max_line_bytes
            )
            if line is not None and line.strip()
        )
        blobs.upload(PREPARED_CONTAINER, test_blob, test_bytes, content_type="application/jsonl")
        counts = {"train_rows": report.valid_rows, "test_rows": test_report.valid_rows, "test_source": test_name}
    else:
        with tempfile.TemporaryFile() as train_file, tempfile.TemporaryFile() as test_file:
            split_counts = _split_stream(
                iter_lines(blobs.chunks(container, name, etag=etag), max_line_bytes=options.max_line_bytes),
                report.valid_rows,
                percent,
                train_file,
                test_file,
            )
            blobs.upload(PREPARED_CONTAINER, train_blob, train_file, content_type="application/jsonl")
            blobs.upload(PREPARED_CONTAINER, test_blob, test_file, content_type="application/jsonl")
        counts = {**split_counts, "test_source": f"{percent} % deterministic split"}
    log.info("prepared %s: %s", name, counts, extra=extra)
    submitting = ledger.transition(
        record,
        RunState.SUBMITTING,
        report_url=report_url,
        sha256=sha256,
        job_name=job_name_for(run_id),
        base_model=base_model,
        params=dict(sidecar.finetune),
        generation=head.generation,
        extra={
            "sidecar": sidecar.to_dict(),
            "fingerprint": fingerprint,
            "split": counts,
            "train": {
                "container": PREPARED_CONTAINER,
                "blob": train_blob,
                "url": blobs.url(PREPARED_CONTAINER, train_blob),
            },
            "test": {
                "container": PREPARED_CONTAINER,
                "blob": test_blob,
                "url": blobs.url(PREPARED_CONTAINER, test_blob),
            },
            "stats": report.stats,
        },
    )
    _supersede_older(submitting, head, rollout)
    return submitting


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
