"""Validator throughput and memory beside an orjson parse-only loop over the same file.

    .venv/bin/python bench/validate.py            # 200 MiB file
    .venv/bin/python bench/validate.py --mb 2048  # 2 GiB file

The file (`bench/out/validate-<N>mb.jsonl`, gitignored, reused when already there) repeats the rows
of `samples/*.jsonl`, each copy lightly perturbed (a varying prefix on one message) so that rows are
distinct and the duplicate check does real work. The file is read once before measuring, so that
every measurement finds it in the page cache. Each measurement runs in its own child process:
`validate_path` (`tunegrid.validate_files`) as the CLI runs it (on a big file: in parts, by as many
forked worker processes as usable CPUs, at most 4, while the child reads, hashes and merges), then
the same with `processes=1` (one process, plus its SHA-256 thread), then the single-threaded orjson
loop.
Peak RSS: the largest single process (`ru_maxrss` over `RUSAGE_CHILDREN`, read right after the
first child exits, before any other runs) and the sum over the child and its workers (sampled
every 20 ms with psutil). Throughput excludes interpreter start-up and imports; CPU seconds
include the workers'.
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
import psutil

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


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def child(kind: str, path: str) -> None:
    """Run one measurement in this (child) process and print its figures as JSON."""
    if kind in ("validate", "validate-1"):
        sys.path.insert(0, str(ROOT))
        from tunegrid.validate_files import planned_processes, validate_path

        processes = planned_processes(path) if kind == "validate" else 1
        start, cpu, workers_cpu = time.perf_counter(), time.process_time(), _children_cpu()
        report = validate_path(path, processes=processes)
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu + _children_cpu() - workers_cpu
        extra = {
            "processes": processes,
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


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # it just exited
            pass
    return total


def measure(kind: str, path: Path) -> tuple[dict[str, object], float, float]:
    """(the child's figures, the peak RSS of its largest process in MiB, the peak of its tree's sum in MiB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    tree_peak = 0
    watched = psutil.Process(proc.pid)
    while proc.poll() is None:
        tree_peak = max(tree_peak, _tree_rss(watched))
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{stderr}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, max over waited children
    if kind == "validate" and peak_kib <= before:
        raise SystemExit("validate must be the first child measured (ru_maxrss is a running maximum)")
    return json.loads(stdout.strip().splitlines()[-1]), peak_kib / 1024, tree_peak / MIB


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

    with path.open("rb") as f:  # into the page cache, for every measurement alike
        while f.read(8 * MIB):
            pass

    validated, peak_rss_mb, tree_rss_mb = measure("validate", path)
    single, _, single_rss_mb = measure("validate-1", path)
    parsed, _, _ = measure("orjson", path)
    processes = int(validated["processes"])  # type: ignore[call-overload]
    mb_per_s = file_mb / float(validated["seconds"])  # type: ignore[arg-type]
    single_mb_per_s = file_mb / float(single["seconds"])  # type: ignore[arg-type]
    orjson_mb_per_s = file_mb / float(parsed["seconds"])  # type: ignore[arg-type]
    how = f"{processes} worker processes + the merging parent" if processes > 1 else "1 process + its SHA-256 thread"
    print(f"CPUs usable: {len(os.sched_getaffinity(0))}; validate_path used {how}")
    print(
        f"validator:   {mb_per_s:8.1f} MiB/s  ({validated['seconds']:.2f} s, {validated['rows']} rows, "
        f"valid={validated['valid']}, {how})"
    )
    print(f"1 process:   {single_mb_per_s:8.1f} MiB/s  ({single['seconds']:.2f} s, validate_path(processes=1))")
    print(f"orjson only: {orjson_mb_per_s:8.1f} MiB/s  ({parsed['seconds']:.2f} s, one thread)")
    print(f"ratio:       {mb_per_s / orjson_mb_per_s:8.2f}  (target >= 0.6; {how})")
    print(f"ratio, 1 process: {single_mb_per_s / orjson_mb_per_s:3.2f}")
    cpu_ratio = float(parsed["cpu_seconds"]) / float(validated["cpu_seconds"])  # type: ignore[arg-type]
    single_cpu_ratio = float(parsed["cpu_seconds"]) / float(single["cpu_seconds"])  # type: ignore[arg-type]
    print(
        f"cpu ratio:   {cpu_ratio:8.2f}  (orjson CPU s / validator CPU s, all its threads and processes; "
        f"1 process: {single_cpu_ratio:.2f})"
    )
    print(
        f"peak RSS:    {peak_rss_mb:8.1f} MiB  (largest single process; target < 200 on a 2 GB file); "
        f"all processes together: {tree_rss_mb:.1f} MiB (sampled); 1 process: {single_rss_mb:.1f} MiB (sampled)"
    )
    print(f"warnings:    {validated['warning_counts']}; duplicate check: {validated['duplicate_check']}")
    if single["warning_counts"] != validated["warning_counts"] or single["rows"] != validated["rows"]:
        raise SystemExit("the one-process and the parallel validation disagree")
    figures = {
        "mb_per_s": round(mb_per_s, 1),
        "orjson_mb_per_s": round(orjson_mb_per_s, 1),
        "ratio": round(mb_per_s / orjson_mb_per_s, 3),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "file_mb": round(file_mb, 1),
        "processes": processes,
        "peak_rss_all_processes_mb": round(tree_rss_mb, 1),
        "single_process_mb_per_s": round(single_mb_per_s, 1),
        "single_process_ratio": round(single_mb_per_s / orjson_mb_per_s, 3),
    }
    print("VALIDATE_BENCH " + json.dumps(figures))


if __name__ == "__main__":
    main()
