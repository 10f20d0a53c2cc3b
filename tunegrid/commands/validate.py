"""`python -m tunegrid validate PATH`: validate a chat JSONL dataset, from a local file or a blob.

PATH is a local file or `blob://CONTAINER/NAME`, read from the data storage account (the `DataStorage`
connection, else `AzureWebJobsStorage`) through the same streaming code the ingest trigger uses.
Exit codes: 0 valid, 1 invalid, 2 usage error or unreadable input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from shared.domain.validation import ValidationOptions, ValidationReport, validate_chunks
from shared.errors import ConfigError, UsageError
from shared.settings import Settings
from tunegrid.tokenizer import TransformersTokenCounter
from tunegrid.validate_files import validate_path

BLOB_SCHEME = "blob://"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="validate a chat fine-tuning dataset (JSONL), local or in blob storage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", metavar="PATH", help="a local .jsonl file or blob://CONTAINER/NAME")
    parser.add_argument("--json", action="store_true", help="print the JSON report (the document the trigger stores)")
    parser.add_argument(
        "--max-seq-length",
        type=_positive_int,
        default=None,
        help="rows over this many tokens get `too_long` (default: VALIDATION_MAX_SEQ_LENGTH, 2048)",
    )
    parser.add_argument(
        "--max-line-bytes",
        type=_positive_int,
        default=None,
        help="longer lines get `line_too_long` (default: VALIDATION_MAX_LINE_BYTES, 1 MiB)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="local path or HF id of a tokenizer for exact token counts (default: estimate)",
    )
    parser.set_defaults(func=run)


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {raw!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def options_from(args: argparse.Namespace, settings: Settings) -> ValidationOptions:
    """Command-line values over the app settings."""
    tokenizer = args.tokenizer if args.tokenizer is not None else settings.validation_tokenizer
    return ValidationOptions(
        max_line_bytes=args.max_line_bytes or settings.validation_max_line_bytes,
        max_seq_length=args.max_seq_length or settings.validation_max_seq_length,
        token_counter=TransformersTokenCounter(tokenizer) if tokenizer else None,
    )


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    options = options_from(args, settings)
    source: str = args.path
    if source.startswith(BLOB_SCHEME):
        report = _validate_blob(source, options, settings)
    else:
        report = _validate_file(Path(source), options)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(report.to_markdown(title=f"Validation of {source}"), end="")
    return 0 if report.valid else 1


def _validate_file(path: Path, options: ValidationOptions) -> ValidationReport:
    if path.is_dir():
        raise UsageError(f"cannot read {path}: it is a directory")
    if not path.exists():
        raise UsageError(f"cannot read {path}: no such file")
    try:
        return validate_path(path, options)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc


def parse_blob_url(source: str) -> tuple[str, str]:
    """`blob://CONTAINER/NAME` -> (container, name); NAME may contain slashes."""
    container, _, name = source[len(BLOB_SCHEME) :].partition("/")
    if not container or not name:
        raise UsageError(f"expected blob://CONTAINER/NAME, got {source!r}")
    return container, name


def _validate_blob(source: str, options: ValidationOptions, settings: Settings) -> ValidationReport:
    from azure.core.exceptions import AzureError

    from shared.adapters.storage import BlobStore, StorageClients

    container, name = parse_blob_url(source)
    if not settings.storage_connection:
        raise ConfigError("no storage connection: set DataStorage (or AzureWebJobsStorage) to read blob:// paths")
    store = BlobStore(StorageClients.from_connection(settings.storage_connection).blobs)
    try:
        props = store.properties(container, name)
        if props is None:
            raise UsageError(f"cannot read {source}: no such blob")
        return validate_chunks(store.chunks(container, name, etag=props["etag"]), options)
    except AzureError as exc:
        raise UsageError(f"cannot read {source}: {describe_storage_error(exc)}") from exc


def describe_storage_error(exc: Exception) -> str:
    """What went wrong, without the message text (it can carry a URL with a SAS token)."""
    status = getattr(exc, "status_code", None)
    code = getattr(exc, "error_code", None)
    if status:
        return f"{type(exc).__name__} (HTTP {status}{', ' + str(code) if code else ''})"
    return f"{type(exc).__name__} (is the storage account reachable?)"
