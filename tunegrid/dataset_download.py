"""Download a Hugging Face chat dataset as JSONL, as the notebook's `download-dataset.py` does.

For every split: `load_dataset(name, subset, split=f"{split}[0%:{pc}%]")` (the whole split without a
percentage) and `to_json(f"{dir}/{split}.jsonl")`. Optionally upload the training split and its test
split to the `training-data` container: the test file first, because the dataset's own upload is what
triggers ingestion, and ingestion looks for `NAME.test.jsonl` beside it.

`datasets` (requirements-local.txt) is imported only here, when the command runs.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from shared.errors import TunegridError
from shared.settings import TRAINING_CONTAINER

log = logging.getLogger(__name__)

TRAIN_SPLITS = ("train_sft", "train")
TEST_SPLITS = ("test_sft", "test")
UPLOAD_CHUNK_BYTES = 4 * 1024 * 1024


class DownloadError(TunegridError):
    """The dataset could not be fetched (no network, offline mode, unknown dataset or split)."""


@dataclass(frozen=True)
class DownloadedSplit:
    split: str
    path: Path
    rows: int
    bytes: int


def _is_local(dataset: str) -> bool:
    return Path(dataset).expanduser().exists()


def _offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"


def _probe_hub(dataset: str, *, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after the hub client's minute of retries, when the hub cannot be reached."""
    url = urlparse(hub_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise DownloadError(
            f"cannot download {dataset}: no network access to the Hugging Face Hub ({host}:{port}: "
            f"{exc.strerror or type(exc).__name__})"
        ) from exc


_NETWORK_ERRORS = ("ConnectionError", "ConnectError", "Timeout", "TimeoutError", "OfflineModeIsEnabled", "gaierror")


def _network_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        names = {cls.__name__ for cls in type(seen).__mro__}
        if names.intersection(_NETWORK_ERRORS) or "Couldn't reach" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _explain(dataset: str, exc: BaseException) -> DownloadError:
    if _network_failure(exc):
        if _offline_mode():
            return DownloadError(
                f"cannot download {dataset}: HF_HUB_OFFLINE is set and the dataset is not in the local cache"
            )
        return DownloadError(f"cannot download {dataset}: no network access to the Hugging Face Hub")
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return DownloadError(f"cannot download {dataset}: {type(exc).__name__}: {first_line}")


def download_dataset(
    dataset: str,
    download_dir: Path,
    *,
    split_percent: int | None = None,
    subset: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> list[DownloadedSplit]:
    """Write `{download_dir}/{split}.jsonl` for every split of `dataset` (a hub id or a local dataset dir)."""
    if split_percent is not None and not 1 <= split_percent <= 100:
        raise ValueError(f"split_percent must be between 1 and 100, got {split_percent}")
    if not _is_local(dataset) and not _offline_mode():
        _probe_hub(dataset)
    try:
        from datasets import get_dataset_split_names, load_dataset
        from tqdm import tqdm
    except ImportError as exc:  # pragma: no cover - datasets is in requirements-local.txt
        raise DownloadError(f"the `datasets` package is needed: pip install -r requirements-local.txt ({exc})") from exc

    download_dir.mkdir(parents=True, exist_ok=True)
    cache = str(cache_dir) if cache_dir else None
    try:
        splits = list(get_dataset_split_names(dataset, subset, cache_dir=cache))
    except Exception as exc:
        raise _explain(dataset, exc) from exc
    written: list[DownloadedSplit] = []
    for split in tqdm(splits, desc=f"splits of {dataset}", unit="split", disable=not progress):
        spec = f"{split}[0%:{split_percent}%]" if split_percent is not None else split
        try:
            data = load_dataset(dataset, subset, split=spec, cache_dir=cache)
        except Exception as exc:
            raise _explain(dataset, exc) from exc
        path = download_dir / f"{split}.jsonl"
        data.to_json(str(path))
        written.append(DownloadedSplit(split=split, path=path, rows=len(data), bytes=path.stat().st_size))
        log.debug("wrote %s: %d rows, %d bytes", path, len(data), path.stat().st_size)
    return written


def dataset_slug(dataset: str, subset: str | None = None) -> str:
    """The blob name stem for a dataset: `HuggingFaceH4/ultrachat_200k` -> `ultrachat_200k`."""
    stem = Path(dataset.rstrip("/")).name or dataset
    if subset:
        stem = f"{stem}-{subset}"
    slug = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.")
    return slug or "dataset"


def pick_split(splits: list[DownloadedSplit], candidates: tuple[str, ...]) -> DownloadedSplit | None:
    by_name = {s.split: s for s in splits}
    return next((by_name[name] for name in candidates if name in by_name), None)


def _read_with_progress(f: BinaryIO, advance: Callable[[int], Any]) -> Iterator[bytes]:
    while chunk := f.read(UPLOAD_CHUNK_BYTES):
        advance(len(chunk))
        yield chunk


def upload_splits(
    splits: list[DownloadedSplit], store: Any, *, name: str, progress: bool = True
) -> list[tuple[str, int]]:
    """Upload the test split as `NAME.test.jsonl`, then the train split as `NAME.jsonl`; (blob, bytes) each."""
    from tqdm import tqdm

    train = pick_split(splits, TRAIN_SPLITS)
    if train is None:
        raise DownloadError(f"no training split to upload (looked for {', '.join(TRAIN_SPLITS)})")
    test = pick_split(splits, TEST_SPLITS)
    plan = ([(test, f"{name}.test.jsonl")] if test is not None else []) + [(train, f"{name}.jsonl")]
    done: list[tuple[str, int]] = []
    for split, blob in plan:
        size = split.path.stat().st_size
        with (
            split.path.open("rb") as f,
            tqdm(
                total=size, unit="B", unit_scale=True, desc=f"upload {TRAINING_CONTAINER}/{blob}", disable=not progress
            ) as bar,
        ):
            store.upload(
                TRAINING_CONTAINER, blob, _read_with_progress(f, bar.update), content_type="application/x-ndjson"
            )
        log.debug("uploaded %s to %s/%s (%d bytes)", split.path, TRAINING_CONTAINER, blob, size)
        done.append((f"{TRAINING_CONTAINER}/{blob}", size))
    return done
