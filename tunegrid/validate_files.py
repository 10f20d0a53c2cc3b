"""Validating a local file: the CLI's `validate PATH`, `submit` and the bench (never the deployed app).

The deployed ingest streams a blob through the one-pass `validate_chunks`; this module adds what only
a local file allows: a big regular file is validated in parts by forked worker processes and merged
(`_Run.merge`, in the domain) into exactly the one-pass report.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat
import sys
import threading
from collections.abc import Iterable, Iterator
from functools import partial
from itertools import pairwise
from multiprocessing.connection import Connection
from pathlib import Path
from typing import BinaryIO

from shared.domain.validation import ValidationOptions, ValidationReport, fastpath, line_batches, validate_chunks
from shared.domain.validation.rows import _RolePattern
from shared.domain.validation.run import _Part, _Run

READ_CHUNK_BYTES = 256 * 1024
_DEFAULTS = ValidationOptions()  # frozen: one shared default is safe


def validate_path(
    path: str | Path, options: ValidationOptions = _DEFAULTS, *, processes: int | None = None
) -> ValidationReport:
    """Validate a local file, read in chunks. Raises OSError when it cannot be read.

    With `processes` > 1 (None: `planned_processes`), a regular file is validated in parts by that
    many forked worker processes while this one reads, hashes and merges; 1 is one pass here. The
    report is the same whatever the processes.
    """
    with Path(path).open("rb") as f:
        n = planned_processes(f, options) if processes is None else max(1, processes)
        if n > 1 and options.token_counter is None and _is_regular(f):
            return _validate_in_parts(f, options, processes=n)
        return validate_chunks(iter(partial(f.read, READ_CHUNK_BYTES), b""), options)


# ------------------------------------------------------------------------------- parallel (a file)
#
# A regular file can be cut into parts at line starts and the parts validated on their own, each
# numbering its lines from 1 and keeping its valid rows' duplicate keys instead of checking them
# (`_Run(defer_duplicates=True)`). This process merges the parts in file order (`_Run.merge`): it
# adds the counts, renumbers the issues, checks the duplicate keys against all earlier rows and puts
# each duplicate warning where one pass puts it, so the report is the one `validate_chunks` gives.
# It also reads the whole file once, in order, for the size and the SHA-256. Parts go round-robin to
# worker processes forked at the start (each reads its parts from the inherited file descriptor; a
# fork shares this process's str hash secret, so the duplicate keys agree); a worker is at most about
# one part ahead (a part's result does not fit in the pipe until this process takes it), so memory
# stays bounded. A worker that fails costs speed, not the report: this process redoes its part.

PART_BYTES = 4 * 1024 * 1024
PARALLEL_MIN_BYTES = 32 * 1024 * 1024
MAX_PROCESSES = 4


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover


def _is_regular(f: BinaryIO) -> bool:
    try:
        return stat.S_ISREG(os.fstat(f.fileno()).st_mode)
    except (OSError, ValueError):  # pragma: no cover - not a real file
        return False


def planned_processes(f: BinaryIO | str | Path, options: ValidationOptions = _DEFAULTS) -> int:
    """How many processes validate this file in `validate_path`: one (this one), unless the file is big
    (>= 32 MiB), no tokenizer is configured, workers can be forked (Linux, no other thread running
    here) and more than one CPU is usable; then one worker per usable CPU, at most 4 (this process
    then reads the file for the digest and merges)."""
    if options.token_counter is not None or not fastpath._use_fast_path or fastpath._decode_row is None:
        return 1
    if "fork" not in multiprocessing.get_all_start_methods() or threading.active_count() > 1:
        return 1
    try:
        size = Path(f).stat().st_size if isinstance(f, (str, Path)) else os.fstat(f.fileno()).st_size
    except (OSError, ValueError):
        return 1
    if size < PARALLEL_MIN_BYTES:
        return 1
    return max(1, min(_usable_cpus(), MAX_PROCESSES))


def _part_bounds(fd: int, size: int, part_bytes: int) -> list[tuple[int, int]]:
    """Cut [0, size) into ranges of about `part_bytes` that start at a line start (just after a newline)."""
    starts = [0]
    nominal = part_bytes
    while nominal < size:
        pos = nominal - 1
        found = -1
        while found < 0:
            block = os.pread(fd, READ_CHUNK_BYTES, pos)
            if not block:
                break
            at = block.find(b"\n")
            if at >= 0:
                found = pos + at
            pos += len(block)
        if found < 0 or found + 1 >= size:
            break
        starts.append(found + 1)
        nominal = found + 1 + part_bytes
    return list(pairwise([*starts, size]))


def _read_range(fd: int, start: int, end: int) -> Iterator[bytes]:
    """The bytes [start, end) of an open file, in chunks (`pread`: the file's offset is left alone)."""
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(READ_CHUNK_BYTES, end - pos), pos)
        if not chunk:
            return
        pos += len(chunk)
        yield chunk


