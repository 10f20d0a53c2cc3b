"""azure-core storage exceptions as the app's errors: the one place that knows the SDK's error types.

Use cases see only `shared.errors`: a network failure, a throttled or failing service (429, 5xx) is a
`TransientError` (retry later); a lost ETag race, a blob that changed under a conditional read or one
that already exists is a `ConflictError`; a missing blob or container is `NotFound`; anything else the service refuses stays a `TunegridError` with the service's message.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from shared.errors import ConflictError, NotFound, TransientError, TunegridError

P = ParamSpec("P")
T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(exc, HttpResponseError) and (status is None or status == 429 or status >= 500)


def translate(exc: AzureError, what: str) -> TunegridError:
    """The domain error for an SDK error; its message keeps the service's error code (e.g. `BlobNotFound`)."""
    status = getattr(exc, "status_code", None)
    code = getattr(exc, "error_code", None)
    detail = f"{what}: {getattr(code, 'value', code) or type(exc).__name__}" + (f" (HTTP {status})" if status else "")
    message = str(getattr(exc, "message", "") or exc).splitlines()[0][:300]
    if isinstance(exc, ResourceModifiedError):
        return ConflictError(f"{detail}: changed concurrently: {message}")
    if isinstance(exc, ResourceExistsError):
        return ConflictError(f"{detail}: already exists: {message}")
    if isinstance(exc, ResourceNotFoundError):
        return NotFound(f"{detail}: not found: {message}")
    if is_transient(exc):
        return TransientError(f"{detail}: {message}")
    return TunegridError(f"{detail}: {message}")


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Translate what escapes the block; `TunegridError`s and non-SDK errors pass through untouched."""
    try:
        yield
    except AzureError as exc:
        raise translate(exc, what) from exc


def translated(what: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """The same, as a decorator for adapter methods."""

    def wrap(fn: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> T:
            with storage_errors(what):
                return fn(*args, **kwargs)

        return inner

    return wrap
