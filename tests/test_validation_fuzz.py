"""Fuzzing the validator: it never raises, and neither chunking nor the fast path changes a report."""

from __future__ import annotations

import itertools
import json
import tempfile
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tunegrid.validate_files as validate_files
from shared.domain.validation import ValidationOptions, fastpath, validate_chunks

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OPTIONS = ValidationOptions(max_line_bytes=400, max_seq_length=40, min_rows=2)


class WordCounter:
    """A hand-written `TokenCounter`: a token is a whitespace-separated word."""

    name = "words"
    note = "exact: words"
    template_failures = 0

    def count(self, roles: Sequence[str], contents: Sequence[str], assistant_slice: slice) -> tuple[int, int]:
        return sum(len(c.split()) for c in contents), sum(len(c.split()) for c in contents[assistant_slice])


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def in_parts(data: bytes, options: ValidationOptions, *, part_bytes: int, processes: int = 1) -> dict:
    """The report of `data` as a file validated in parts of about `part_bytes` (merged in this process)."""
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        return validate_files._validate_in_parts(f, options, processes=processes, part_bytes=part_bytes).to_dict()


def reports_agree(data: bytes, cuts: list[int], options: ValidationOptions = OPTIONS) -> dict:
    """The report of one chunk; the same for random chunks, for the slow path alone, and in file parts."""
    whole = validate_chunks([data], options).to_dict()
    json.dumps(whole)  # the report is always plain JSON
    assert validate_chunks(chunked(data, cuts), options).to_dict() == whole
    fastpath._use_fast_path = False
    try:
        assert validate_chunks(chunked(data, cuts[::-1]), options).to_dict() == whole
    finally:
        fastpath._use_fast_path = True
    parts = in_parts(data, options, part_bytes=1 + (cuts[0] if cuts else len(data)) % 300)
    assert json.dumps(parts) == json.dumps(whole)  # the same, down to the order of the counts
    return whole


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "tool", "User", ""]) | json_values
contents = (
    st.sampled_from(["hi", "hello there", "", "  ", "日本語のテキスト", "x" * 300]) | st.text(max_size=20) | json_values
)
messages = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": contents}),
    st.fixed_dictionaries(
        {"role": roles, "content": contents},
        optional={"name": json_values, "weight": st.sampled_from([0, 1, 2, True, None, 0.5]), "extra": json_values},
    ),
    json_values,
)
good_messages = st.lists(
    st.tuples(st.sampled_from(["hi", "how?", "fine", "¿qué tal?"]), st.sampled_from(["yes", "no", "maybe, 😀"])),
    min_size=1,
    max_size=4,
).map(
    lambda turns: [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
)
rows = st.one_of(
    good_messages.map(lambda m: {"messages": m}),
    good_messages.map(lambda m: {"messages": [{"role": "system", "content": "be brief"}, *m]}),
    st.fixed_dictionaries(
        {"messages": st.lists(messages, max_size=5)},
        optional={"prompt": json_values, "tools": json_values, "id": json_values},
    ),
    json_values,
)


def encode(row: object, style: int) -> bytes:
    if style == 0:
        return orjson.dumps(row)
    if style == 1:
        return json.dumps(row, ensure_ascii=True).encode()
    return json.dumps(row, ensure_ascii=False, indent=None, separators=(" , ", " : ")).encode()


@settings(FUZZ, max_examples=300)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    """Any bytes give a report, identical whatever the chunking and the path taken."""
    report = reports_agree(data, cuts)
    assert report["valid"] == (not report["error_counts"])


@FUZZ
@given(
    rows=st.lists(st.tuples(rows, st.integers(0, 2)), max_size=25),
    separators=st.lists(st.sampled_from([b"\n", b"\r\n", b"\n\n", b"\n \n"]), min_size=1, max_size=3),
    bom=st.booleans(),
    final_newline=st.booleans(),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_json_rows_never_raise(
    rows: list[tuple[object, int]], separators: list[bytes], bom: bool, final_newline: bool, cuts: list[int]
) -> None:
    """Arbitrary JSON rows, well-formed or not, in any layout: same report for any chunking, counts add up."""
    lines = [encode(row, style) for row, style in rows]
    body = b"".join(line + separators[i % len(separators)] for i, line in enumerate(lines))
    if not final_newline:
        body = body.rstrip(b"\r\n")
    report = reports_agree((b"\xef\xbb\xbf" if bom else b"") + body, cuts)
    assert report["rows"] == len(lines)
    assert 0 <= report["valid_rows"] <= report["rows"]
    assert sum(report["error_counts"].values()) >= len(report["errors"])
    if report["valid_rows"]:
        stats = report["stats"]
        assert stats["tokens_per_row"]["min"] <= stats["tokens_per_row"]["p95"] <= stats["tokens_per_row"]["max"]


@FUZZ
@given(
    picks=st.lists(st.integers(min_value=0, max_value=1227), min_size=1, max_size=60),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_sample_rows_in_any_chunking(picks: list[int], cuts: list[int]) -> None:
    """Real rows (with repeats, so duplicates) split at random points give one and the same report."""
    pool = [line for p in sorted(SAMPLES.glob("*.jsonl")) for line in p.read_bytes().splitlines()]
    data = b"\n".join(pool[i % len(pool)] for i in picks)
    report = reports_agree(data, cuts, ValidationOptions(min_rows=2))
    assert report["error_counts"] == ({} if len(picks) >= 2 else {"too_few_rows": 1})
    assert report["warning_counts"].get("duplicate_row", 0) == len(picks) - len({i % len(pool) for i in picks})


valid_rows = st.one_of(
    good_messages.map(lambda m: {"messages": m}),
    good_messages.map(lambda m: {"messages": [{"role": "system", "content": "be brief"}, *m]}),
    good_messages.map(lambda m: {"messages": [*m, {"role": "user", "content": "and?"}]}),  # last_not_assistant
    st.tuples(good_messages, st.text(max_size=60), st.text(max_size=10)).map(
        lambda t: {"prompt": t[1], "prompt_id": t[2], "messages": t[0]}
    ),
    st.tuples(good_messages, json_values).map(lambda t: {"messages": t[0], "tools": t[1]}),
    good_messages.map(lambda m: {"messages": [*m[:-1], {**m[-1], "content": m[-1]["content"] * 30}]}),  # too_long
)


@FUZZ
@given(
    rows=st.lists(st.tuples(valid_rows, st.integers(0, 2)), min_size=1, max_size=200),
    repeats=st.lists(st.integers(min_value=0), max_size=10),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_fast_path_matches_slow_path(rows: list[tuple[object, int]], repeats: list[int], cuts: list[int]) -> None:
    """Mostly valid rows (the batches the fast path takes), with repeats: the slow path agrees on everything."""
    lines = [encode(row, style) for row, style in rows]
    lines += [lines[r % len(lines)] for r in repeats]
    report = reports_agree(b"\n".join(lines), cuts, ValidationOptions(max_seq_length=40, min_rows=2))
    assert report["valid_rows"] == len(lines)


@FUZZ
@given(
    rows=st.lists(st.tuples(rows | valid_rows, st.integers(0, 2)), min_size=1, max_size=60),
    repeats=st.lists(st.integers(min_value=0), max_size=20),
    order=st.randoms(use_true_random=False),
    part_bytes=st.integers(min_value=1, max_value=400),
    cap=st.integers(min_value=0, max_value=4),
    tracked=st.integers(min_value=0, max_value=8),
)
def test_parts_merge_like_one_pass(
    rows: list[tuple[object, int]], repeats: list[int], order: object, part_bytes: int, cap: int, tracked: int
) -> None:
    """A file validated in parts, with small caps on the lists and on duplicate tracking: the one-pass report."""
    lines = [encode(row, style) for row, style in rows]
    lines += [lines[r % len(lines)] for r in repeats]
    order.shuffle(lines)  # type: ignore[attr-defined]
    data = b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n\n"
    options = ValidationOptions(
        max_line_bytes=400, max_seq_length=40, min_rows=2, max_listed_errors=cap, duplicate_tracking_rows=tracked
    )
    whole = validate_chunks([data], options).to_dict()
    assert json.dumps(in_parts(data, options, part_bytes=part_bytes)) == json.dumps(whole)


@pytest.mark.parametrize("processes", [2, 3])
def test_forked_workers_give_the_one_pass_report(tmp_path: Path, processes: int) -> None:
    """Workers forked over small parts of a file with every kind of line: the same report, in the same order."""
    pool = [line for p in sorted(SAMPLES.glob("*.jsonl")) for line in p.read_bytes().splitlines()]
    bad = [b"", b"{", b"[1]", b'{"messages": []}', b"x" * 5000, b'{"messages": [{"role": "tool", "content": 1}]}']
    lines = [pool[(i * 7) % 97] if i % 5 else bad[i % len(bad)] for i in range(600)]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines))
    options = ValidationOptions(max_line_bytes=4096, max_listed_errors=50)
    whole = validate_chunks([path.read_bytes()], options).to_dict()
    assert whole["warning_counts"]["duplicate_row"] > 50  # the merge lists duplicates, then only counts them
    with path.open("rb") as f:
        forked = validate_files._validate_in_parts(f, options, processes=processes, part_bytes=20_000).to_dict()
    assert json.dumps(forked) == json.dumps(whole)
    assert validate_files.validate_path(path, options, processes=processes).to_dict() == whole


def test_a_failed_worker_costs_nothing_but_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers that die without sending anything: this process validates their parts, same report."""

    def die(path: str, bounds: object, options: object, conn: object) -> None:
        raise SystemExit(3)

    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(line for p in sorted(SAMPLES.glob("*.jsonl")) for line in p.read_bytes().splitlines()))
    monkeypatch.setattr(validate_files, "_work_on_parts", die)
    with path.open("rb") as f:
        report = validate_files._validate_in_parts(f, ValidationOptions(), processes=2, part_bytes=50_000)
    assert report.to_dict() == validate_chunks([path.read_bytes()]).to_dict()


def test_planned_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small files, a tokenizer or a single CPU keep one process; a big file gets one per CPU (at most 4)."""
    small = tmp_path / "small.jsonl"
    small.write_bytes(b"{}\n")
    assert validate_files.planned_processes(small) == 1
    monkeypatch.setattr(validate_files, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr(validate_files, "_usable_cpus", lambda: 8)
    # other tests of the session may have left threads running; forking is refused then
    monkeypatch.setattr(validate_files.threading, "active_count", lambda: 2)
    assert validate_files.planned_processes(small) == 1
    monkeypatch.setattr(validate_files.threading, "active_count", lambda: 1)
    assert validate_files.planned_processes(small) == validate_files.MAX_PROCESSES
    assert validate_files.planned_processes(small, ValidationOptions(token_counter=WordCounter())) == 1
    monkeypatch.setattr(validate_files, "_usable_cpus", lambda: 1)
    assert validate_files.planned_processes(small) == 1


@pytest.mark.slow
def test_streaming_memory_stays_small() -> None:
    """About 50 MB fed from a generator (never held whole) validates with a small traced peak."""
    lines = [line for p in sorted(SAMPLES.glob("*.jsonl")) for line in p.read_bytes().splitlines()]
    target = 50 * 1024 * 1024
    produced = 0

    def stream() -> Iterator[bytes]:
        nonlocal produced
        copy = 0
        while produced < target:
            copy += 1
            block = b"".join(line.replace(b'"content": "', b'"content": "%d ' % copy, 1) + b"\n" for line in lines)
            for i in range(0, len(block), 256 * 1024):
                piece = block[i : i + 256 * 1024]
                produced += len(piece)
                yield piece

    tracemalloc.start()
    try:
        report = validate_chunks(stream())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert produced >= target
    assert report.valid
    assert report.stats["bytes"] == produced
    assert report.warning_counts == {}
    assert peak < 16 * 1024 * 1024, f"traced peak {peak / 1e6:.1f} MB"
