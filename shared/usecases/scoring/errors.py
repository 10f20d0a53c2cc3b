"""The scoring proxy's refusals. `functions/chat.py` maps each to its HTTP status and OpenAI error type."""

from __future__ import annotations

from shared.errors import InvalidInput, NotFound, TransientError, TunegridError, UpstreamError


class InvalidRequest(InvalidInput):
    """A request we refuse with 400; `param` names the offending field (OpenAI's error.param)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class PayloadTooLarge(InvalidInput):
    """The body is larger than PROXY_MAX_BODY_BYTES (413)."""


class Unauthorized(TunegridError):
    """Missing or wrong API key (401). The message never repeats what was sent."""


class ModelNotFound(NotFound):
    """The requested model or run is not live (404)."""


class NoLiveModel(TransientError):
    """Nothing is deployed yet, or the ledger cannot be read (503)."""


class UpstreamRejected(UpstreamError):
    """The endpoint refused the translated request as invalid (mapped to 400: the caller can fix it)."""


class UpstreamBusy(UpstreamError):
    """429 with a Retry-After: the endpoint still answered 429 after the retries (`upstream_busy`), or the
    proxy's own queue for the deployment refused the request (`queue_full`, `queue_timeout`)."""

    def __init__(self, message: str, *, retry_after: float | None, code: str = "upstream_busy") -> None:
        super().__init__(message, status=429)
        self.retry_after = retry_after
        self.code = code
