"""Validate a claimed dataset version, store its report, take the dataset head, split and upload the train and
test files: the run ends here (`invalid`, `superseded`, `duplicate`) or moves to `submitting`."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import IO

from shared.domain.naming import dataset_stem, job_name_for
from shared.domain.runs import RunRecord, RunState
from shared.domain.sidecar import Sidecar, local_model_problem, parse_sidecar
from shared.domain.validation import (
    Issue,
    TokenCounterFactory,
    ValidationOptions,
    ValidationReport,
    iter_lines,
    validate_chunks,
)
from shared.errors import ConfigError, InvalidInput
from shared.settings import PREPARED_CONTAINER, Settings
from shared.usecases.ingest.heads import fingerprint_of, supersede_older, take_head
from shared.usecases.ingest.model import MIN_TRAIN_ROWS, SIDECAR_SUFFIX, IngestOutcome
from shared.usecases.ingest.reports import store_report
from shared.usecases.rollout import Rollout
from shared.usecases.rollout.ending import end_run

log = logging.getLogger(__name__)


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


def validate_and_prepare(
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
    report_url = store_report(blobs, name=name, run_id=run_id, report=doc, markdown=markdown)
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
    fingerprint = fingerprint_of(report, test_report, sidecar, base_model)
    head = take_head(record, rollout, etag=etag, fingerprint=fingerprint)
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
    supersede_older(submitting, head, rollout)
    return submitting
