"""The SHA-256 of the raw stream, and the one-pass validation of a stream (`validate_chunks`)."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Iterable, Iterator

from shared.domain.validation.lines import line_batches
from shared.domain.validation.report import ValidationOptions, ValidationReport
from shared.domain.validation.run import _Run

_HASH_ON_A_THREAD = len(os.sched_getaffinity(0)) > 1 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) > 1
_DEFAULTS = ValidationOptions()  # frozen: one shared default is safe


class _Digest:
    """SHA-256 of the raw stream, computed on a second thread when the stream is big and a second core exists.

    hashlib releases the GIL on large updates, so on a machine with a spare core the digest costs
    the validation nothing; chunks go over in lists of about 1 MiB, through a bounded queue.
    """

    PIECE = 1 << 20

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._queue: queue.Queue[list[bytes] | None] | None = None
        self._thread: threading.Thread | None = None

    def update(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._pending_len += len(chunk)
        if self._pending_len >= self.PIECE:
            self._send(self._pending)
            self._pending, self._pending_len = [], 0

    def _send(self, pieces: list[bytes]) -> None:
        if not _HASH_ON_A_THREAD:
            for piece in pieces:
                self._sha.update(piece)
            return
        if self._queue is None:
            self._queue = queue.Queue(maxsize=8)
            self._thread = threading.Thread(target=self._work, name="validation-sha256", daemon=True)
            self._thread.start()
        self._queue.put(pieces)

    def _work(self) -> None:
        assert self._queue is not None
        while (pieces := self._queue.get()) is not None:
            for piece in pieces:
                self._sha.update(piece)

    def close(self) -> None:
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None

    def hexdigest(self) -> str:
        self.close()
        for piece in self._pending:
            self._sha.update(piece)
        self._pending = []
        return self._sha.hexdigest()


def validate_chunks(chunks: Iterable[bytes], options: ValidationOptions = _DEFAULTS) -> ValidationReport:
    """Validate a JSONL stream given as byte chunks of any size (chunking never changes the report)."""
    run = _Run(options)
    digest = _Digest()
    size = 0

    def metered() -> Iterator[bytes]:
        nonlocal size
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
            yield chunk

    try:
        for first, lines in line_batches(metered(), max_line_bytes=options.max_line_bytes):
            run.feed(first, lines)
    finally:
        digest.close()
    return run.report(size=size, sha256=digest.hexdigest())
