"""A byte stream as numbered lines, without ever holding more than a chunk and one unfinished line."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import chain, count

BOM = b"\xef\xbb\xbf"
SPLIT_BYTES = 256 * 1024


def iter_lines(chunks: Iterable[bytes], *, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Split a byte stream into `(line number, line)`; numbering is 1-based and counts blank lines.

    The line excludes its end (`\\n` or `\\r\\n`). A UTF-8 BOM at the very start is dropped. A last
    line without a newline is a line; nothing after the last newline is not. A line longer than
    `max_line_bytes` is yielded as None, and its bytes are dropped as they arrive, never buffered.
    Memory: one chunk plus at most `max_line_bytes + 1` bytes of an unfinished line.
    """
    for first, lines in line_batches(chunks, max_line_bytes=max_line_bytes):
        yield from zip(count(first), lines)


def line_batches(
    chunks: Iterable[bytes], *, max_line_bytes: int, bom: bool = True
) -> Iterator[tuple[int, list[bytes | None]]]:
    """The lines of `iter_lines`, a list per chunk: `(number of the first line, lines)`.

    `bom=False` keeps a leading BOM (for a stream that starts inside a file, not at its start).
    """
    lineno = 1  # number of the next line
    pending: list[bytes] = []  # pieces of the unfinished line that started in an earlier chunk
    pending_len = 0
    skipping = False  # the unfinished line is already over the limit: drop its bytes
    limit = max_line_bytes
    for chunk in _without_bom(chunks, strip=bom):
        pieces: list[bytes | None] = chunk.split(b"\n")  # type: ignore[assignment]
        tail: bytes = pieces.pop()  # type: ignore[assignment]
        if pieces:
            first: bytes | None
            if skipping:
                first = None
                skipping = False
            else:
                first = pieces[0]
                if pending:
                    pending.append(first)  # type: ignore[arg-type]
                    first = b"".join(pending)
                    pending = []
                    pending_len = 0
                if first[-1:] == b"\r":  # type: ignore[index]
                    first = first[:-1]  # type: ignore[index]
                if len(first) > limit:  # type: ignore[arg-type]
                    first = None
            if len(pieces) > 1:
                # pieces[0] is replaced below, so these passes may treat it like the others
                if b"\r" in chunk:
                    pieces = [p[:-1] if p[-1:] == b"\r" else p for p in pieces]  # type: ignore[index]
                if max(map(len, pieces)) > limit:  # type: ignore[arg-type]
                    pieces = [None if len(p) > limit else p for p in pieces]  # type: ignore[arg-type]
            pieces[0] = first
            yield lineno, pieces
            lineno += len(pieces)
        if tail and not skipping:
            pending_len += len(tail)
            if pending_len > limit + 1:  # +1: a CR before the LF is not part of the line
                skipping = True
                pending = []
                pending_len = 0
            else:
                pending.append(tail)
    if skipping:
        yield lineno, [None]
    elif pending:
        last = b"".join(pending)
        if last[-1:] == b"\r":
            last = last[:-1]
        yield lineno, [None if len(last) > limit else last]


def _without_bom(chunks: Iterable[bytes], *, strip: bool = True) -> Iterator[bytes]:
    """The stream without a leading BOM, in pieces of at most `SPLIT_BYTES` (splitting stays in cache)."""
    it = iter(chunks)
    head = b""
    for chunk in it:
        head += bytes(chunk)
        if len(head) >= len(BOM):
            break
    if strip and head.startswith(BOM):
        head = head[len(BOM) :]
    for chunk in chain((head,), it):
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        if len(chunk) <= SPLIT_BYTES:
            if chunk:
                yield chunk
        else:
            for start in range(0, len(chunk), SPLIT_BYTES):
                yield chunk[start : start + SPLIT_BYTES]
