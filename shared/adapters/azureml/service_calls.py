"""How the adapter calls Azure: domain errors with the role to grant, and bounded retries.

azure-core's own retry policy is switched off on our clients (`retry_total=0`) so that exactly one
place retries: `ServiceCaller.call`, with stamina's exponential backoff, honouring `Retry-After`
(or `retry-after-ms`) on 429/5xx, bounded in attempts, total time and the longest wait it accepts.
A wait longer than that ends the call with `TransientError` at once: the event or timer that drove
it retries later, instead of a function sleeping for minutes. Scoring endpoints are not called
from here: every endpoint call goes through the `Upstream` port (`shared.adapters.endpoint_credentials`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import stamina
from azure.ai.ml.exceptions import MlException
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

from shared.adapters.retry_after import retry_after_seconds
from shared.errors import (
    BackendError,
    ConflictError,
    NotFound,
    PermissionDenied,
    TransientError,
    TunegridError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 529})
"""Retried with backoff; 529 is what some Azure front doors (Azure Monitor among them) send when overloaded."""


@dataclass(frozen=True)
class Scope:
    """Where a call acts, and the built-in role that allows it (named in PermissionDenied)."""

    role: str
    kind: str
    resource: str
    why: str

    def lacks(self) -> str:
        return (
            f"the app's identity lacks the role '{self.role}' on the {self.kind} {self.resource} (needed to {self.why})"
        )


class RetryableError(TransientError):
    """A throttled or briefly failing call; `retry_after` is the server's wish in seconds."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def _service_message(exc: HttpResponseError) -> str:
    error = getattr(exc, "error", None)
    code = getattr(error, "code", None)
    message = getattr(error, "message", None)
    if message:
        return f"{code}: {message}" if code else str(message)
    text = str(exc.message or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _retry_after(exc: HttpResponseError) -> float | None:
    response = exc.response
    headers = getattr(response, "headers", None) if response is not None else None
    return retry_after_seconds(headers) if headers else None


def translate(exc: BaseException, *, action: str, scope: Scope, what: str | None = None) -> TunegridError:
    """An Azure SDK exception as a domain error whose message says what to do about it."""
    if isinstance(exc, TunegridError):
        return exc
    if isinstance(exc, ClientAuthenticationError) and exc.response is None:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(".")
        return PermissionDenied(
            f"could not get a token for the app's identity to {action}: {detail}. "
            "Locally run `az login`; in Azure give the Function App a managed identity (AZURE_CLIENT_ID for a user-assigned one)."
        )
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        status = exc.status_code
        detail = _service_message(exc)
        if status in (401, 403):
            return PermissionDenied(f"{action} was refused (HTTP {status}): {scope.lacks()}. Service said: {detail}")
        if status == 404:
            return NotFound(f"{what or action}: not found ({detail})")
        if status == 409:
            return ConflictError(f"{action}: conflict with the resource's current state ({detail})")
        if status in RETRY_STATUSES:
            return RetryableError(
                f"{action}: Azure answered HTTP {status} ({detail})", status=status, retry_after=_retry_after(exc)
            )
        return BackendError(f"{action}: Azure ML refused the request (HTTP {status}): {detail}")
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return RetryableError(
            f"{action}: could not reach Azure ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        )
    if isinstance(exc, HttpResponseError):
        return BackendError(f"{action}: {_service_message(exc)}")
    if isinstance(exc, MlException):
        return BackendError(f"{action}: {exc}")
    raise exc


class ServiceCaller:
    """Runs one SDK call with translation and bounded retries."""

    def __init__(
        self,
        *,
        attempts: int = 4,
        timeout_s: float = 90.0,
        max_wait_s: float = 30.0,
        wait_initial_s: float = 1.0,
        wait_jitter_s: float = 1.0,
    ) -> None:
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.max_wait_s = max_wait_s
        self.wait_initial_s = wait_initial_s
        self.wait_jitter_s = wait_jitter_s

    def _backoff(self, exc: Exception) -> bool | float:
        if not isinstance(exc, RetryableError):
            return False
        if exc.retry_after is None:
            return True
        if exc.retry_after > self.max_wait_s:
            log.warning(
                "not retrying: the service asked to wait %.0f s (more than %.0f s)", exc.retry_after, self.max_wait_s
            )
            return False
        return exc.retry_after

    def call(self, fn: Callable[[], T], *, action: str, scope: Scope, what: str | None = None) -> T:
        attempt_no = 0
        try:
            for attempt in stamina.retry_context(
                on=self._backoff,
                attempts=self.attempts,
                timeout=self.timeout_s,
                wait_initial=self.wait_initial_s,
                wait_max=self.max_wait_s,
                wait_jitter=self.wait_jitter_s,
            ):
                with attempt:
                    attempt_no = attempt.num
                    try:
                        return fn()
                    except Exception as exc:
                        raise translate(exc, action=action, scope=scope, what=what) from exc
        except RetryableError as exc:
            raise TransientError(f"{exc} (gave up after {attempt_no} attempt{'s' if attempt_no != 1 else ''})") from exc
        raise AssertionError("unreachable: stamina either returns or raises")  # pragma: no cover


def not_found_is_none(fn: Callable[[], T]) -> Callable[[], T | None]:
    """Wrap a read so that a 404 reads as "absent" (check-before-act)."""

    def read() -> T | None:
        try:
            return fn()
        except HttpResponseError as exc:
            if exc.status_code == 404:
                return None
            raise

    return read
