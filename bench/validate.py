"""Validator throughput and memory beside an orjson parse-only loop over the same file.

    .venv/bin/python bench/validate.py            # 200 MiB file
    .venv/bin/python bench/validate.py --mb 2048  # 2 GiB file

The file (`bench/out/validate-<N>mb.jsonl`, gitignored, reused when already there) repeats the rows
of `samples/*.jsonl`, each copy lightly perturbed (a varying prefix on one message) so that rows are
distinct and the duplicate check does real work. Each measurement runs in its own child process:
the validator's peak RSS is that child's `ru_maxrss` (`RUSAGE_CHILDREN`, read right after it exits,
before any other child runs). Throughput excludes interpreter start-up and imports.
Targets (issue 2): ratio >= 0.6 of the parse-only throughput; peak RSS < 200 MB on a 2 GB file.
The last line is `VALIDATE_BENCH {json}`; MB here means MiB (2**20 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
MIB = 1 << 20


def generate(path: Path, mb: int, *, seed: int = 7) -> None:
    """Write about `mb` MiB of perturbed sample rows (atomic rename, so a killed run leaves no half file).

    Rows keep their original formatting; each copy gets a distinct prefix on its first content.
    """
    lines = [
        line for p in sorted((ROOT / "samples").glob("*.jsonl")) for line in p.read_bytes().splitlines() if line.strip()
    ]
    rnd = random.Random(seed)
    target = mb * MIB
    tmp = path.with_suffix(".tmp")
    written = 0
    copy = 0
    next_report = 256 * MIB
    with tmp.open("wb") as f:
        while written < target:
            copy += 1
            block = b"".join(
                line.replace(b'"content": "', b'"content": "[%d.%d] ' % (copy, rnd.randrange(1_000_000)), 1) + b"\n"
                for line in lines
            )
            f.write(block)
            written += len(block)
            if written >= next_report:
                print(f"  generating {path.name}: {written // MIB}/{mb} MiB", file=sys.stderr, flush=True)
                next_report += 256 * MIB
    print(f"  generated {path.name}: {written / MIB:.0f} MiB", file=sys.stderr)
    os.replace(tmp, path)


def child(kind: str, path: str) -> None:
    """Run one measurement in this (child) process and print its figures as JSON."""
    if kind == "validate":
        sys.path.insert(0, str(ROOT))
        from shared.validation import validate_path

        start, cpu = time.perf_counter(), time.process_time()
        report = validate_path(path)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        extra = {
            "cpu_seconds": cpu,
            "valid": report.valid,
            "rows": report.rows,
            "warning_counts": report.warning_counts,
            "duplicate_check": report.stats["duplicate_check"],
        }
    else:
        start, cpu = time.perf_counter(), time.process_time()
        rows = 0
        with open(path, "rb") as f:
            for line in f:
                orjson.loads(line)
                rows += 1
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        extra = {"cpu_seconds": cpu, "rows": rows}
    print(json.dumps({"seconds": seconds, **extra}))


def measure(kind: str, path: Path) -> tuple[dict[str, object], float]:
    """(the child's figures, the child's peak RSS in MiB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(path)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, max over waited children
    if kind == "validate" and peak_kib <= before:
        raise SystemExit("validate must be the first child measured (ru_maxrss is a running maximum)")
    return json.loads(proc.stdout.strip().splitlines()[-1]), peak_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=200, help="size of the generated file in MiB (default 200)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"validate-{args.mb}mb.jsonl"
    if not path.exists():
        generate(path, args.mb)
    size = path.stat().st_size
    file_mb = size / MIB
    print(f"file: {path} ({file_mb:.1f} MiB)")

    validated, peak_rss_mb = measure("validate", path)
    parsed, _ = measure("orjson", path)
    mb_per_s = file_mb / float(validated["seconds"])  # type: ignore[arg-type]
    orjson_mb_per_s = file_mb / float(parsed["seconds"])  # type: ignore[arg-type]
    print(
        f"validator:   {mb_per_s:8.1f} MiB/s  ({validated['seconds']:.2f} s, {validated['rows']} rows, valid={validated['valid']})"
    )
    print(f"orjson only: {orjson_mb_per_s:8.1f} MiB/s  ({parsed['seconds']:.2f} s)")
    print(f"ratio:       {mb_per_s / orjson_mb_per_s:8.2f}  (target >= 0.6)")
    cpu_ratio = float(parsed["cpu_seconds"]) / float(validated["cpu_seconds"])  # type: ignore[arg-type]
    print(f"cpu ratio:   {cpu_ratio:8.2f}  (CPU seconds, both threads; steadier than wall time on a busy machine)")
    print(f"peak RSS:    {peak_rss_mb:8.1f} MiB  (validator process; target < 200 on a 2 GB file)")
    print(f"warnings:    {validated['warning_counts']}; duplicate check: {validated['duplicate_check']}")
    figures = {
        "mb_per_s": round(mb_per_s, 1),
        "orjson_mb_per_s": round(orjson_mb_per_s, 1),
        "ratio": round(mb_per_s / orjson_mb_per_s, 3),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "file_mb": round(file_mb, 1),
    }
    print("VALIDATE_BENCH " + json.dumps(figures))


if __name__ == "__main__":
    main()
