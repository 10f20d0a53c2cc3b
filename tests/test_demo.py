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
        "gate",
        "live",
        "answered",
    ]
    assert result["answer"].strip()
    # the time estimate before submission (the local backend has no bill), learnt from the first run for the second
    assert result["estimate"].startswith("about ") and "on this machine at" in result["estimate"]
    assert "estimate before submission: about " in out
    second = result["second"]
    assert second["throughput_source"].startswith("median of 1 earlier run on local-")
    # the second version's model went through the gate against the live one: both scores, printed
    gate = second["gate"]
    assert gate["rows"] == min(4, second["test_rows"]) and gate["rows"] >= 1  # GATE_ROWS=4, or the whole test split
    assert gate["new"]["rouge_l"] is not None and gate["live"]["rouge_l"] is not None
    assert second["state"] == ("live" if gate["verdict"] == "promoted" else "rolled-back")
    assert f"new ROUGE-L {gate['new']['rouge_l']} vs live {gate['live']['rouge_l']}" in out and "reference: " in out
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
        "gate",
        "live",
        "invalid_json",
        "unknown_role",
    ):
        assert stage in out, stage
    # every state change reached the demo's webhook subscriber as a run event, in order
    assert result["events"][: len(result["timeline"])] == result["timeline"] and result["timeline"][-1] == "live"
    assert "event Tunegrid.Run.Received" in out and "event Tunegrid.Run.Live" in out
    proxy_key = re.compile(r"demo-[A-Za-z0-9_-]{32}")
    assert not proxy_key.search(out + proc.stderr + (tmp_path / "demo.log").read_text())
    # the second run's page: its address is printed (key left out) and a copy is saved, with the stages, the loss
    # curve and the gate's two scores
    page = Path(result["run_page"])
    assert f"/api/runs/{second['run_id']}?code=<host key>" in out and str(page) in out
    html = page.read_text(encoding="utf-8")
    assert second["run_id"] in html and 'id="loss-curve"' in html and result["endpoint"] in html
    assert 'id="gate-new"' in html and 'id="gate-live"' in html and 'id="estimate"' in html
    keys = json.loads((tmp_path / "devhost" / "keys.json").read_text())
    secrets = [v for v in _strings(keys) if len(v) >= 16]
    assert secrets and not any(secret in html or secret in out for secret in secrets)
    assert not proxy_key.search(html)


def _strings(value: object) -> list[str]:
    """Every string inside a JSON document (the dev host's keys file)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []
