"""The README's main command, on the tiny model: the whole loop end to end, as `make demo` runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_the_whole_loop_on_the_tiny_model(tmp_path: Path) -> None:
    """Upload -> report -> fine-tune -> live -> openai answer -> janitor deletes: one DEMO_RESULT line.

    Greedy decoding (temperature 0) for the question, as the smoke test does: a barely trained random
    model may sample an empty answer, which the rollout rightly refuses."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunegrid",
            "demo",
            "--model",
            "tiny-phi3",
            "--max-steps",
            "6",
            "--max-seq-length",
            "512",
            "--temperature",
            "0",
            "--workdir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:] + (tmp_path / "demo.log").read_text()[-5000:]
    [line] = [ln for ln in out.splitlines() if ln.startswith("DEMO_RESULT ")]
    result = json.loads(line.removeprefix("DEMO_RESULT "))
    assert list(result["stages"]) == [
        "validated",
        "submitted",
        "training",
        "completed",
        "registered",
        "deploying",
        "smoke-tested",
        "live",
        "answered",
    ]
    assert result["answer"].strip()
    assert result["deleted_endpoints"] == [result["endpoint"]]
    assert result["total_seconds"] == result["stages"]["answered"]
    for stage in (
        "validated",
        "submitted",
        "training step",
        "completed",
        "registered",
        "deploying",
        "smoke-tested",
        "live",
        "invalid_json",
        "unknown_role",
    ):
        assert stage in out, stage
    proxy_key = re.compile(r"demo-[A-Za-z0-9_-]{32}")
    assert not proxy_key.search(out + proc.stderr + (tmp_path / "demo.log").read_text())
