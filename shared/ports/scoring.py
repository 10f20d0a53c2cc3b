"""Ports of the scoring proxy: the upstream call to a live deployment and the usage sink."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class UpstreamReply:
    status: int
    body: bytes
    retry_after: float | None = None
    content_type: str = ""


class Upstream(Protocol):
    """POST a JSON body to a live deployment (key handling, pooling and 401 refresh are the adapter's)."""

    async def post_json(
        self, endpoint: str, deployment: str, body: bytes, *, request_id: str, timeout_s: float
    ) -> UpstreamReply: ...


class UsageSink(Protocol):
    def record(self, endpoint: str) -> None: ...
