"""`python -m tunegrid validate`: exit codes, output formats, and the blob path through Azurite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from shared.adapters.storage import BlobStore, StorageClients
from shared.domain.validation import validate_chunks
from shared.settings import TRAINING_CONTAINER
from tunegrid.validate_files import validate_path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "azureml_chat_train.jsonl"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("DataStorage", "AzureWebJobsStorage")}
    return subprocess.run(
        [sys.executable, "-m", "tunegrid", "validate", *args],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def rows(n: int) -> bytes:
    return b"\n".join(
        orjson.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
        for i in range(n)
    )


@pytest.fixture
def invalid_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(rows(10) + b'\n{"messages": [{"role": "user", "content": NaN}]}\n')
    return path


def test_valid_file_exits_0_with_markdown() -> None:
    """A valid file: exit 0 and a markdown summary on stdout."""
    result = cli(str(SAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# Validation of {SAMPLE}")
    assert "Verdict: valid" in result.stdout


def test_invalid_file_exits_1_with_json(invalid_file: Path) -> None:
    """An invalid file: exit 1; --json prints the report document."""
    result = cli(str(invalid_file), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["valid"] is False
    assert report["error_counts"] == {"invalid_json": 1}
    assert report["errors"][0]["line"] == 11
    assert report == validate_path(invalid_file).to_dict()


@pytest.mark.parametrize(
    ("target", "message"),
    [("missing.jsonl", "no such file"), (".", "is a directory")],
    ids=["missing", "directory"],
)
def test_unreadable_input_exits_2(tmp_path: Path, target: str, message: str) -> None:
    """A missing file or a directory: exit 2 and one clear line on stderr."""
    result = cli(str(tmp_path / target))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args", [["--max-seq-length", "0"], ["--max-line-bytes", "x"], []], ids=["zero", "not_int", "no_path"]
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    """Bad arguments are usage errors (exit 2)."""
    assert cli(*args).returncode == 2


def test_options_reach_the_validator(tmp_path: Path) -> None:
    """--max-seq-length and --max-line-bytes change the report."""
    path = tmp_path / "long.jsonl"
    path.write_bytes(
        rows(10)
        + b"\n"
        + orjson.dumps({"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}]})
    )
    assert cli(str(path)).returncode == 0
    too_long = cli(str(path), "--json", "--max-seq-length", "50")
    assert too_long.returncode == 0
    assert json.loads(too_long.stdout)["warning_counts"] == {"too_long": 1}
    line_limit = cli(str(path), "--json", "--max-line-bytes", "200")
    assert line_limit.returncode == 1
    assert json.loads(line_limit.stdout)["error_counts"] == {"line_too_long": 1}


def test_settings_give_the_defaults(tmp_path: Path) -> None:
    """Without flags, VALIDATION_MAX_SEQ_LENGTH from the environment applies."""
    path = tmp_path / "long.jsonl"
    path.write_bytes(
        rows(10)
        + b"\n"
        + orjson.dumps({"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}]})
    )
    result = cli(str(path), "--json", env={"VALIDATION_MAX_SEQ_LENGTH": "50"})
    assert json.loads(result.stdout)["warning_counts"] == {"too_long": 1}


def test_blob_without_connection_exits_2() -> None:
    """A blob:// path with no storage connection configured is a usage error."""
    # set empty: the environment wins over local.settings(.sample).json, which names Azurite
    result = cli("blob://training-data/x.jsonl", env={"DataStorage": "", "AzureWebJobsStorage": ""})
    assert result.returncode == 2
    assert "DataStorage" in result.stderr


@pytest.mark.azurite
def test_blob_path_exit_codes(storage: StorageClients, storage_conn: str, unique: str, invalid_file: Path) -> None:
    """blob://container/name reads through the same code: 0 valid, 1 invalid, 2 missing blob or bad URL."""
    store = BlobStore(storage.blobs)
    store.upload(TRAINING_CONTAINER, f"{unique}/good.jsonl", SAMPLE.read_bytes())
    store.upload(TRAINING_CONTAINER, f"{unique}/bad.jsonl", invalid_file.read_bytes())
    env = {"DataStorage": storage_conn}
    good = cli(f"blob://{TRAINING_CONTAINER}/{unique}/good.jsonl", "--json", env=env)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout) == validate_path(SAMPLE).to_dict()
    assert cli(f"blob://{TRAINING_CONTAINER}/{unique}/bad.jsonl", env=env).returncode == 1
    missing = cli(f"blob://{TRAINING_CONTAINER}/{unique}/none.jsonl", env=env)
    assert missing.returncode == 2
    assert "no such blob" in missing.stderr
    assert cli("blob://only-a-container", env=env).returncode == 2
    assert storage_conn not in missing.stderr + missing.stdout


@pytest.mark.azurite
def test_blob_chunks_give_the_file_report(storage: StorageClients, unique: str) -> None:
    """Streaming a blob through BlobStore.chunks gives exactly the local file's report (ingest's path)."""
    store = BlobStore(storage.blobs)
    data = b"\xef\xbb\xbf" + b"\r\n".join([*SAMPLE.read_bytes().splitlines(), b"", b"{"])
    store.upload(TRAINING_CONTAINER, f"{unique}.jsonl", data)
    from_blob = validate_chunks(store.chunks(TRAINING_CONTAINER, f"{unique}.jsonl"))
    assert from_blob.to_dict() == validate_chunks([data]).to_dict()
    assert from_blob.stats["bytes"] == len(data)
    assert from_blob.error_counts == {"invalid_json": 1}