def _validate_part(
    chunks: Iterable[bytes],
    options: ValidationOptions,
    *,
    at_start: bool,
    patterns: dict[tuple[str, ...], _RolePattern],
) -> _Part:
    run = _Run(options, defer_duplicates=True, patterns=patterns)
    lines = 0
    for first, batch in line_batches(chunks, max_line_bytes=options.max_line_bytes, bom=at_start):
        run.feed(first, batch)
        lines = first + len(batch) - 1
    return run.part(lines)


def _work_on_parts(fd: int, bounds: list[tuple[int, int]], options: ValidationOptions, conn: Connection) -> None:
    """A worker: validate these parts of the file (open as `fd`, inherited) in order and send each outcome."""
    patterns: dict[tuple[str, ...], _RolePattern] = {}
    try:
        for start, end in bounds:
            conn.send(_validate_part(_read_range(fd, start, end), options, at_start=start == 0, patterns=patterns))
    except Exception:  # any failure (a read error, a broken pipe): the parent redoes what it did not get
        return
    finally:
        conn.close()


def _validate_in_parts(
    f: BinaryIO, options: ValidationOptions, *, processes: int, part_bytes: int = PART_BYTES
) -> ValidationReport:
    """Validate an open regular file in parts, by `processes` forked workers (1: all here, still in parts).

    With workers, this process only reads the file for the digest and merges what they send.
    """
    fd = f.fileno()
    size = os.fstat(fd).st_size
    bounds = _part_bounds(fd, size, max(1, part_bytes))
    n = max(1, min(processes, len(bounds)))
    if "fork" not in multiprocessing.get_all_start_methods():  # pragma: no cover - Windows
        n = 1
    owners = [0] * len(bounds) if n == 1 else [1 + k % n for k in range(len(bounds))]  # 0: this process
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    alive = [True] * (n + 1)
    if n > 1:
        for stream in (sys.stdout, sys.stderr):  # a forked worker flushes its copy of what is pending
            if stream is not None:
                stream.flush()
        context = multiprocessing.get_context("fork")
        for w in range(1, n + 1):
            receive, send = context.Pipe(duplex=False)
            mine = [b for b, owner in zip(bounds, owners, strict=True) if owner == w]
            proc = context.Process(
                target=_work_on_parts, args=(fd, mine, options, send), name=f"validation-part-{w}", daemon=True
            )
            proc.start()
            send.close()
            workers.append((proc, receive))
    run = _Run(options)
    sha = hashlib.sha256()
    patterns: dict[tuple[str, ...], _RolePattern] = {}
    offset = 0
    read = 0

    def digested(chunks: Iterator[bytes]) -> Iterator[bytes]:
        nonlocal read
        for chunk in chunks:
            sha.update(chunk)
            read += len(chunk)
            yield chunk

    try:
        for (start, end), owner in zip(bounds, owners, strict=True):
            part: _Part | None = None
            if owner == 0:
                part = _validate_part(
                    digested(_read_range(fd, start, end)), options, at_start=start == 0, patterns=patterns
                )
            else:
                for _ in digested(_read_range(fd, start, end)):  # while the worker validates it
                    pass
                if alive[owner]:
                    try:
                        part = workers[owner - 1][1].recv()
                    except (EOFError, OSError):
                        alive[owner] = False
                if part is None:
                    part = _validate_part(_read_range(fd, start, end), options, at_start=start == 0, patterns=patterns)
            run.merge(part, offset)
            offset += part.lines
    finally:
        for worker, conn in workers:
            conn.close()
            worker.join(timeout=5)
            if worker.is_alive():  # pragma: no cover - it was blocked on a pipe nobody reads
                worker.terminate()
                worker.join()
    return run.report(size=read, sha256=sha.hexdigest())
