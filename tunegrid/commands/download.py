"""`python -m tunegrid download-dataset`: fetch a Hugging Face chat dataset as JSONL (the notebook's step).

    python -m tunegrid download-dataset --dataset HuggingFaceH4/ultrachat_200k --download_dir data \\
        --dataset_split_pc 5 [--dataset_subset S] [--upload]

Every split is written to `DIR/{split}.jsonl` (the first PC % of it, or all of it without
--dataset_split_pc). With --upload, `train_sft` (or `train`) goes to `training-data/NAME.jsonl` and
`test_sft` (or `test`) to `training-data/NAME.test.jsonl`, the test file first: the dataset's upload
starts ingestion. NAME defaults to the dataset's name (`ultrachat_200k`).
Exit codes: 0 done, 2 usage error, no network or nothing to upload.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.settings import Settings
from tunegrid.commands.validate import describe_storage_error
from tunegrid.dataset_download import DownloadError, dataset_slug, download_dataset, upload_splits


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "download-dataset",
        help="download a Hugging Face chat dataset as JSONL, optionally uploading it for fine-tuning",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset", required=True, help="hub id (HuggingFaceH4/ultrachat_200k) or a local dataset directory"
    )
    parser.add_argument(
        "--download_dir",
        "--download-dir",
        dest="download_dir",
        default="data",
        help="where to write SPLIT.jsonl (default: data)",
    )
    parser.add_argument(
        "--dataset_split_pc", "--dataset-split-pc", dest="split_percent", type=_percent, default=None,
        help="keep the first PC %% of every split (1-100; default: all of it)",
    )  # fmt: skip
    parser.add_argument(
        "--dataset_subset", "--dataset-subset", dest="subset", default=None, help="the dataset's config (subset) name"
    )
    parser.add_argument(
        "--upload", action="store_true", help="upload the train and test splits to the training-data container"
    )
    parser.add_argument("--name", default=None, help="blob name stem for --upload (default: from the dataset name)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _percent(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer percentage: {raw!r}") from exc
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be between 1 and 100, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from azure.core.exceptions import AzureError

    store = _store() if args.upload else None  # fail on a missing connection before downloading anything
    progress = not args.quiet
    try:
        splits = download_dataset(
            args.dataset,
            Path(args.download_dir),
            split_percent=args.split_percent,
            subset=args.subset,
            progress=progress,
        )
        for s in splits:
            print(f"{s.path}: {s.rows} rows, {s.bytes} bytes")
        if store is not None:
            name = args.name or dataset_slug(args.dataset, args.subset)
            for blob, size in upload_splits(splits, store, name=name, progress=progress):
                print(f"uploaded {blob} ({size} bytes)")
    except DownloadError as exc:
        print(f"tunegrid: error: {exc}", file=sys.stderr)
        return 2
    except AzureError as exc:
        print(
            f"tunegrid: error: cannot upload to the training-data container: {describe_storage_error(exc)}",
            file=sys.stderr,
        )
        return 2
    return 0


def _store() -> Any:
    from shared.adapters.storage import BlobStore, StorageClients

    settings = Settings.from_env()
    if not settings.storage_connection:
        raise ConfigError("--upload needs a storage connection: set DataStorage (or AzureWebJobsStorage)")
    return BlobStore(StorageClients.from_connection(settings.storage_connection).blobs)
