"""Streaming validation of a chat fine-tuning dataset (JSONL, one conversation per line).

A malformed dataset must never reach a GPU cluster, so this runs before anything is submitted and
answers in seconds. It streams: memory stays flat whatever the file size (the only structures that
grow are bounded: see `DuplicateIndex` and the token histogram). The ingest trigger validates a blob
with `validate_chunks` over `BlobStore.chunks()`; the local kit validates a file with the same code
(`tunegrid.validate_files`, which cuts a big file into parts for worker processes and merges them
into the one-pass report).

The modules, in the order a row meets them: `lines` (the stream as numbered lines), `fastpath` and
`rows` (the two ways a row is read and checked), `tokens` (estimated or counted by a `TokenCounter`
port), `tally` (issues and their texts), `run` (one validation, and the merge of parts), `stream`
(`validate_chunks` and its SHA-256), `report` (options, issues, the report document).
The error and warning codes are part of the interface: see docs/validation.md.
"""

from __future__ import annotations

from shared.domain.validation.lines import BOM, SPLIT_BYTES, iter_lines, line_batches
from shared.domain.validation.report import (
    DEFAULT_DUPLICATE_TRACKING_ROWS,
    ERROR_CODES,
    WARNING_CODES,
    Issue,
    ValidationOptions,
    ValidationReport,
)
from shared.domain.validation.rows import MESSAGE_KEYS, ROLES, ROW_KEYS, DuplicateIndex
from shared.domain.validation.stream import validate_chunks
from shared.domain.validation.tokens import ESTIMATE_BYTES_PER_TOKEN, TokenCounter, TokenCounterFactory

__all__ = [
    "BOM",
    "DEFAULT_DUPLICATE_TRACKING_ROWS",
    "ERROR_CODES",
    "ESTIMATE_BYTES_PER_TOKEN",
    "MESSAGE_KEYS",
    "ROLES",
    "ROW_KEYS",
    "SPLIT_BYTES",
    "WARNING_CODES",
    "DuplicateIndex",
    "Issue",
    "TokenCounter",
    "TokenCounterFactory",
    "ValidationOptions",
    "ValidationReport",
    "iter_lines",
    "line_batches",
    "validate_chunks",
]
