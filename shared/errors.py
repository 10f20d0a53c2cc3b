"""Domain errors: one module, so HTTP functions can map them and event handlers can decide to retry."""

from __future__ import annotations


class TunegridError(Exception):
    """Base of every error this app raises on purpose."""


class ConfigError(TunegridError):
    """A setting or sidecar value is missing or malformed; retrying will not help."""


class InvalidInput(TunegridError):
    """The caller sent something we refuse (bad sidecar, bad request body); terminal, not retried."""


class UsageError(TunegridError):
    """A CLI invocation that cannot be carried out as asked."""


class TransientError(TunegridError):
    """Worth retrying: storage hiccup, throttling, a backend that is briefly unavailable."""


OUTAGE_RETRY_AFTER_S = 5
"""`Retry-After` (seconds) of an HTTP 503 answered because of a `TransientError` of our own storage: the
SDK has already retried for several seconds, so a client waits a little before asking again."""


class ConflictError(TunegridError):
    """An ETag-conditional update lost the race; someone else moved the record first."""


class NotFound(TunegridError):
    """A run, job, model, endpoint or deployment does not exist."""


class BackendError(TunegridError):
    """The fine-tune backend refused a call; the message says why in the user's terms."""


class PermissionDenied(BackendError):
    """The identity lacks a role; the message names the role."""


class ComputeError(BackendError):
    """The compute target cannot run this job (missing, failed, unsupported size)."""


class MetricsUnavailable(TunegridError):
    """Endpoint usage could not be read; the janitor must not delete on a guess."""


class UpstreamError(TunegridError):
    """A scoring endpoint answered with an error or not at all."""

    def __init__(self, message: str, *, status: int | None = None, timeout: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.timeout = timeout
