"""`download-dataset`: the notebook's download step, offline, on a small dataset built on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.adapters.storage import BlobStore, StorageClients
from shared.domain.validation import ValidationOptions
from shared.settings import TRAINING_CONTAINER
from tunegrid.dataset_download import DownloadedSplit, dataset_slug, download_dataset, upload_splits
from tunegrid.validate_files import validate_path

ROOT = Path(__file__).resolve().parent.parent


def chat_row(split: str, i: int) -> dict:
    return {
        "prompt": f"{split} question {i}",
        "prompt_id": f"{i:064x}",
        "messages": [
            {"role": "user", "content": f"{split} question {i}"},
            {"role": "assistant", "content": f"answer {i}"},
        ],
    }


SPLIT_SIZES = {"train_sft": 40, "test_sft": 20, "train_gen": 10}


@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset directory laid out like the hub repo of ultrachat_200k: data/{split}-0000x-of-0000y.parquet."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("ultrachat_mini")
    (root / "data").mkdir()
    for split, n in SPLIT_SIZES.items():
        Dataset.from_list([chat_row(split, i) for i in range(n)]).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("percent", [50, None], ids=["first_50pc", "whole_splits"])
def test_every_split_is_written(hub_layout: Path, tmp_path: Path, percent: int | None) -> None:
    """Each split becomes SPLIT.jsonl holding its first PC % of rows, in order (all of them without PC)."""
    out = tmp_path / "data"
    written = download_dataset(
        str(hub_layout), out, split_percent=percent, cache_dir=tmp_path / "cache", progress=False
    )
    assert sorted(s.split for s in written) == sorted(SPLIT_SIZES)
    for split, n in SPLIT_SIZES.items():
        keep = n * percent // 100 if percent else n
        assert read_jsonl(out / f"{split}.jsonl") == [chat_row(split, i) for i in range(keep)]
    report = validate_path(out / "train_sft.jsonl", ValidationOptions())
    assert report.valid
    assert report.warning_counts == {}


def test_subset_is_passed_through(tmp_path: Path) -> None:
    """--dataset_subset selects the dataset's config, as load_dataset(name, subset) does."""
    from datasets import Dataset

    root = tmp_path / "with_configs"
    for config, n in (("small", 4), ("large", 12)):
        (root / config).mkdir(parents=True)
        Dataset.from_list([chat_row(config, i) for i in range(n)]).to_parquet(
            str(root / config / "train-00000-of-00001.parquet")
        )
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: small\n  data_files:\n  - split: train\n    path: small/train-*.parquet\n"
        "- config_name: large\n  data_files:\n  - split: train\n    path: large/train-*.parquet\n---\n"
    )
    written = download_dataset(
        str(root), tmp_path / "out", subset="large", cache_dir=tmp_path / "cache", progress=False
    )
    assert [(s.split, s.rows) for s in written] == [("train", 12)]


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "DataStorage", "AzureWebJobsStorage")
    }
    return subprocess.run(
        [sys.executable, "-m", "tunegrid", "download-dataset", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_offline_mode_is_a_clear_error(tmp_path: Path) -> None:
    """With HF_HUB_OFFLINE=1 and nothing cached: exit 2 and one line, no traceback."""
    result = run_cli(
        "--dataset", "HuggingFaceH4/ultrachat_200k", "--download_dir", str(tmp_path), "--dataset_split_pc", "5",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "tunegrid: error: cannot download HuggingFaceH4/ultrachat_200k: "
        "HF_HUB_OFFLINE is set and the dataset is not in the local cache"
    )


def test_no_network_is_a_clear_error(tmp_path: Path) -> None:
    """With the hub unreachable: exit 2 within seconds and one line naming the problem."""
    from tunegrid.azurite import free_port

    result = run_cli(
        "--dataset", "HuggingFaceH4/ultrachat_200k", "--download_dir", str(tmp_path),
        env={"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf")},
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no network access to the Hugging Face Hub" in result.stderr.strip().splitlines()[-1]


def test_bad_percentage_is_a_usage_error(tmp_path: Path) -> None:
    """--dataset_split_pc outside 1-100 is refused by the parser."""
    result = run_cli("--dataset", "x", "--download_dir", str(tmp_path), "--dataset_split_pc", "0", env={})
    assert result.returncode == 2


def test_upload_without_connection_fails_before_downloading(tmp_path: Path) -> None:
    """--upload with no storage connection: exit 2 and nothing downloaded."""
    # set empty: the environment wins over local.settings(.sample).json, which names Azurite
    no_connection = {"DataStorage": "", "AzureWebJobsStorage": ""}
    result = run_cli(
        "--dataset", "x/y", "--download_dir", str(tmp_path / "d"), "--upload", env={"HF_HUB_OFFLINE": "1", **no_connection}
    )  # fmt: skip
    assert result.returncode == 2
    assert "DataStorage" in result.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("dataset", "subset", "slug"),
    [
        ("HuggingFaceH4/ultrachat_200k", None, "ultrachat_200k"),
        ("HuggingFaceH4/ultrachat_200k", "default", "ultrachat_200k-default"),
        ("/tmp/My Data Set/", None, "my-data-set"),
        ("samsum", None, "samsum"),
    ],
)
def test_dataset_slug(dataset: str, subset: str | None, slug: str) -> None:
    """Blob names come from the dataset's last path part, lower-cased and made safe."""
    assert dataset_slug(dataset, subset) == slug


class RecordingStore:
    """A hand-written fake of BlobStore.upload that records the order and content of uploads."""

    def __init__(self) -> None:
        self.uploads: list[tuple[str, str, bytes]] = []

    def upload(self, container: str, name: str, data: object, **_: object) -> str:
        body = b"".join(data) if not isinstance(data, bytes) else data  # type: ignore[arg-type]
        self.uploads.append((container, name, body))
        return f"http://fake/{container}/{name}"


def test_test_split_is_uploaded_first(tmp_path: Path) -> None:
    """The test file goes up before the dataset (whose upload starts ingestion); other splits stay local."""
    splits = []
    for split in ("train_gen", "test_sft", "train_sft"):
        path = tmp_path / f"{split}.jsonl"
        path.write_bytes(f"{split}\n".encode() * 3)
        splits.append(DownloadedSplit(split=split, path=path, rows=3, bytes=path.stat().st_size))
    store = RecordingStore()
    done = upload_splits(splits, store, name="ultrachat_200k", progress=False)
    assert [(c, n) for c, n, _ in store.uploads] == [
        (TRAINING_CONTAINER, "ultrachat_200k.test.jsonl"),
        (TRAINING_CONTAINER, "ultrachat_200k.jsonl"),
    ]
    assert store.uploads[0][2] == (tmp_path / "test_sft.jsonl").read_bytes()
    assert store.uploads[1][2] == (tmp_path / "train_sft.jsonl").read_bytes()
    assert done == [
        (f"{TRAINING_CONTAINER}/ultrachat_200k.test.jsonl", 27),
        (f"{TRAINING_CONTAINER}/ultrachat_200k.jsonl", 30),
    ]


def test_upload_needs_a_training_split(tmp_path: Path) -> None:
    """Without train_sft or train there is nothing to fine-tune on: a clear error."""
    from tunegrid.dataset_download import DownloadError

    path = tmp_path / "validation.jsonl"
    path.write_text("x\n")
    with pytest.raises(DownloadError, match="no training split"):
        upload_splits([DownloadedSplit("validation", path, 1, 2)], RecordingStore(), name="x", progress=False)


@pytest.mark.azurite
def test_download_and_upload_to_azurite(
    hub_layout: Path, tmp_path: Path, storage: StorageClients, storage_conn: str, unique: str
) -> None:
    """The command downloads 50 % of every split and uploads train/test to training-data, with progress."""
    result = run_cli(
        "--dataset", str(hub_layout), "--download_dir", str(tmp_path / "data"), "--dataset_split_pc", "50",
        "--upload", "--name", unique,
        env={"DataStorage": storage_conn, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    store = BlobStore(storage.blobs)
    names = store.list_names(TRAINING_CONTAINER, prefix=unique)
    assert sorted(names) == [f"{unique}.jsonl", f"{unique}.test.jsonl"]
    train = b"".join(store.chunks(TRAINING_CONTAINER, f"{unique}.jsonl"))
    test = b"".join(store.chunks(TRAINING_CONTAINER, f"{unique}.test.jsonl"))
    assert train == (tmp_path / "data" / "train_sft.jsonl").read_bytes()
    assert test == (tmp_path / "data" / "test_sft.jsonl").read_bytes()
    assert len(train.splitlines()) == 20
    assert f"upload {TRAINING_CONTAINER}/{unique}.jsonl" in result.stderr  # the byte progress bar
    assert f"uploaded {TRAINING_CONTAINER}/{unique}.test.jsonl" in result.stdout
    assert storage_conn not in result.stdout + result.stderr
