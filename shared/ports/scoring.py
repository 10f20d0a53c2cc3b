"""Ports of the scoring proxy and of every other endpoint caller (the roll-out's smoke test): the call to
a live deployment and the usage sink."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class UpstreamReply:
    status: int
    body: bytes
    retry_after: float | None = None
    content_type: str = ""


class UpstreamAnswer(Protocol):
    """An endpoint's answer whose head has arrived. `streamed` says whether the body is a stream of
    NDJSON events (read with `lines()`) or one piece (read with `read()`)."""

    status: int
    content_type: str
    retry_after: float | None

    @property
    def streamed(self) -> bool: ...

    async def read(self) -> bytes: ...

    def lines(self) -> AsyncIterator[bytes]: ...


class Upstream(Protocol):
    """Calls to a live deployment (key handling, pooling and the 401 refresh are the adapter's)."""

    async def post_json(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> UpstreamReply: ...

    def open_stream(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> AbstractAsyncContextManager[UpstreamAnswer]:
        """POST asking for a streamed answer (an upstream that cannot stream answers in one piece).
        Leaving the block before the end closes the connection, which stops the upstream's generation."""
        ...

    def post_json_blocking(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> UpstreamReply:
        """`post_json` for synchronous callers (the roll-out runs in worker threads)."""
        ...


class UsageSink(Protocol):
    def record(self, endpoint: str) -> None: ...
